"""HTTP client of the served LLM over Triton's generate extension: /generate and /generate_stream (SSE).

    c = HttpClient("localhost:8000", model="llm")
    print(c.generate("Hello", max_tokens=16, temperature=0.0).text)
    for d in c.generate_stream("Hello", max_tokens=16):
        print(d.text, end="")

Triton converts each JSON field to the dtype its input declares, so values are plain JSON; names are checked
against the model's config first, so a typo fails here by name instead of being ignored. Over HTTP, sessions
(if the model declares session inputs) are ordinary inputs: pass them as keyword arguments like any other.
"""
from __future__ import annotations

import json
import logging
from typing import Dict, Iterator, Optional

import httpx
import numpy as np

from client.protocol import Delta, Generation, ModelInterface, TritonError

logger = logging.getLogger(__name__)


def _delta(body: dict) -> Delta:
    return Delta.from_outputs(lambda name: None if name not in body else np.asarray(body[name], dtype=object))


def _error_of(body: str) -> Optional[str]:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("error") if isinstance(data, dict) else None


class HttpClient:
    def __init__(self, url: str = "localhost:8000", model: str = "llm", timeout: float = 600.0):
        self.base = url if url.startswith(("http://", "https://")) else f"http://{url}"
        self.model = model
        self.http = httpx.Client(base_url=self.base, timeout=timeout)
        self._interfaces: Dict[str, ModelInterface] = {}

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise TritonError(f"cannot reach tritonserver at {self.base}: {e}", "503") from None

    def interface(self, model: Optional[str] = None) -> ModelInterface:
        model = model or self.model
        if model not in self._interfaces:
            r = self._request("GET", f"/v2/models/{model}/config")
            if r.status_code != 200:
                raise TritonError(_error_of(r.text) or r.text, str(r.status_code))
            self._interfaces[model] = ModelInterface.from_config(r.json())
        return self._interfaces[model]

    def is_ready(self) -> bool:
        try:
            return self._request("GET", f"/v2/models/{self.model}/ready").status_code == 200
        except TritonError:
            return False

    def _body(self, prompt, stream: bool, params: dict) -> dict:
        iface = self.interface()
        return iface.json_values(iface.request_values(prompt, stream, params))

    def generate(self, prompt, **params) -> Generation:
        """One request to /generate (stream false: the model sends one final response)."""
        r = self._request("POST", f"/v2/models/{self.model}/generate", json=self._body(prompt, False, params))
        if r.status_code != 200:
            raise TritonError(_error_of(r.text) or r.text, str(r.status_code))
        return Generation.join([_delta(r.json())])

    def generate_stream(self, prompt, **params) -> Iterator[Delta]:
        """Deltas from /generate_stream's server-sent events; closing the iterator closes the connection."""
        body = self._body(prompt, True, params)
        try:
            with self.http.stream("POST", f"/v2/models/{self.model}/generate_stream", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise TritonError(_error_of(r.text) or r.text, str(r.status_code))
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = json.loads(line[len("data:"):])
                    if "error" in data:
                        raise TritonError(data["error"])
                    yield _delta(data)
        except httpx.TransportError as e:
            raise TritonError(f"stream from {self.base} failed: {e}", "503") from None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

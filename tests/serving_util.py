"""Helpers for the serving tests: a small demo workspace, gRPC / HTTP streaming calls, metrics.

Each serving test module starts one real tritonserver with `served` (module scope) on free ports.
"""
from __future__ import annotations

import json
import queue
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from scripts.launch_triton_server import TritonServer

SESSION_LEN = 512
# CPU-friendly engine: fp32, 256 KV blocks of 16 tokens; two stateless instances to check they share one engine
PARAMS = {"dtype": "float32", "device": "cpu", "session_len": str(SESSION_LEN), "max_batch_size": "16",
          "cache_block_seq_len": "16", "cache_max_entry_count": "256", "use_cuda_graph": "false",
          "default_max_tokens": "8", "instance_count": "2", "cancel_check_interval": "0.05"}
_DTYPES = {np.dtype(np.int32): "INT32", np.dtype(np.uint64): "UINT64", np.dtype(np.float32): "FP32",
           np.dtype(np.bool_): "BOOL", np.dtype(np.object_): "BYTES"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tools.convert import convert
    workspace = tmp_path_factory.getbasetemp() / "serving_workspace"
    if not (workspace / "model_repository" / "llm" / "config.pbtxt").exists():
        convert("demo", workspace, "llm", params=dict(PARAMS))
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(workspace / "model_repository", 0, 0, 0, log_file=log) as server:
        yield server


@dataclass
class Result:
    text: str = ""
    ids: List[int] = field(default_factory=list)
    responses: int = 0
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: Optional[str] = None


def inputs(**values) -> list:
    """name=value -> InferInputs with the batch dim; value: str/bytes, int (INT32), float, bool or an array."""
    out = []
    for name, v in values.items():
        if isinstance(v, np.ndarray):
            arr = v
        elif isinstance(v, (str, bytes)):
            arr = np.array([[v.encode() if isinstance(v, str) else v]], dtype=np.object_)
        elif isinstance(v, bool):
            arr = np.array([[v]], dtype=np.bool_)
        elif isinstance(v, int):
            arr = np.array([[v]], dtype=np.int32)
        else:
            arr = np.array([[v]], dtype=np.float32)
        i = grpcclient.InferInput(name, list(arr.shape), _DTYPES[arr.dtype])
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


def add_response(res: Result, r) -> None:
    res.responses += 1
    text = r.as_numpy("text_output")
    if text is not None:
        res.text += text.reshape(-1)[0].decode()
        res.ids += [int(t) for t in r.as_numpy("output_ids").reshape(-1)]
        res.finish_reason = r.as_numpy("finish_reason").reshape(-1)[0].decode() or None
        res.prompt_tokens = int(r.as_numpy("prompt_tokens").reshape(-1)[0])
        res.completion_tokens = int(r.as_numpy("completion_tokens").reshape(-1)[0])
        res.cached_tokens = int(r.as_numpy("cached_tokens").reshape(-1)[0])


def grpc_stream_many(url: str, requests: list, timeout: float = 600) -> List[Result]:
    """Send [(model, inputs, kwargs)] on one gRPC stream concurrently; collect each until its final response."""
    client = grpcclient.InferenceServerClient(url)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    results = {str(i): Result() for i in range(len(requests))}
    for i, (model, inp, kw) in enumerate(requests):
        client.async_stream_infer(model, inp, request_id=str(i), enable_empty_final_response=True, **kw)
    pending = set(results)
    try:
        while pending:
            r, err = q.get(timeout=timeout)
            if err is not None:
                rid = err.message()   # errors carry no id: fill the oldest pending request that has no error
                target = next(k for k in sorted(pending, key=int))
                results[target].error = rid
                pending.discard(target)
                continue
            rid = r.get_response().id
            add_response(results[rid], r)
            if r.get_response().parameters["triton_final_response"].bool_param:
                pending.discard(rid)
    finally:
        client.stop_stream()
        client.close()
    return [results[str(i)] for i in range(len(requests))]


def grpc_stream(url: str, model: str = "llm", timeout: float = 600, **values) -> Result:
    kw = {k: values.pop(k) for k in ("sequence_id", "sequence_start", "sequence_end") if k in values}
    return grpc_stream_many(url, [(model, inputs(**values), kw)], timeout)[0]


def http_generate_stream(url: str, model: str = "llm", **body) -> Result:
    body.setdefault("stream", True)
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    res = Result()
    try:
        r = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:      # an error before the first event comes as a plain JSON answer
        body = e.read().decode(errors="replace")
        try:
            res.error = json.loads(body).get("error", body)
        except ValueError:
            res.error = f"HTTP {e.code}: {body}"
        return res
    with r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:"):
                continue
            d = json.loads(line[5:])
            if "error" in d:
                res.error = d["error"]
                break
            res.responses += 1
            res.text += d.get("text_output", "")
            res.finish_reason = d.get("finish_reason") or res.finish_reason
            res.prompt_tokens = d.get("prompt_tokens", res.prompt_tokens)
            res.completion_tokens = d.get("completion_tokens", res.completion_tokens)
            res.cached_tokens = d.get("cached_tokens", res.cached_tokens)
    return res


def metric(server, name: str, reduce=max) -> float:
    """A metric on Triton's metrics port (`server` has a metrics_url), its samples over labels reduced by `reduce`:
    max (default) for the model a test drives, sum for the total over both frontends."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    if not values:
        raise KeyError(f"metric {name} not on {server.metrics_url}")
    return reduce(values)

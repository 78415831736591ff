"""Closed-loop load over Triton gRPC streaming: C workers, each with its own stream (tritonclient.grpc
start_stream / async_stream_infer), each sending its next request when the previous one's final response arrives.

Inputs are built from the served model's own config (names, dtypes, dims), so the same code fits any model that
takes the tensorrtllm_backend-style interface (text_input or input_ids, max_tokens, stream, ignore_eos, ...).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import tritonclient.grpc as grpcclient

log = logging.getLogger(__name__)

_NP = {"TYPE_STRING": object, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_UINT64": np.uint64,
       "TYPE_FP32": np.float32, "TYPE_BOOL": bool}
_WIRE = {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_UINT64": "UINT64",
         "TYPE_FP32": "FP32", "TYPE_BOOL": "BOOL"}


class InputBuilder:
    """Turns {input name: value} into InferInputs shaped as the model's config.pbtxt declares them."""

    def __init__(self, url: str, model: str):
        with grpcclient.InferenceServerClient(url) as c:
            cfg = c.get_model_config(model, as_json=True)["config"]
        self.batched = int(cfg.get("max_batch_size", 0)) > 0
        self.inputs = {i["name"]: i for i in cfg["input"]}

    def __call__(self, values: Dict[str, object]) -> List[grpcclient.InferInput]:
        out = []
        for name, value in values.items():
            spec = self.inputs.get(name)
            if spec is None:
                raise ValueError(f"the served model has no input {name!r}; it has {sorted(self.inputs)}")
            kind = spec.get("data_type", "TYPE_STRING")
            arr = np.array(value if isinstance(value, (list, tuple)) else [value], dtype=_NP[kind])
            if kind == "TYPE_STRING":
                arr = np.array([v.encode() if isinstance(v, str) else v for v in arr.ravel()], dtype=object)
            dims = [int(d) for d in spec.get("dims", [1])]
            shape = [arr.size if d == -1 else d for d in dims]
            arr = arr.reshape(([1] if self.batched else []) + shape)
            x = grpcclient.InferInput(name, list(arr.shape), _WIRE[kind])
            x.set_data_from_numpy(arr)
            out.append(x)
        return out


class _Worker(threading.Thread):
    def __init__(self, url, model, requests, jobs: "queue.Queue[int]", record: dict, timeout: float):
        super().__init__(daemon=True)
        self.url, self.model, self.requests, self.jobs, self.record, self.timeout = url, model, requests, jobs, \
            record, timeout
        self.done = threading.Event()
        self.current: Optional[int] = None

    def _callback(self, result, error) -> None:
        now = time.perf_counter()
        i = self.current
        if error is not None:
            self.record["errors"][i] = str(error)
            self.done.set()
            return
        text = result.as_numpy("text_output")
        if text is not None and text.size and text.ravel()[0]:
            self.record["arrivals"][i].append(now)
        n = result.as_numpy("completion_tokens")
        if n is not None and n.size:
            self.record["tokens"][i] = int(n.ravel()[0])
        n = result.as_numpy("prompt_tokens")
        if n is not None and n.size:
            self.record["prompt_tokens"][i] = int(n.ravel()[0])
        params = result.get_response().parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            self.record["ends"][i] = now
            self.done.set()

    def run(self) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            client.start_stream(callback=self._callback)
            try:
                while True:
                    try:
                        i = self.jobs.get_nowait()
                    except queue.Empty:
                        return
                    self.current = i
                    self.done.clear()
                    self.record["starts"][i] = time.perf_counter()
                    client.async_stream_infer(self.model, self.requests[i], request_id=str(i),
                                              enable_empty_final_response=True)
                    if not self.done.wait(self.timeout):
                        self.record["errors"][i] = f"no final response within {self.timeout:g}s"
                        return
                    if self.record["progress"] is not None:
                        self.record["progress"].update(1)
            finally:
                client.stop_stream()


def run_load(url: str, model: str, requests: List[list], concurrency: int, timeout: float = 600.0,
             progress=None) -> dict:
    """Send every prepared request (a list of InferInputs) with `concurrency` streams; returns per-request
    starts, arrivals (non-empty responses), ends, completion/prompt token counts, errors and elapsed time."""
    n = len(requests)
    record = {"starts": [0.0] * n, "ends": [0.0] * n, "arrivals": [[] for _ in range(n)], "tokens": [0] * n,
              "prompt_tokens": [0] * n, "errors": {}, "progress": progress}
    jobs: "queue.Queue[int]" = queue.Queue()
    for i in range(n):
        jobs.put(i)
    workers = [_Worker(url, model, requests, jobs, record, timeout) for _ in range(min(concurrency, n))]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    record["elapsed_s"] = time.perf_counter() - t0
    record.pop("progress")
    return record

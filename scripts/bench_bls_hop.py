"""What a BLS hop costs per streamed response: the session model could forward to the stateless model through
BLS instead of talking to the engine process itself (DESIGN.md, "Sessions through Triton 2.51").

Two tiny decoupled python models in a temporary repository: `sender` sends N one-token responses as fast as it
can; `forward` relays a request to `sender` with BLS (`exec(decoupled=True)`) and re-sends every response. A gRPC
streaming client measures responses/s of each, with 1 and 8 concurrent streams.

    python -m scripts.bench_bls_hop [--responses 3000]
"""
from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from scripts.launch_triton_server import TritonServer

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""
SENDER = """import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            n = int(pb_utils.get_input_tensor_by_name(r, "N").as_numpy()[0])
            s = r.get_response_sender()
            for i in range(n):
                s.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            s.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
FORWARD = """import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            s = r.get_response_sender()
            n = pb_utils.get_input_tensor_by_name(r, "N")
            bls = pb_utils.InferenceRequest(model_name="sender", requested_output_names=["OUT"], inputs=[n])
            for resp in bls.exec(decoupled=True):
                if resp.has_error():
                    s.send(pb_utils.InferenceResponse(error=resp.error()))
                    break
                if resp.output_tensors():
                    s.send(pb_utils.InferenceResponse(resp.output_tensors()))
            s.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


def write_repository(root: Path) -> Path:
    for name, code in (("sender", SENDER), ("forward", FORWARD)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name))
        (root / name / "1" / "model.py").write_text(code)
    return root


def responses_per_second(url: str, model: str, n: int, streams: int) -> float:
    clients, q = [], queue.Queue()
    for _ in range(streams):
        c = grpcclient.InferenceServerClient(url)
        c.start_stream(callback=lambda result, error: q.put(error))
        clients.append(c)
    inp = grpcclient.InferInput("N", [1], "INT32")
    inp.set_data_from_numpy(np.array([n], np.int32))
    t0 = time.perf_counter()
    for c in clients:
        c.async_stream_infer(model, [inp])
    for _ in range(n * streams):
        err = q.get(timeout=300)
        if err is not None:
            raise RuntimeError(err)
    dt = time.perf_counter() - t0
    for c in clients:
        c.stop_stream()
    return n * streams / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", type=int, default=3000, help="responses per stream")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, TritonServer(write_repository(Path(tmp) / "repo"), 0, 0, 0,
                                                           log_file=Path(tmp) / "tritonserver.log") as server:
        responses_per_second(server.grpc_url, "sender", 200, 1)        # warm-up
        print("| path | 1 stream | 8 streams |\n| --- | --- | --- |")
        for model, label in (("sender", "direct (model sends)"), ("forward", "through a BLS hop")):
            r1 = responses_per_second(server.grpc_url, model, args.responses, 1)
            r8 = responses_per_second(server.grpc_url, model, args.responses, 8)
            print(f"| {label} | {r1:,.0f} responses/s | {r8:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo` / `lmtriton demo`: convert the demo model, start tritonserver, stream one chat answer over gRPC,
stop the server."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# a CPU has no memory budget to take a fraction of: a fixed, small KV pool
CPU_PARAMS = {"session_len": "2048", "cache_max_entry_count": "512", "cache_block_seq_len": "16",
              "max_batch_size": "8", "use_cuda_graph": "false"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lmtriton demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default="workspace")
    ap.add_argument("--prompt", default="In two sentences, what is NVIDIA Triton Inference Server?")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reuse", action="store_true", help="keep an existing workspace instead of converting again")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch
    from client.chat import main as chat_main
    from scripts.launch_triton_server import TritonServer
    from tools.convert import convert

    workspace = Path(args.workspace)
    repo = workspace / "model_repository"
    if not (args.reuse and (repo / "llm" / "config.pbtxt").exists()):
        convert("demo", workspace, "llm", params=None if torch.cuda.is_available() else dict(CPU_PARAMS))
    log_file = workspace / "tritonserver.log"
    log.info("starting tritonserver (log: %s)", log_file)
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file) as server:
        print(f"\nuser: {args.prompt}\nassistant: ", end="", flush=True)
        rc = chat_main(["--url", server.grpc_url, "--model", "llm", "--tokenizer", str(workspace / "tokenizer"),
                        "--prompt", args.prompt, "--max-tokens", str(args.max_tokens), "--temperature", "0"])
        print()
    log.info("tritonserver stopped")
    return rc


if __name__ == "__main__":
    sys.exit(main())

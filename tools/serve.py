"""`lmtriton serve triton | openai | web`: start tritonserver on a workspace, or the OpenAI gateway / web UI in
front of a running tritonserver. Arguments after the target go to that program (`--help` lists them)."""
from __future__ import annotations

import importlib
import sys

TARGETS = {
    "triton": "scripts.launch_triton_server",   # --model-repository workspace/model_repository --http-port ...
    "openai": "client.openai_server",            # --triton localhost:8001 --model llm --port 23333
    "web": "client.web",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TARGETS:
        sys.stderr.write(f"usage: lmtriton serve {{{'|'.join(TARGETS)}}} [ARGS]\n")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(TARGETS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`lmtriton` console script: a thin dispatcher; each subcommand's module parses its own arguments."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "convert": ("tools.convert", "HF checkpoint or 'demo' -> workspace with a Triton model repository"),
    "lite": ("tools.lite", "quantization: calibrate | auto_awq | kv_qparams"),
    "eval": ("tools.eval_ppl", "eval ppl: perplexity through the engine"),
    "serve": ("tools.serve", "serve triton | openai | web"),
    "chat": ("client.chat", "interactive streaming chat against tritonserver"),
    "bench": ("scripts.bench", "bench generation | throughput | serving"),
    "demo": ("tools.demo", "convert the demo model, start tritonserver, stream a chat answer"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {desc}" for name, (_, desc) in COMMANDS.items()]
        msg = "usage: lmtriton COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"lmtriton: unknown command {argv[0]!r}\n{msg}\n")
            return 2
        sys.stdout.write(msg + "\n")
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

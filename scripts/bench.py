"""`lmtriton bench generation|throughput|serving|plot`: dispatch to one benchmark module's main(argv)."""
from __future__ import annotations

import importlib
import logging
import sys

BENCHES = {
    "generation": ("scripts.bench_generation", "static batches: tok/s, first-token and per-token latency, memory"),
    "throughput": ("scripts.bench_throughput", "ShareGPT-like workload in-process: req/s, tok/s, TTFT"),
    "serving": ("scripts.bench_serving", "the same workload through tritonserver gRPC streaming"),
    "plot": ("scripts.plots", "PNG plots of result JSON files"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        usage = "usage: lmtriton bench {" + "|".join(BENCHES) + "} [ARGS]   (--help on each)\n" + "".join(
            f"  {k:<11}{v[1]}\n" for k, v in BENCHES.items())
        if not argv or argv[0] in ("-h", "--help"):
            sys.stdout.write(usage)
            return 0
        sys.stderr.write(f"lmtriton bench: unknown benchmark {argv[0]!r}\n{usage}")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return int(importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""PNG plots of benchmark JSON files: throughput vs batch size (generation), throughput and latency vs
concurrency (throughput, serving). Several files of one kind go into one figure, one line each.

    python -m scripts.plots workspace/bench/generation_*.json --out docs/img/generation.png
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import NullLocator, ScalarFormatter  # noqa: E402

log = logging.getLogger(__name__)


def label(doc: dict) -> str:
    m = doc["model"]
    parts = [m["model"]]
    if m.get("kv_cache_dtype", "auto") != "auto":
        parts.append(f"KV {m['kv_cache_dtype']}")
    return ", ".join(parts)


def _title(docs: List[dict], what: str) -> str:
    mach = docs[0]["meta"]["machine"]
    return f"{what} — {mach.get('gpu', mach['host_cpu'])}"


def _log2_axis(ax, ticks) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ticks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def plot_generation(docs: List[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for doc in docs:
        lines = defaultdict(list)
        for r in doc["results"]:
            if "output_tok_s" in r:
                lines[(r["input"], r["output"])].append(r)
        for (n_in, n_out), rows in sorted(lines.items()):
            name = f"{label(doc)} {n_in}:{n_out}" if len(docs) > 1 else f"prompt {n_in}, output {n_out}"
            line, = ax.plot([r["batch"] for r in rows], [r["output_tok_s"] for r in rows], "o-", label=name)
            hf = [r for r in rows if r.get("hf", {}).get("output_tok_s")]
            if hf:
                ax.plot([r["batch"] for r in hf], [r["hf"]["output_tok_s"] for r in hf], "x--",
                        color=line.get_color(), label=f"HF generate {n_in}:{n_out}")
    _log2_axis(ax, [r["batch"] for d in docs for r in d["results"]])
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if ys and max(ys) / min(ys) > 50:           # the HF peer sits orders of magnitude below at large batches
        ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s")
    ax.set_title(_title(docs, "Static-batch generation throughput"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_concurrency(docs: List[dict], out: Path) -> None:
    """Throughput and latency vs concurrency; a serving file also draws its in-process baseline."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for doc in docs:
        rows = sorted(doc["results"], key=lambda r: r["concurrency"])
        c = [r["concurrency"] for r in rows]
        served = doc["meta"]["bench"] == "serving"
        name = label(doc) + (" via tritonserver" if served else " in-process")
        line, = ax1.plot(c, [r["output_tok_s"] for r in rows], "o-", label=name)
        ax2.plot(c, [r["ttft_ms"]["p50"] for r in rows], "o-", color=line.get_color(), label=f"{name} TTFT p50")
        ax2.plot(c, [r["tpot_ms"]["p50"] for r in rows], "s:", color=line.get_color(), label=f"{name} TPOT p50")
        base = [r for r in rows if r.get("inprocess")]
        if base:
            cb = [r["concurrency"] for r in base]
            ax1.plot(cb, [r["inprocess"]["output_tok_s"] for r in base], "x--", color=line.get_color(),
                     label=label(doc) + " in-process (same run)")
            ax2.plot(cb, [r["inprocess"]["ttft_ms"]["p50"] for r in base], "x--", color=line.get_color(),
                     label=label(doc) + " in-process TTFT p50")
    ax1.set_ylabel("output tokens/s")
    ax2.set_ylabel("milliseconds")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        _log2_axis(ax, [r["concurrency"] for d in docs for r in d["results"]])
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_title("Throughput vs concurrency")
    ax2.set_title("Latency vs concurrency")
    fig.suptitle(_title(docs, f"{docs[0]['meta']['bench']} on the ShareGPT-like workload"), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


PLOTTERS = {"generation": plot_generation, "throughput": plot_concurrency, "serving": plot_concurrency}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.plots", description="plot benchmark JSON files")
    p.add_argument("files", nargs="+", help="result JSON files (generation, or throughput and serving)")
    p.add_argument("--out", default=None, help="PNG path (default: the first file's name with .png)")
    args = p.parse_args(argv)
    docs = [json.loads(Path(f).read_text()) for f in args.files]
    plotters = {PLOTTERS[d["meta"]["bench"]] for d in docs}
    if len(plotters) != 1:
        raise ValueError("generation files cannot share a figure with throughput/serving files")
    out = Path(args.out or Path(args.files[0]).with_suffix(".png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    plotters.pop()(docs, out)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())

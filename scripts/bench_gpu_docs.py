"""Turn the tarball of scripts/bench_gpu.sh into docs: result files, the serving plot and the Markdown section.

    python -m scripts.bench_gpu_docs /work/.device/N/bench_gpu.tgz [--no-edit]

Copies serving_*.json/.md and perf_analyzer's merged CSV/table into docs/benchmarks/, draws
docs/benchmarks/serving_<shape>.png (throughput and latency vs concurrency, served and in-process, all weight
formats in one figure), writes docs/benchmarks/serving_gpu.md (the section: commands, machine, date, tables) and,
unless --no-edit, puts that section into docs/benchmarks.md in place of the "Serving on the GPU: not measured
yet" paragraph (or of the section a previous run put there).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

from . import plots

log = logging.getLogger(__name__)
DOCS = Path(__file__).resolve().parent.parent / "docs"
BEGIN, END = "<!-- bench_gpu serving: begin -->", "<!-- bench_gpu serving: end -->"
OLD_START = "**Serving on the GPU: not measured yet.**"
OLD_STOP = "### CPU: the served demo model"
PERF_OLD = ("perf_analyzer was not run on the GPU: the device image lacks\nlibb64 and cannot install it.")


def table_of(md: str) -> str:
    """The Markdown table of a result .md file (its header lines are the command and the model)."""
    return "\n".join(line for line in md.splitlines() if line.startswith("|"))


def section(serving: list, perf_md: str, png: Path, plot_cmd: str) -> str:
    docs = [json.loads(p.read_text()) for p in serving]
    mach = docs[0]["meta"]["machine"]
    dates = sorted(d["meta"]["date_utc"] for d in docs)
    out = [BEGIN, f"### GPU serving: {docs[0]['model']['model'].split('_')[0]} shape through tritonserver "
                  f"({mach.get('gpu', mach['host_cpu'])}, {dates[0]})", "",
           textwrap.fill(
               "`bash scripts/bench_gpu.sh` in one device call (carry `.carry`, `workspace/gpu_py`, "
               f"`workspace/gpu_perf`; torch {mach['torch']}, CUDA {mach.get('cuda', '—')}): random weights written "
               "on the GPU machine, the real tritonserver 2.51 serving them over gRPC streaming; in the same run, "
               "before the server starts, the in-process engine with the served `config.pbtxt` parameters on the "
               "same prompts (the in-process columns; the throughput cost is 1 − served / in-process output tok/s). "
               "Result files: `docs/benchmarks/serving_*.json`, `docs/benchmarks/perf_*.csv`.", width=118), ""]
    for p, d in zip(serving, docs):
        m = d["model"]
        weights = "W4A16 (AWQ int4, group 128)" if m.get("quant") == "awq" else "dense"
        out += [f"`{d['meta']['command']}` ({weights} weights, {m.get('dtype')}, KV {m.get('kv_cache_dtype')}, "
                f"{m.get('kv_blocks')} KV blocks of {m.get('block_size')} in-process, CUDA graphs "
                f"{'on' if m.get('cuda_graph') else 'off'}):", "", table_of(p.with_suffix('.md').read_text()), ""]
    out += [f"![serving throughput and latency vs concurrency](benchmarks/{png.name})", "", f"(`{plot_cmd}`)", ""]
    if perf_md:
        head, _, rest = perf_md.partition("\n\n")
        out += ["perf_analyzer against the fp16 server (" + head.strip() + "):", "", table_of(rest), ""]
    else:
        out += ["perf_analyzer: no result came back (see perf_fp16.log in the tarball).", ""]
    out.append(END)
    return "\n".join(out) + "\n"


def edit_benchmarks(md_path: Path, text: str) -> None:
    doc = md_path.read_text()
    if BEGIN in doc:
        doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END) + 1:]
    elif OLD_START in doc and OLD_STOP in doc:
        doc = doc[:doc.index(OLD_START)] + text + "\n" + doc[doc.index(OLD_STOP):]
    else:
        raise SystemExit(f"{md_path}: neither the markers {BEGIN!r} nor the paragraph {OLD_START!r} found; "
                         f"paste docs/benchmarks/serving_gpu.md by hand")
    doc = doc.replace(PERF_OLD, "On the GPU: the perf_analyzer table of the GPU serving section above.")
    md_path.write_text(doc)
    log.info("updated %s", md_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_gpu_docs", description=__doc__.split("\n")[0])
    p.add_argument("tarball", help="bench_gpu.tgz from the device call")
    p.add_argument("--docs", default=str(DOCS), help="the docs directory (benchmarks.md, benchmarks/)")
    p.add_argument("--no-edit", action="store_true", help="write the section file only; leave benchmarks.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    docs, dest = Path(args.docs), Path(args.docs) / "benchmarks"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.tarball) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp)
        serving = sorted(src.glob("serving_*.json"), key=lambda f: ("awq" in f.name, f.name))
        if not serving:
            raise SystemExit(f"{args.tarball}: no serving_*.json (see the step logs in it: serving_fp16.log, ...)")
        copied = []
        for f in serving:
            for g in (f, f.with_suffix(".md")):
                shutil.copy(g, dest / g.name)
            copied.append(dest / f.name)
        shape = json.loads(serving[0].read_text())["model"]["model"].split("_")[0]
        perf_md = ""
        if (src / "perf" / "perf.csv").exists():
            shutil.copy(src / "perf" / "perf.csv", dest / f"perf_{shape}_fp16.csv")
            perf_md = (src / "perf" / "perf.md").read_text()
            (dest / f"perf_{shape}_fp16.md").write_text(perf_md)
    png = dest / f"serving_{shape}.png"
    plots.main([str(f) for f in copied] + ["--out", str(png)])
    rel = [str(f.relative_to(docs.parent)) if f.is_relative_to(docs.parent) else str(f) for f in copied + [png]]
    plot_cmd = f"python -m scripts.plots {' '.join(rel[:-1])} --out {rel[-1]}"
    text = section(copied, perf_md, png, plot_cmd)
    (dest / "serving_gpu.md").write_text(text)
    log.info("wrote %s, %s and %s", png, dest / "serving_gpu.md", ", ".join(f.name for f in copied))
    if not args.no_edit:
        edit_benchmarks(docs / "benchmarks.md", text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

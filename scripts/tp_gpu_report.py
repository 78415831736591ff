"""Turn the archive of scripts/bench_gpu_tp.sh (tp_gpu.tgz) into docs/benchmarks.md text and result files.

    python -m scripts.tp_gpu_report PATH/tp_gpu.tgz [--docs-dir docs/benchmarks] [--suffix h200x2]

Prints Markdown for the tensor-parallelism section of docs/benchmarks.md (the test verdict, the 70B-shape W4A16
decode table with the tp=2 speed-up, the all-reduce time per step, the served tp=2 table) and, with --docs-dir,
copies the JSON results (and the serving plot) there under names that carry the machine suffix.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

_VERDICT = re.compile(r"((?:eager lm_head|lm_head in graph): (?:tp=2 == tp=1 greedy tokens|first divergence)[^\n]*)")
_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed)[^=\n]*?)\s*=*$", re.M)


def _read(d: Path, name: str) -> str:
    p = d / name
    return p.read_text(errors="replace") if p.exists() else ""


def tests_section(d: Path) -> List[str]:
    log = _read(d, "tests.log")
    verdict, summary = _VERDICT.findall(log), _SUMMARY.findall(log)
    steps = _read(d, "steps.txt")
    rc = re.search(r"== tests (rc=\d+ \d+s)", steps)
    lines = ["GPU tests (`python3 -m pytest -m gpu tests/test_tp.py tests/test_w4a16_runtime_only.py`, random "
             "Llama-3-8B shape (TP_TEST_LAYERS=32), 2 prompts x 16 greedy tokens, NCCL + CUDA graphs):"]
    lines += [f"- {v}" for v in verdict] or ["- no verdict line in tests.log"]
    lines.append(f"- pytest: {summary[-1] if summary else 'no summary (' + (rc.group(1) if rc else 'not run') + ')'}")
    if "Timeout" in log or "Thread 0x" in log:
        lines.append("- the log holds a faulthandler stack dump: a test exceeded its time (see tests.log)")
    return lines


def decode_section(doc: dict) -> List[str]:
    rows = doc.get("decode", [])
    base = {(r["model"], r["batch"]): r["tok_s"] for r in rows if r["tp"] == 1}
    flags = sorted({f"decode_step_in_graph={r.get('decode_step_in_graph')}, fuse_rope_kv={r.get('fuse_rope_kv')}"
                    for r in rows})
    lines = [f"Command: `{doc['command']}` ({doc['device']}, {doc.get('date_utc', 'date not recorded')}; random "
             f"int4 weights made on each rank's GPU in the kernels' layout; 128-token prompts; "
             f"{'; '.join(flags)}).", "",
             "| model | tp | batch | decode tok/s | step ms | speed-up | load s | KV blocks / rank | rank-0 GPU GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = base.get((r["model"], r["batch"]))
        up = f"{r['tok_s'] / b:.2f}x" if r["tp"] > 1 and b else ""
        lines.append(f"| {r['model']} | {r['tp']} | {r['batch']} | {r['tok_s']:,.0f} | {r['step_ms']:.2f} | {up} | "
                     f"{r['load_s']:.0f} | {r.get('kv_blocks', '')} | {r.get('rank0_gpu_gb', 0):.1f} |")
    if doc.get("allreduce"):
        lines += ["", "All-reduce alone, one decode step's worth (NCCL, replayed as a CUDA graph):", "",
                  "| batch | hidden | all-reduces per step | ms per step | us each |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {a['batch']} | {a['hidden']} | {a['allreduces']} | {a['ms_per_step']:.2f} | "
                  f"{1e3 * a['ms_per_step'] / a['allreduces']:.1f} |" for a in doc["allreduce"]]
    return lines


def report(d: Path, docs_dir: Optional[Path], suffix: str) -> str:
    out = ["### GPU: tensor parallelism on 2 GPUs (`bash scripts/bench_gpu_tp.sh`)", ""]
    steps = _read(d, "steps.txt").strip()
    if steps:
        out += ["Steps: " + "; ".join(s.strip("= ") for s in steps.splitlines()), ""]
    out += tests_section(d) + [""]
    for p in sorted(d.glob("tp_*.json")):
        doc = json.loads(p.read_text())
        out += decode_section(doc) + [""]
        if docs_dir:
            shutil.copy(p, docs_dir / f"{p.stem}_{suffix}.json")
    for p in sorted(d.glob("serving_*.json")):
        md = p.with_suffix(".md")
        out += [f"Served through tritonserver, tp=2 over both GPUs (`{json.loads(p.read_text())['meta']['command']}`):",
                ""] + (md.read_text().splitlines() if md.exists() else ["(no table)"]) + [""]
        if docs_dir:
            shutil.copy(p, docs_dir / f"{p.stem}_{suffix}.json")
            if p.with_suffix(".png").exists():
                shutil.copy(p.with_suffix(".png"), docs_dir / f"{p.stem}_{suffix}.png")
    if not list(d.glob("serving_*.json")):
        out += ["Serving: no result (serving.log, server.log: " + (_read(d, "serving.log").strip().splitlines()
                or ["empty"])[-1] + ")"]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive", help="tp_gpu.tgz from the device, or the directory it was unpacked into")
    ap.add_argument("--docs-dir", default=None, help="copy the JSON results (and plots) here, e.g. docs/benchmarks")
    ap.add_argument("--suffix", default="h200x2", help="machine tag in the copied file names")
    args = ap.parse_args(argv)
    src = Path(args.archive)
    with tempfile.TemporaryDirectory() as tmp:
        if src.is_file():
            with tarfile.open(src) as t:
                t.extractall(tmp, filter="data")
            src = Path(tmp)
        docs = Path(args.docs_dir) if args.docs_dir else None
        if docs:
            docs.mkdir(parents=True, exist_ok=True)
        print(report(src, docs, args.suffix))
    return 0


if __name__ == "__main__":
    sys.exit(main())

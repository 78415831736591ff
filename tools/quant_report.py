"""The quantization comparison table for one model: fp | KV int8 | KV int4 | W4A16 (AWQ and RTN, per group size) |
W4A16 + KV int8, with perplexity through the engine, weight bytes and KV bytes per token.

    python -m tools.quant_report --model demo --work-dir workspace/quant

Every step's output lands in WORK_DIR (statistics, checkpoints, results.json) and is reused on a re-run, so an
interrupted report resumes. The GPU columns (engine memory at a fixed number of sessions, bs=1 decode tok/s)
come from a random-weight model of a real shape (tools/quant_gpu.py):

    PYTHONPATH=. python3 -m tools.quant_report --gpu-shape llama2-7b --out $OUT/quant_gpu.json     # on the GPU
    python -m tools.quant_report --merge-gpu quant_gpu.json --doc docs/quantization.md             # table -> doc
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

log = logging.getLogger(__name__)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=2))


def build_models(model_dir: str, work: Path, groups: List[int], args) -> dict:
    """Calibrate once, write static KV parameters, quantize AWQ and RTN per group size (reusing what exists)."""
    from .awq import quantize_model
    from .calibrate import STATS_FILE, calibrate
    from .kv_qparams import write_kv_qparams
    timing_path = work / "timing.json"
    timing = _load(timing_path)
    calib = work / "calib"
    if not (calib / STATS_FILE).exists():
        t = time.time()
        calibrate(model_dir, calib, "wiki", args.calib_samples, args.calib_seqlen, progress=False)
        timing["calibrate_s"] = round(time.time() - t, 1)
    kvq = write_kv_qparams(calib)
    models = {"errors": {}, "kv_qparams": str(kvq)}
    for g in groups:
        for method in ("awq", "rtn"):
            out = work / f"{method}_g{g}"
            if not (out / "model.safetensors").exists():
                t = time.time()
                try:
                    quantize_model(model_dir, out, 4, g, calib if method == "awq" else None, method,
                                   args.search_tokens, progress=False)
                except ValueError as e:
                    models["errors"][f"{method}_g{g}"] = str(e)
                    continue
                timing[f"{method}_g{g}_s"] = round(time.time() - t, 1)
            models[f"{method}_g{g}"] = str(out)
    _save(timing_path, timing)
    models["timing"] = timing
    return models


def run_evals(model_dir: str, models: dict, work: Path, groups: List[int], args) -> dict:
    from .eval_ppl import eval_ppl
    res_path = work / "results.json"
    results = _load(res_path)
    kvq = models["kv_qparams"]
    plan = [("fp", model_dir, "auto", None, "auto"), ("fp + KV int8", model_dir, "int8", None, "auto"),
            ("fp + KV int8 + rotation", model_dir, "int8", None, "hadamard"),
            ("fp + KV int4 (rotated)", model_dir, "int4", None, "auto"),
            ("fp + KV int4 unrotated", model_dir, "int4", None, "off"),
            ("fp + KV int8 static", model_dir, "int8", kvq, "auto"), ("fp + KV int4 static", model_dir, "int4", kvq,
                                                                      "auto")]
    for g in groups:
        for method in ("awq", "rtn"):
            if f"{method}_g{g}" in models:
                plan.append((f"W4A16 {method.upper()} g{g}", models[f"{method}_g{g}"], "auto", None, "auto"))
        if f"awq_g{g}" in models:
            plan.append((f"W4A16 AWQ g{g} + KV int8", models[f"awq_g{g}"], "int8", None, "auto"))
            plan.append((f"W4A16 AWQ g{g} + KV int4 (rotated)", models[f"awq_g{g}"], "int4", None, "auto"))
    for label, path, kv, kvq, rot in plan:   # kv_rotation auto: Hadamard for int4 (backend/model/rotation.py)
        if label in results:
            continue
        log.info("eval %s ...", label)
        results[label] = eval_ppl(path, kv, args.windows, args.seqlen, kv_qparams=kvq, device=args.device,
                                  batch=args.batch, kv_rotation=rot)
        results[label]["label"] = label
        _save(res_path, results)
        log.info("  ppl %.4f (%ss)", results[label]["ppl"], results[label]["eval_seconds"])
    return results


def markdown(results: dict, models: dict, meta: dict) -> str:
    """The CPU (accuracy) table; the GPU columns are a table of their own (tools/quant_gpu.py)."""
    base = results["fp"]["ppl"]
    lines = ["| configuration | ppl | Δppl vs fp | weight MB (fp16 storage) | KV bytes / token |",
             "|---|---|---|---|---|"]
    for label, r in results.items():
        d = 100 * (r["ppl"] / base - 1)
        lines.append(f"| {label} | {r['ppl']:.4f} | {d:+.2f}% | {r['weight_bytes'] / 2**20:.1f} | "
                     f"{r['kv_bytes_per_token']} |")
    for name, err in models["errors"].items():
        lines.append(f"| W4A16 {name.replace('_', ' ').upper()} | n/a: {err} | | | |")
    r0 = results["fp"]
    lines.append("")
    lines.append(f"ppl over {r0['tokens']} held-out tokens ({r0['windows']} windows x {r0['seqlen']}, seed "
                 f"{r0['seed']}), {r0['device']} {r0['dtype']}; {meta}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.quant_report", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--work-dir", default="workspace/quant")
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--search-tokens", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0)
    from .quant_gpu import add_args, merge_into_doc, run_gpu
    add_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.gpu_shape:           # GPU columns on a random-weight shape (tools/quant_gpu.py)
        run_gpu(args.gpu_shape, args.out, args.gpu_new)
        return 0
    if args.merge_gpu:
        merge_into_doc(args.merge_gpu, args.doc, args.gpu_command)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from .lite import _model_dir
    model_dir = _model_dir(args.model)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(model_dir, work, args.groups, args)
    results = run_evals(model_dir, models, work, args.groups, args)
    meta = (f"calibration {args.calib_samples} x {args.calib_seqlen} wiki tokens, AWQ search on {args.search_tokens}; "
            f"timing {models['timing']}")
    table = markdown(results, models, meta)
    (work / "report.md").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

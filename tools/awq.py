"""`lmtriton lite auto_awq`: W4A16 AWQ (or plain round-to-nearest) quantization of an HF checkpoint, layer by layer.

Per decoder layer: the fp layer runs on a few calibration windows, collecting the second moments of each linear
group's input; for each scale group of the family table (tools/quant_family.py) AWQ searches per-channel scales
from the calibration statistics' mean |x| and folds them into the preceding norm / linear; then a clipping search
bounds each group's weight range; then int4 round-to-nearest. The output is an HF-style AWQ checkpoint
(AutoAWQ "gemm" names and qweight packing, but fp16 fractional `zeros` instead of packed `qzeros`:
config.json quantization_config zero_point "fp16"; backend/kernels/w4a16.py) that backend.model.weights loads.
The fp layer output (not the quantized one) feeds the next layer, as llm-awq does.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm

from backend.kernels.w4a16 import SUPPORTED_GROUP_SIZES, pack_awq
from backend.model.quant_config import ZERO_POINT_FP16

from .awq_refine import gptq_quantize, refine_groups
from .awq_search import dequantize, gram, quantize_rtn, search_clip, search_scale
from .calibrate import calib_windows, calibrate, load_stats
from .layerwise import LayerwiseCheckpoint, layer_forward
from .quant_family import QuantFamily

log = logging.getLogger(__name__)

# awq_refine / awq_gptq: AWQ's scales, then tools/awq_refine.py (per-group refinement / GPTQ error feedback)
METHODS = ("awq", "rtn", "awq_refine", "awq_gptq")
# awq_gptq's defaults (tools/awq_refine.py gptq_quantize): 1% damping, left-to-right, shrink grid of the ranges
GPTQ_DEFAULTS = {"damp": 0.01, "act_order": False, "joint": False, "shrinks": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75),
                 "scale_search": False, "refit": 0}
GPTQ_RATIOS = (0.0, 0.2, 0.4, 0.6)     # AWQ ratios tried when GPTQ's own error judges them (scale_search)


def valid_group_sizes(in_features) -> list:
    return [g for g in SUPPORTED_GROUP_SIZES if all(f % g == 0 for f in in_features)]


def check_quant_args(ckpt: LayerwiseCheckpoint, w_bits: int, group_size: Optional[int]) -> int:
    """-> the group size to use (None picks the largest that fits); clear errors for anything unsupported."""
    if w_bits != 4:
        raise ValueError(f"w_bits must be 4 (W4A16 int4 weights), got {w_bits}")
    cfg = ckpt.cfg
    ins = {"hidden_size": cfg.hidden_size, "q_size (o_proj input)": cfg.q_size,
           "intermediate_size (down_proj input)": cfg.intermediate_size}
    valid = valid_group_sizes(ins.values())
    if group_size is None:
        if not valid:
            raise ValueError(f"no supported group size {SUPPORTED_GROUP_SIZES} divides the in_features {ins}")
        return valid[-1]
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"w_group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    bad = {k: v for k, v in ins.items() if v % group_size}
    if bad:
        raise ValueError(f"w_group_size {group_size} does not divide in_features {bad} of {cfg.arch}; "
                         f"group sizes that work for this model: {valid or 'none'}")
    return group_size


def _gptq_opts(gptq: Optional[dict]) -> dict:
    opts = dict(GPTQ_DEFAULTS, **(gptq or {}))
    opts.pop("scale_search")
    return opts


def fold_scales(w: Dict[str, torch.Tensor], fam: QuantFamily, group_size: int, sig: Dict[str, torch.Tensor],
                stats: dict, n_grid: int = 20, gptq: Optional[dict] = None) -> list:
    """AWQ's scale search per scale group, folded into w in place (norm weight / s, or the previous linear's
    rows / s; the linears' columns * s); sig (input name -> E[x x^T]) becomes the moments of x / s.
    gptq with scale_search: the ratios (GPTQ_RATIOS) judged by GPTQ's error instead of round-to-nearest's.
    -> report strings "input:ratio/error vs RTN"."""
    report = []
    quant, ratios = None, None
    if gptq and gptq.get("scale_search"):
        opts = _gptq_opts(gptq)
        quant, ratios = (lambda ws, sg: dequantize(*gptq_quantize(ws, sg, group_size, **opts))), GPTQ_RATIOS
    for g in fam.groups:
        ws = [w[lin + ".weight"] for lin in g.linears]
        prev = w[g.prev + ".weight"]
        if prev.shape[0] != ws[0].shape[1]:
            continue                     # e.g. v -> o under GQA: v's outputs are not o's inputs one to one
        s, ratio, rel = search_scale(ws, sig[g.inp], stats[g.inp]["absmean"], group_size, n_grid, quant, ratios)
        report.append(f"{g.inp}:{ratio:.2f}/{rel:.2f}")
        if g.prev in fam.norms:
            w[g.prev + ".weight"] = prev / s
        else:                            # a linear [out, in]: its output rows carry the 1/s
            w[g.prev + ".weight"] = prev / s[:, None]
            if g.prev + ".bias" in w:
                w[g.prev + ".bias"] = w[g.prev + ".bias"] / s
        for lin in g.linears:
            w[lin + ".weight"] = w[lin + ".weight"] * s
        sig[g.inp] = sig[g.inp] / s[:, None] / s[None, :]    # moments of the scaled input x / s
    return report


def quantize_linear(weight: torch.Tensor, sigma: Optional[torch.Tensor], group_size: int, method: str,
                    clip_it: bool = True, n_grid: int = 20, gptq: Optional[dict] = None):
    """One (scaled) linear [out, in] -> (codes uint8 [out, in], scales fp16 [out, ng], zeros fp16 [out, ng]).
    gptq: keyword arguments of gptq_quantize (damp, act_order, joint) for awq_gptq."""
    if method == "awq_gptq":
        return gptq_quantize(weight, sigma, group_size, **_gptq_opts(gptq))
    clip = None
    if method != "rtn" and clip_it:
        clip = search_clip(weight, sigma, group_size, n_grid)
    codes, scales, zeros = quantize_rtn(weight, group_size, clip)   # [out, in], [out, ng], [out, ng]
    if method == "awq_refine":
        codes, scales, zeros = refine_groups(weight, codes, scales, zeros, sigma, group_size)
    return codes, scales, zeros


def _pack(out: Dict[str, torch.Tensor], lin: str, codes, scales, zeros) -> None:
    out[lin + ".qweight"] = pack_awq(codes.t().contiguous())          # [in, out / 8]
    out[lin + ".zeros"] = zeros.t().contiguous()                      # [in / g, out] fp16
    out[lin + ".scales"] = scales.t().contiguous()                    # [in / g, out] fp16


def quantize_layer(w: Dict[str, torch.Tensor], fam: QuantFamily, group_size: int, method: str,
                   sigmas: Optional[Dict[str, torch.Tensor]] = None, stats: Optional[dict] = None,
                   n_grid: int = 20, gptq: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """One decoder layer, HF suffix -> float32 tensor. sigmas: input name -> E[x x^T] [C, C] (awq only);
    stats: that layer's calibration statistics (awq only). -> HF suffixes of the quantized layer."""
    w = dict(w)
    sig = dict(sigmas or {})
    inp_of = {lin: g.inp for g in fam.groups for lin in g.linears}
    report = []
    if method != "rtn":
        report = fold_scales(w, fam, group_size, sig, stats, n_grid, gptq if method == "awq_gptq" else None)
    out = {k: v for k, v in w.items() if not any(k.startswith(lin + ".weight") for lin in fam.linears)}
    for lin in fam.linears:
        _pack(out, lin, *quantize_linear(w[lin + ".weight"], sig.get(inp_of[lin]), group_size, method,
                                         lin not in fam.no_clip, n_grid, gptq))
    if report:
        log.debug("awq scale ratio / error vs RTN: %s", " ".join(report))
    return out


def _write_checkpoint(ckpt: LayerwiseCheckpoint, out_dir: Path, tensors: Dict[str, torch.Tensor],
                      group_size: int, method: str) -> None:
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ckpt.model_dir.iterdir():          # tokenizer, generation config, chat template ...
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and f.name not in (
                "config.json", "model.safetensors.index.json", "quant_config.json"):
            shutil.copy2(f, out_dir / f.name)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": ZERO_POINT_FP16,
          "version": "gemm", "modules_to_not_convert": None}
    hf = dict(ckpt.hf_config, quantization_config=qc)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    (out_dir / "quant_config.json").write_text(json.dumps(
        {"w_bit": 4, "q_group_size": group_size, "zero_point": ZERO_POINT_FP16, "version": "GEMM",
         "lmtriton_method": method},
        indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "quantization": f"awq w4 g{group_size} ({method})"})


def quantize_model(model_dir, out_dir, w_bits: int = 4, group_size: Optional[int] = 128, calib=None,
                   method: str = "awq", search_tokens: int = 4096, batch: int = 4, progress: bool = True,
                   n_grid: int = 20, gptq: Optional[dict] = None, true_sequential: bool = False,
                   asym_target: bool = False) -> Path:
    """Quantize an HF checkpoint into an HF-style AWQ checkpoint in out_dir.
    calib: a work dir holding `lite calibrate` statistics; None calibrates first (32 x 512 wiki tokens) into
    out_dir. method rtn: plain round-to-nearest (no calibration). group_size None: the largest that fits.
    n_grid: points of the scale and clip grids (fewer: faster, slightly less accurate). gptq: awq_gptq options
    (damp, act_order, joint; GPTQ_DEFAULTS). true_sequential: each linear on inputs from the quantized ones
    before it (tools/awq_seq.py; about 4 more layer forwards per layer). asym_target (with true_sequential):
    each linear fitted to the fp model's output on the quantized input (a second, fp stream of hidden states)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1 (1: no AWQ scales), got {n_grid}")
    if true_sequential and method == "rtn":
        raise ValueError("true_sequential needs calibration: method must be one of awq, awq_refine, awq_gptq")
    if asym_target and not true_sequential:
        raise ValueError("asym_target needs true_sequential")
    bad = set(gptq or {}) - set(GPTQ_DEFAULTS)
    if bad:
        raise ValueError(f"gptq options must be among {sorted(GPTQ_DEFAULTS)}, got {sorted(bad)}")
    if gptq and not 0 < gptq.get("damp", 0.01) <= 1:
        raise ValueError(f"gptq damp must be in (0, 1], got {gptq['damp']}")
    t0 = time.time()
    ckpt = LayerwiseCheckpoint(model_dir)
    cfg, fam = ckpt.cfg, ckpt.family
    group_size = check_quant_args(ckpt, w_bits, group_size)
    out_dir = Path(out_dir)
    stats, x = None, None
    if method != "rtn":
        if calib is None:
            calibrate(model_dir, out_dir, samples=32, seqlen=512, progress=progress)
            calib = out_dir
        stats = load_stats(calib, cfg.num_layers)
        meta = stats["meta"]
        n = min(meta["samples"], max(1, math.ceil(search_tokens / meta["seqlen"])))
        x = ckpt.embed(calib_windows(model_dir, meta["calib_text"], n, meta["seqlen"], meta["seed"]))  # [n, S, H]
    pre = f"{fam.layers}."
    tensors = {n: ckpt.get(n) for n in ckpt.non_layer_names()}
    dtype = tensors[f"{fam.embed}.weight"].dtype
    x_fp = x if asym_target else None
    with torch.inference_mode():
        for i in tqdm(range(cfg.num_layers), desc=f"{method} g{group_size}", unit="layer", disable=not progress):
            w = ckpt.layer(i)
            sigmas = None
            if true_sequential:
                from .awq_seq import quantize_layer_sequential
                q, x, x_fp = quantize_layer_sequential(w, cfg, fam, x, group_size, method, stats["layers"][i],
                                                       n_grid, gptq, batch, x_fp)
            elif x is not None:
                sums: Dict[str, torch.Tensor] = {}

                def observe(name, t):
                    if name not in ("k", "v"):
                        sums[name] = sums[name] + gram(t) if name in sums else gram(t)
                x = layer_forward(w, cfg, fam, x, observe, batch)
                tokens = x.shape[0] * x.shape[1]
                sigmas = {k: v / tokens for k, v in sums.items()}
            if not true_sequential:
                q = quantize_layer(w, fam, group_size, method, sigmas, stats["layers"][i] if stats else None,
                                   n_grid, gptq)
            for k, v in q.items():
                tensors[f"{pre}{i}.{k}"] = v.to(dtype) if v.dtype == torch.float32 else v
    _write_checkpoint(ckpt, out_dir, tensors, group_size, method)
    log.info("%s g%d of %s -> %s in %.1fs", method, group_size, model_dir, out_dir, time.time() - t0)
    return out_dir


def quantize(model_dir, out_dir, group_size: Optional[int] = None, **kwargs) -> Path:
    """What `lmtriton convert --quant awq` calls: AWQ with the largest group size the model allows."""
    return quantize_model(model_dir, out_dir, group_size=group_size, **kwargs)

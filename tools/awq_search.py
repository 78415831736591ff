"""AWQ's building blocks as small pure functions: group-wise int4 round-to-nearest, the activation-aware scale
search and the weight-clipping search.

Both searches minimise the squared output error of a linear over the calibration tokens X [T, C]. For a weight
error dW [out, C] that error is sum_t |dW x_t|^2 = tr(dW Sigma dW^T) * T with Sigma = X^T X / T, so the searches
need only the C x C second-moment matrix of the input (`gram`), not the tokens: every grid point then costs
out * C^2 flops instead of T * out * C, and the number of calibration tokens stops mattering.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from backend.kernels.w4a16 import QMAX as QMAX4, round_zeros


def quantize_rtn(w: torch.Tensor, group_size: int, clip: Optional[torch.Tensor] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes uint8 [out, in] in 0..15, scales fp16 [out, in // g], zeros fp16 [out, in // g]).
    Asymmetric per group of `group_size` input channels; W ~= (codes - zeros) * scales, the zeros fractional on
    the checkpoint's 1/16 grid (backend/kernels/w4a16.py round_zeros), so a group's minimum maps to code 0 within
    1/32 of a step. clip [out, in // g] bounds |w| of each group before the range is taken (AWQ's clipping)."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_f}")
    wg = w.float().reshape(out_f, in_f // group_size, group_size)              # [out, ng, g]
    if clip is not None:
        wg = torch.maximum(torch.minimum(wg, clip[..., None]), -clip[..., None])
    hi, lo = wg.amax(-1), wg.amin(-1)
    scales = ((hi - lo) / QMAX4).clamp_min(1e-5).half()                        # the checkpoint stores fp16
    s = scales.float()
    zeros = round_zeros(-lo / s)
    codes = codes_for(wg, s[..., None], zeros.float()[..., None])
    return codes.reshape(out_f, in_f).to(torch.uint8), scales, zeros


def codes_for(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The int4 codes (as float) of w under scale s and zero z (broadcast): round(w / s + z) in 0..15. Every
    quantizer here rounds this way, so what the searches measure is what the checkpoint stores."""
    return torch.round(w / s + z).clamp_(0, QMAX4)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_rtn: -> float32 [out, in]."""
    out_f, in_f = codes.shape
    g = in_f // scales.shape[1]
    q = codes.float().reshape(out_f, -1, g)                                     # [out, ng, g]
    return ((q - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)


def fake_quant(w: torch.Tensor, group_size: int, clip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dequantize(*quantize_rtn(w, group_size, clip)) in float32, with fewer passes (the searches' hot loop)."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group_size, group_size)              # [out, ng, g]
    if clip is not None:
        wg = torch.maximum(torch.minimum(wg, clip[..., None]), -clip[..., None])
    hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    s = ((hi - lo) / QMAX4).clamp_min_(1e-5).half().float()
    z = round_zeros(-lo / s).float()
    return codes_for(wg, s, z).sub_(z).mul_(s).reshape(out_f, in_f)


def gram(x: torch.Tensor) -> torch.Tensor:
    """x [T, C] -> X^T X [C, C] (float32; unnormalised, add over batches and divide by the token count)."""
    x = x.float()
    return x.t() @ x


def output_error(dw: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean squared output error per token of a weight error dw [out, C] under input moments sigma [C, C]."""
    return ((dw @ sigma) * dw).sum()


def search_scale(weights: List[torch.Tensor], sigma: torch.Tensor, x_mean: torch.Tensor, group_size: int,
                 n_grid: int = 20, quant: Optional[Callable] = None, ratios=None) -> Tuple[torch.Tensor, float, float]:
    """AWQ per-input-channel scale for linears sharing one input. weights: [out_i, C] each; x_mean [C] = mean |x|.
    s = x_mean ** ratio (normalised), ratio on a grid in [0, 1) (or `ratios`); ratio 0 is plain RTN, so the result
    never has a larger output error than RTN. quant(w_scaled, sigma_scaled) -> dequantized w_scaled replaces
    round-to-nearest as the quantizer the ratios are judged by (e.g. GPTQ). -> (s [C], best ratio, its error
    relative to ratio 0's)."""
    w = torch.cat([x.float() for x in weights], 0)                            # [sum out, C]
    x_mean = x_mean.float().clamp_min(1e-8)
    best, best_s, best_ratio, rtn_err = None, None, 0.0, None
    for ratio in (ratios if ratios is not None else [i / n_grid for i in range(n_grid)]):
        s = x_mean.pow(ratio).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if quant is None:
            deq = fake_quant(w * s, group_size)
        else:
            deq = quant(w * s, sigma / s[:, None] / s[None, :])
        err = output_error(deq / s - w, sigma)
        if rtn_err is None:
            rtn_err = err
        if best is None or err < best:
            best, best_s, best_ratio = err, s, ratio
    return best_s, best_ratio, float(best / rtn_err.clamp_min(1e-30))


def search_clip(w: torch.Tensor, sigma: torch.Tensor, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (output channel, group) bound on |w| minimising that group's output error under sigma.
    w [out, C], sigma [C, C] -> clip [out, C // g] (shrink 1.0, i.e. no clipping, is on the grid)."""
    out_f, c = w.shape
    ng = c // group_size
    w = w.float()
    idx = torch.arange(ng)
    blocks = sigma.reshape(ng, group_size, ng, group_size)[idx, :, idx, :]    # [ng, g, g] diagonal blocks
    wg = w.reshape(out_f, ng, group_size)                                       # [out, ng, g]
    org_max = wg.abs().amax(-1)                                                 # [out, ng]
    best_err = torch.full((out_f, ng), float("inf"))
    best_clip = org_max.clone()
    for i in range(int(max_shrink * n_grid)):
        clip = org_max * (1 - i / n_grid)
        d = (fake_quant(w, group_size, clip) - w).reshape(out_f, ng, group_size)
        err = torch.einsum("oni,nij,onj->on", d, blocks, d)                   # [out, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, clip, best_clip)
    return best_clip

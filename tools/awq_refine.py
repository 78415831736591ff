"""A refinement of AWQ's groups (method "awq_refine"): per (output channel, group), alternate
  codes  q = clamp(round(w / s + z), 0, 15)                    (given s, z)
  scale  s = argmin_s (s (q - z) - w)^T B (s (q - z) - w)      (closed form, then rounded to fp16)
  zero   z = round_zeros(z*), z* the continuous optimum        (given q, s; the checkpoint's 1/16 grid in 0..15)
with B the group's diagonal block of the input moments Sigma (the activation-weighted output error of
tools/awq_search.py restricted to the group), keeping per group whichever iterate had the smallest error.
It starts from AWQ's clipped round-to-nearest (scale search and clip search unchanged), so it never does worse
on that objective. Same checkpoint format as AWQ's (fp16 scales, fp16 zeros on the 1/16 grid).
"""
from __future__ import annotations

from typing import Tuple

import torch

from backend.kernels.w4a16 import round_zeros

from .awq_search import QMAX4, codes_for, dequantize


def _blocks(sigma: torch.Tensor, group_size: int) -> torch.Tensor:
    ng = sigma.shape[0] // group_size
    idx = torch.arange(ng)
    return sigma.reshape(ng, group_size, ng, group_size)[idx, :, idx, :].float()   # [ng, g, g]


def _err(d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oni,nij,onj->on", d, b, d)                               # [out, ng]


def refine_groups(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  sigma: torch.Tensor, group_size: int, iters: int = 6
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] (the weight AWQ quantized, after its scaling; unclipped), quantize_rtn's (codes, scales,
    zeros), sigma [in, in] -> refined (codes, scales, zeros) in the same dtypes and shapes."""
    out_f, in_f = w.shape
    ng = in_f // group_size
    b = _blocks(sigma, group_size)
    wg = w.float().reshape(out_f, ng, group_size)
    q = codes.float().reshape(out_f, ng, group_size)
    s, z = scales.float(), zeros.float()                                           # [out, ng]
    best_err = _err(s[..., None] * (q - z[..., None]) - wg, b)
    best_q, best_s, best_z = q.clone(), s.clone(), z.clone()
    bsum = b.sum(-1)                                                               # [ng, g]: B 1
    for _ in range(iters):
        # scale given codes and zero
        u = q - z[..., None]                                                       # [out, ng, g]
        bu = torch.einsum("nij,onj->oni", b, u)
        num, den = (wg * bu).sum(-1), (u * bu).sum(-1)
        s = torch.where(den > 0, num / den.clamp_min(1e-30), s).clamp_min(1e-5).half().float()
        # zero given codes and scale: d(z) = s q - w - s z 1 -> z* = 1^T B (s q - w) / (s 1^T B 1)
        r = s[..., None] * q - wg
        zc = torch.einsum("ni,oni->on", bsum, r) / (s * bsum.sum(-1)).clamp_min(1e-30)
        z = round_zeros(zc).float()
        # codes given scale and zero
        q = codes_for(wg, s[..., None], z[..., None])
        err = _err(s[..., None] * (q - z[..., None]) - wg, b)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q, best_q)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return (best_q.reshape(out_f, in_f).to(torch.uint8), best_s.half(), best_z.half())


def _group_range(grp: torch.Tensor, b: torch.Tensor, shrinks, joint: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp16-exact scale, zero on the 1/16 grid) per row of grp [out, g]: min / max shrunk by the factor (on the
    grid) whose round-to-nearest error under the group's moments b [g, g] is smallest. joint: every scale
    candidate (the shrunk ranges / 15 and the lattice step of the group's distinct values, as a Q4_1 group has)
    is tried with zeros around its min-based one (-1/2 .. +1/2 of a step by quarters: the min-based zero already
    puts the minimum on code 0, so whole-step shifts would only clamp), and the best (scale, zero) pair is kept."""
    cands = []
    for f in shrinks:
        hi, lo = grp.amax(1) * f, grp.amin(1) * f
        cands.append((((hi - lo) / QMAX4).clamp_min(1e-5).half().float(), lo))
    if joint:
        cands.append((_lattice_step(grp), grp.amin(1)))
    best = None
    for s, lo in cands:
        for dz in ((-0.5, -0.25, 0.0, 0.25, 0.5) if joint else (0.0,)):
            z = round_zeros(-lo / s + dz).float()
            d = (codes_for(grp, s[:, None], z[:, None]) - z[:, None]) * s[:, None] - grp
            err = ((d @ b) * d).sum(1)
            if best is None:
                best = (err, s, z)
            else:
                better = err < best[0]
                best = tuple(torch.where(better, n, o) for n, o in zip((err, s, z), best))
    return best[1], best[2]


def _lattice_step(grp: torch.Tensor) -> torch.Tensor:
    """Per row of grp [out, g]: the step of the regular grid its values lie on (range / n for n <= 15 levels
    apart, n from the smallest gap between distinct values), or range / 15 when there is none."""
    v = grp.sort(1).values
    rng = (v[:, -1] - v[:, 0]).clamp_min(1e-8)
    gaps = v.diff(dim=1)
    gaps = torch.where(gaps > 1e-3 * rng[:, None], gaps, torch.full_like(gaps, float("inf")))
    n = torch.round(rng / gaps.amin(1)).clamp(1, 10 ** 6)
    s = torch.where(n <= QMAX4, rng / n, rng / QMAX4)
    return s.clamp_min(1e-5).half().float()


def _row_error(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
    d = dequantize(codes, scales, zeros) - w
    return ((d @ sigma) * d).sum(1)                                                # [out]


def refit_rows(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               sigma: torch.Tensor, group_size: int, chunk: int = 32
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Given the codes, every group's (scale, zero) of a row refitted together to the row's output error under
    the full input moments sigma [in, in] (not only the group's diagonal block, so the groups' errors may cancel):
    W_hat = a_g q - b_g on group g's columns is linear in (a, b), a least-squares problem of 2 x ng unknowns per
    row; then s = fp16(a), z = round_zeros(b / s). A row keeps its old (scale, zero) where that rounded refit is
    not better. -> (scales fp16, zeros fp16), [out, in // g] each."""
    out_f, in_f = w.shape
    ng, g = in_f // group_size, group_size
    w, sigma = w.float(), sigma.float()
    blk = sigma.reshape(ng, g, ng, g)                                              # [ng, g, ng, g]
    sbb = blk.sum((1, 3))                                                          # [ng, ng]
    srow = blk.sum(3)                                                              # [ng, g, ng]
    v = (w @ sigma).reshape(out_f, ng, g)                                          # Sigma w, per row
    q = codes.float().reshape(out_f, ng, g)

    new_s, new_z = scales.float().clone(), zeros.float().clone()
    for o0 in range(0, out_f, chunk):
        qc = q[o0:o0 + chunk]                                                      # [c, ng, g]
        saa = torch.einsum("ogi,gihj,ohj->ogh", qc, blk, qc)
        sab = -torch.einsum("ogi,gih->ogh", qc, srow)
        m = torch.cat([torch.cat([saa, sab], 2), torch.cat([sab.transpose(1, 2), sbb.expand_as(saa)], 2)], 1)
        m = m + 1e-6 * m.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None] * torch.eye(2 * ng)
        r = torch.cat([(qc * v[o0:o0 + chunk]).sum(-1), -v[o0:o0 + chunk].sum(-1)], 1)   # [c, 2 ng]
        x = torch.linalg.solve(m, r)
        a, b = x[:, :ng], x[:, ng:]
        ok = a > 1e-5
        s_new = torch.where(ok, a, new_s[o0:o0 + chunk]).half().float()
        new_s[o0:o0 + chunk] = s_new
        new_z[o0:o0 + chunk] = torch.where(ok, round_zeros(b / s_new).float(), new_z[o0:o0 + chunk])
    better = _row_error(w, codes, new_s, new_z, sigma) < _row_error(w, codes, scales, zeros, sigma)
    s_out = torch.where(better[:, None], new_s, scales.float())
    z_out = torch.where(better[:, None], new_z, zeros.float())
    return s_out.half(), z_out.half()


def gptq_quantize(w: torch.Tensor, sigma: torch.Tensor, group_size: int, damp: float = 0.01, block: int = 128,
                  shrinks=(1.0,), act_order: bool = False, joint: bool = False, refit: int = 0
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ in the same format: columns quantized in turn, each column's rounding error spread over the columns
    not yet quantized through the inverse Hessian (H = Sigma + damp * mean diag). Without act_order the columns
    go left to right and each group's (fp16 scale, fractional zero) comes from the group as updated when its first
    column comes up; with act_order they go by descending Hessian diagonal, and the groups ("static groups",
    still the checkpoint's consecutive columns) take their ranges from w before any update. Ranges: the best
    of `shrinks` (and with joint, the joint scale / zero search of _group_range) under the group's moments.
    refit N: then N rounds of refit_rows (each row's scales and zeros refitted to the codes), the rounds after
    the first re-running GPTQ's codes with the refitted ranges held fixed; each row keeps its best round.
    -> (codes uint8 [out, in], scales fp16 [out, in // g], zeros fp16 [out, in // g])."""
    out_f, in_f = w.shape
    w0 = w.float()
    w = w.float().clone()
    sigma = sigma.float()
    h = sigma.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(in_f)
    ng = in_f // group_size
    scales, zeros = torch.zeros(out_f, ng), torch.zeros(out_f, ng)
    if act_order:
        for gi in range(ng):
            sl = slice(gi * group_size, (gi + 1) * group_size)
            scales[:, gi], zeros[:, gi] = _group_range(w[:, sl], sigma[sl, sl], shrinks, joint)
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(in_f)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    def gptq_codes(fixed: bool) -> torch.Tensor:
        """One GPTQ pass over (a copy of) w; fills scales / zeros per group unless fixed (or act_order)."""
        wp = w.clone()
        codes = torch.zeros(out_f, in_f)
        for b0 in range(0, in_f, block):
            b1 = min(b0 + block, in_f)
            wb, err = wp[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0)
            hb = hinv[b0:b1, b0:b1]
            for j in range(b1 - b0):
                col = int(perm[b0 + j])
                gi = col // group_size
                if not (act_order or fixed) and col % group_size == 0:
                    grp = torch.cat([wb[:, j:], wp[:, b1:]], 1)[:, :group_size]     # this group, as updated
                    sl = slice(col, col + group_size)
                    scales[:, gi], zeros[:, gi] = _group_range(grp, sigma[sl, sl], shrinks, joint)
                s, z = scales[:, gi], zeros[:, gi]
                x = wb[:, j]
                q = codes_for(x, s, z)
                codes[:, col] = q
                e = (x - (q - z) * s) / hb[j, j]
                wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
                err[:, j] = e
            wp[:, b1:] -= err @ hinv[b0:b1, b1:]
        return codes

    codes = gptq_codes(fixed=False)
    best = (codes, scales.clone(), zeros.clone())
    best_err = _row_error(w0, *best, sigma) if refit else None
    for r in range(refit):
        if r:
            codes = gptq_codes(fixed=True)
        s_new, z_new = refit_rows(w0, codes, scales, zeros, sigma, group_size)
        scales, zeros = s_new.float(), z_new.float()
        e = _row_error(w0, codes, scales, zeros, sigma)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = tuple(torch.where(better[:, None], n, o) for n, o in zip((codes, scales, zeros), best))
    codes, scales, zeros = best
    return codes.to(torch.uint8), scales.half(), zeros.half()

""""True sequential" quantization of one decoder layer (lite auto_awq --true-sequential [--asym-target]).

AWQ's scales come from the layer's input x, which is already the quantized previous layers' output; then the
linears are quantized group by group (qkv, o, gate_up, down), each on the moments of its input as the
already-quantized linears before it produce it. With x_fp (the fp model's hidden states at this layer) the
target is the fp model's output rather than the fp weights on the quantized input: each linear W becomes
  W* = W + W (Sigma_fq - Sigma_qq) (Sigma_qq + damp)^-1,   Sigma_fq = E[x_fp x_q^T], Sigma_qq = E[x_q x_q^T]
the least-squares map from the quantized stream's input to the fp stream's output (W itself when the streams
agree), and W* is what gets quantized, so each linear also corrects the error that reached its input.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch

from .awq import _pack, fold_scales, quantize_linear
from .awq_search import dequantize, gram
from .layerwise import layer_forward
from .quant_family import QuantFamily

log = logging.getLogger(__name__)


def _asym_target(wt: torch.Tensor, cross: torch.Tensor, sqq: torch.Tensor, damp: float) -> torch.Tensor:
    c = sqq.shape[0]
    h = sqq + damp * torch.diag(sqq).mean().clamp_min(1e-12) * torch.eye(c)
    return wt + torch.linalg.solve(h, (cross - sqq).t() @ wt.t()).t()     # W (S_fq - S_qq) H^-1, H symmetric


def quantize_layer_sequential(w: Dict[str, torch.Tensor], cfg, fam: QuantFamily, x: torch.Tensor,
                              group_size: int, method: str, stats: dict, n_grid: int = 20,
                              gptq: Optional[dict] = None, batch: int = 4, x_fp: Optional[torch.Tensor] = None,
                              damp: float = 0.01
                              ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """-> (HF suffixes of the quantized layer, the quantized layer's output, the fp layer's output when x_fp)."""
    w = dict(w)
    sums: Dict[str, torch.Tensor] = {}
    cross: Dict[str, torch.Tensor] = {}
    fp_in: Dict[str, list] = {}
    offset: Dict[str, int] = {}

    def observe(name, t):
        if name in ("k", "v"):
            return
        sums[name] = sums[name] + gram(t) if name in sums else gram(t)
        if x_fp is not None and name in fp_in:
            f = fp_in[name][offset.get(name, 0)]
            offset[name] = offset.get(name, 0) + 1
            c = f.t() @ t.float()
            cross[name] = cross[name] + c if name in cross else c

    def store(name, t):
        if name not in ("k", "v"):
            fp_in.setdefault(name, []).append(t.float().clone())
    tokens = x.shape[0] * x.shape[1]
    layer_forward(w, cfg, fam, x, observe, batch)
    sig = {k: v / tokens for k, v in sums.items()}
    report = fold_scales(w, fam, group_size, sig, stats, n_grid, gptq if method == "awq_gptq" else None)
    y_fp = layer_forward(w, cfg, fam, x_fp, store, batch) if x_fp is not None else None
    out = {}
    for gi, g in enumerate(fam.groups):
        if gi or x_fp is not None:                           # the input as the quantized linears before make it
            sums.clear(), cross.clear(), offset.clear()
            until = {"qkv": "o", "o": "o", "gate_up": "gate_up"}.get(g.inp)
            layer_forward(w, cfg, fam, x, observe, batch, until=until)
            sig[g.inp] = sums[g.inp] / tokens
        for lin in g.linears:
            wt = w[lin + ".weight"]
            if x_fp is not None:
                wt = _asym_target(wt, cross[g.inp] / tokens, sig[g.inp], damp)
            q = quantize_linear(wt, sig[g.inp], group_size, method, lin not in fam.no_clip, n_grid, gptq)
            _pack(out, lin, *q)
            w[lin + ".weight"] = dequantize(*q)
        fp_in.pop(g.inp, None)
    x = layer_forward(w, cfg, fam, x, None, batch)
    out.update({k: v for k, v in w.items() if not any(k.startswith(lin + ".weight") for lin in fam.linears)})
    if report:
        log.debug("awq scale ratio / error vs RTN: %s", " ".join(report))
    return out, x, y_fp

"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H]. Returns (norm(x + residual) * weight, x + residual); math in float32."""
    h = x.float() if residual is None else x.float() + residual.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), h.to(x.dtype)


def rms_norm(x, weight, eps, residual=None):
    return rms_norm_ref(x, weight, eps, residual)

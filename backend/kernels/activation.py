"""SiLU(gate) * up over the fused gate_up projection output."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] = [gate | up] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def silu_and_mul(x):
    return silu_and_mul_ref(x)

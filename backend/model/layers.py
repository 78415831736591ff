"""Linear layers over the engine's weight layout: dense or W4A16 (AWQ int4), same call either way."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..kernels import w4a16


class Linear:
    """y = x @ W^T (+ b). Dense: weight [out, in]. AWQ: qweight/qzeros/scales in the canonical format."""

    def __init__(self, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 qweight=None, qzeros=None, scales=None, group_size: int = 0):
        self.weight, self.bias = weight, bias
        self.qweight, self.qzeros, self.scales, self.group_size = qweight, qzeros, scales, group_size
        self._dense_cache: Optional[torch.Tensor] = None
        self.runtime = None       # kernel-specific prepared form (GPU W4A16), set by the model runner

    @classmethod
    def from_weights(cls, w: Dict[str, torch.Tensor], prefix: str, group_size: int = 0) -> "Linear":
        bias = w.get(prefix + ".bias")
        if prefix + ".qweight" in w:
            return cls(bias=bias, qweight=w[prefix + ".qweight"], qzeros=w[prefix + ".qzeros"],
                       scales=w[prefix + ".scales"], group_size=group_size)
        return cls(weight=w[prefix + ".weight"], bias=bias)

    @property
    def is_quantized(self) -> bool:
        return self.qweight is not None

    @property
    def out_features(self) -> int:
        return self.scales.shape[1] if self.is_quantized else self.weight.shape[0]

    def dense_weight(self) -> torch.Tensor:
        """[out, in] weight (dequantized for AWQ; computed once)."""
        if not self.is_quantized:
            return self.weight
        if self._dense_cache is None:
            self._dense_cache = w4a16.dequantize_awq(self.qweight, self.qzeros, self.scales,
                                                     self.group_size).t().contiguous()
        return self._dense_cache

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_quantized and x.is_cuda:
            return w4a16.w4a16_linear(x, self)
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

"""Linear layers over the engine's weight layout: dense or W4A16 (AWQ int4), same call either way."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..kernels import dense_decode, w4a16
from ..kernels.w4a16_runtime import TILE_N, W4A16Runtime, unrepack


class Linear:
    """y = x @ W^T (+ b). Dense: weight [out, in]. AWQ: qweight/zeros/scales in the canonical format
    (backend/kernels/w4a16.py; AutoAWQ's packed qzeros are converted on load), or only the kernels' runtime
    layout (rt_qweight/rt_zeros/rt_scales, fp16 scale pairs: w4a16_runtime.random_runtime)."""

    def __init__(self, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 qweight=None, zeros=None, scales=None, group_size: int = 0):
        self.weight, self.bias = weight, bias
        self.qweight, self.zeros, self.scales, self.group_size = qweight, zeros, scales, group_size
        self._dense_cache: Optional[torch.Tensor] = None
        self.runtime = None       # kernel-specific prepared form (GPU W4A16), set by the model runner

    @classmethod
    def from_weights(cls, w: Dict[str, torch.Tensor], prefix: str, group_size: int = 0) -> "Linear":
        bias = w.get(prefix + ".bias")
        if prefix + ".rt_qweight" in w:      # W4A16 already in the kernels' layout (random benchmark weights)
            scales = w[prefix + ".rt_scales"]
            lin = cls(bias=bias, group_size=group_size)
            lin.runtime = W4A16Runtime(qweight=w[prefix + ".rt_qweight"], zeros=w[prefix + ".rt_zeros"],
                                       scales={torch.float16: scales}, in_features=scales.shape[1] * group_size,
                                       out_features=scales.shape[0] * TILE_N, group_size=group_size)
            return lin
        if prefix + ".qweight" in w:
            zeros = w.get(prefix + ".zeros")
            if zeros is None:            # AutoAWQ checkpoint or an older workspace: packed integer zeros
                zeros = w4a16.zeros_from_qzeros(w[prefix + ".qzeros"])
            # fp16 whatever the model dtype the loader cast floats to: grid values are exact in fp16, bf16, fp32
            return cls(bias=bias, qweight=w[prefix + ".qweight"], zeros=zeros.half(), scales=w[prefix + ".scales"],
                       group_size=group_size)
        return cls(weight=w[prefix + ".weight"], bias=bias)

    @property
    def is_quantized(self) -> bool:
        return self.qweight is not None or bool(self.runtime)

    @property
    def out_features(self) -> int:
        if self.qweight is None and self.runtime:
            return self.runtime.out_features
        return self.scales.shape[1] if self.is_quantized else self.weight.shape[0]

    def dense_weight(self) -> torch.Tensor:
        """[out, in] weight (dequantized for AWQ; computed once)."""
        if not self.is_quantized:
            return self.weight
        if self._dense_cache is None:
            if self.qweight is None:     # only the runtime layout: its (q, z, s) in canonical order
                q, z, s = unrepack(self.runtime, torch.float16)
                self._dense_cache = w4a16.dequantize(q, z, s, self.group_size).t().contiguous()
            else:
                self._dense_cache = w4a16.dequantize_awq(self.qweight, self.zeros, self.scales,
                                                         self.group_size).t().contiguous()
        return self._dense_cache

    def _w4a16_path(self, x: torch.Tensor) -> bool:
        return self.is_quantized and x.is_cuda and (self.qweight is not None or (
            w4a16._cupy.available(x) and x.dtype in (torch.float16, torch.bfloat16)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._w4a16_path(x):
            return w4a16.w4a16_linear(x, self)
        return dense_decode.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def gate_up_silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this fused [gate | up] projection: [..., in] -> [..., out / 2]; at 1-8 tokens on a GPU
        one kernel (the decode GEMV's epilogue; LMTRITON_FUSE_SILU=0: off), else the projection, then silu_and_mul."""
        if self._w4a16_path(x):
            return w4a16.gate_up_silu(x, self)
        return dense_decode.linear_silu(x, self.dense_weight().to(x.dtype), self.bias)

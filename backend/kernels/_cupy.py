"""One helper for every cupy RawKernel: lazy compile, cache per device, launch on torch's current stream.

RawKernel ignores strides, so `launch` asserts that every tensor argument is contiguous (pass `ptr(t)` for a
tensor whose strides the kernel takes as arguments). Scalars must be numpy scalars of the kernel's C type
(np.int32, np.float32): a bare Python float would be passed as a double. Kernel sources include no headers
(NVRTC finds none without a CUDA toolkit): a source that starts with `PRELUDE` gets fp16/bf16 conversions
through PTX.
Works with cupy 13 (numpy 1.x) and cupy 14 (numpy 2.x).
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

try:  # the CPU build and CI have no cupy; every op then uses its pure-torch reference
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None

# Compiled with -DIS_BF16=0|1: `scalar` is the activation type's bits, LOAD/STORE convert to and from float.
PRELUDE = r"""
typedef unsigned short u16;
typedef unsigned char u8;
__device__ __forceinline__ float h2f(u16 x) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 x; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f)); return x; }
__device__ __forceinline__ float bf2f(u16 x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ u16 f2bf(float f) { u16 x; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f)); return x; }
#if IS_BF16
#define LOADF(x) bf2f(x)
#define STOREF(x) f2bf(x)
#else
#define LOADF(x) h2f(x)
#define STOREF(x) f2h(x)
#endif
#define NEG_INF __int_as_float(0xff800000)
// 8 scalars packed in a uint4 <-> 8 floats
__device__ __forceinline__ void unpack8(const uint4 r, float* f) {
    const u16* h = reinterpret_cast<const u16*>(&r);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = LOADF(h[i]);
}
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 r; u16* h = reinterpret_cast<u16*>(&r);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = STOREF(f[i]);
    return r;
}
"""

_SCALAR_DTYPES = (torch.float16, torch.bfloat16)


def available(t: torch.Tensor) -> bool:
    return cupy is not None and t.is_cuda


def supports_dtype(t: torch.Tensor) -> bool:
    return t.dtype in _SCALAR_DTYPES


def dtype_options(dtype: torch.dtype) -> Tuple[str, ...]:
    if dtype not in _SCALAR_DTYPES:
        raise ValueError(f"cupy kernels take float16 or bfloat16, got {dtype}")
    return (f"-DIS_BF16={int(dtype == torch.bfloat16)}",)


@functools.lru_cache(maxsize=None)
def _module(source: str, options: Tuple[str, ...], device: int):
    with cupy.cuda.Device(device):
        log.debug("compiling a cupy module with %s", options)
        return cupy.RawModule(code=source, options=("--std=c++17",) + options)


def get_kernel(source: str, name: str, options: Sequence[str] = (), device: int = None):
    dev = torch.cuda.current_device() if device is None else device
    return _module(source, tuple(options), dev).get_function(name)


class _StreamRef:
    """The CUDA stream protocol (what cupy 14's Stream.from_external takes) over a raw stream handle."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


@functools.lru_cache(maxsize=None)
def _external_stream(handle: int, device: int):
    if hasattr(cupy.cuda.Stream, "from_external"):       # cupy 14
        with cupy.cuda.Device(device):
            return cupy.cuda.Stream.from_external(_StreamRef(handle))
    return cupy.cuda.ExternalStream(handle, device)     # cupy 13


def current_stream():
    s = torch.cuda.current_stream()
    return _external_stream(s.cuda_stream, s.device.index)


class ptr:
    """A tensor passed by address without the contiguity check (the kernel takes its strides as arguments)."""

    def __init__(self, t: torch.Tensor):
        assert t.stride(-1) == 1, "the innermost dimension must be contiguous"
        self.value = np.uint64(t.data_ptr())


def null_ptr() -> np.uint64:
    return np.uint64(0)


def _arg(a):
    if isinstance(a, torch.Tensor):
        assert a.is_contiguous(), "RawKernel ignores strides: pass contiguous tensors"
        return np.uint64(a.data_ptr())
    if isinstance(a, ptr):
        return a.value
    assert isinstance(a, np.generic), f"wrap scalars in np.int32 / np.float32 / np.int64, got {type(a)}"
    return a


def launch(kernel, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on torch's current stream (so it is captured by torch.cuda.graph like any torch op)."""
    stream = current_stream()
    with stream:
        kernel(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(_arg(a) for a in args),
               shared_mem=shared_mem)

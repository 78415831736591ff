"""One helper for every cupy RawKernel: lazy compile, cache per device, launch on torch's current stream.

RawKernel ignores strides, so `launch` asserts that every tensor argument is contiguous. Scalars must be numpy
scalars of the kernel's C type (np.int32, np.float32): a bare Python float would be passed as a double.
Works with cupy 13 (numpy 1.x) and cupy 14 (numpy 2.x).
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch

try:  # the CPU build and CI have no cupy; every op then uses its pure-torch reference
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None


def available(t: torch.Tensor) -> bool:
    return cupy is not None and t.is_cuda


@functools.lru_cache(maxsize=None)
def _module(source: str, options: Tuple[str, ...], device: int):
    with cupy.cuda.Device(device):
        return cupy.RawModule(code=source, options=("--std=c++17",) + options)


def get_kernel(source: str, name: str, options: Sequence[str] = (), device: int = None):
    dev = torch.cuda.current_device() if device is None else device
    return _module(source, tuple(options), dev).get_function(name)


@functools.lru_cache(maxsize=None)
def _external_stream(ptr: int, device: int):
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(ptr, device)
    return cupy.cuda.ExternalStream(ptr, device)


def current_stream():
    s = torch.cuda.current_stream()
    return _external_stream(s.cuda_stream, s.device.index)


def _arg(a):
    if isinstance(a, torch.Tensor):
        assert a.is_contiguous(), "RawKernel ignores strides: pass contiguous tensors"
        return a.data_ptr()
    return a


def launch(kernel, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on torch's current stream (so it is captured by torch.cuda.graph like any torch op)."""
    stream = current_stream()
    with stream:
        kernel(tuple(grid), tuple(block), tuple(_arg(a) for a in args), shared_mem=shared_mem)

"""One helper for every cupy RawKernel: lazy compile, cache per device, launch on torch's current stream.

RawKernel ignores strides, so `launch` asserts that every tensor argument is contiguous (pass `ptr(t)` for a
tensor whose strides the kernel takes as arguments). Scalars must be numpy scalars of the kernel's C type
(np.int32, np.float32): a bare Python float would be passed as a double. Kernel sources include no headers
(NVRTC finds none without a CUDA toolkit): a source that starts with `PRELUDE` gets fp16/bf16 conversions
through PTX.
Works with cupy 13 (numpy 1.x) and cupy 14 (numpy 2.x).

Programmatic dependent launch (PDL, sm_90+): `launch` passes the PROGRAMMATIC_STREAM_SERIALIZATION attribute
through the driver's cuLaunchKernelEx (cupy has no launch attributes), so a kernel's blocks are scheduled while
the previous kernel of the stream drains; CUDA graphs capture the attribute as a programmatic edge. Every kernel
therefore starts with PDL_BEGIN() (wait for the previous grid's results, then let the next grid launch); only
reads of static data (weights) may come before it, never a write. `LMTRITON_PDL`: auto (where supported: sm_90+)
| 1 (an error where unsupported) | 0 (cupy's own launch). The ctypes launch costs the same host time as cupy's
(docs/benchmarks.md), so eager steps use it too.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from typing import Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

try:  # the CPU build and CI have no cupy; every op then uses its pure-torch reference
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None

# griddepcontrol.wait returns at once in a kernel launched without the attribute, so every launch path is safe.
PDL_MACROS = r"""
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_WAIT()
#define PDL_TRIGGER()
#endif
// the previous grid's writes are visible after the wait; the next grid may launch (and wait) from the trigger on
#define PDL_BEGIN() do { PDL_WAIT(); PDL_TRIGGER(); } while (0)
""" + r"""
// Split reductions in the kernel (SPLIT_REDUCE, counters from `zeroed_scratch`): every block of a group publishes its
// part, then counts itself in; the block that counts last sees every part, finishes the group and resets the counter,
// so the counters are zero again for the next launch. Every thread of the block must call it (1-D blocks). Reads of
// the other blocks' parts go through L2 (ld_cg). One block finishes a group: right for small groups (a split decode
// attention head group), not for a 64 x 128 split-K GEMM tile (w4a16_gemm.py says what that measured).
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned expected) {
    __shared__ unsigned s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        s_last = atomicAdd(counter, 1u) == expected - 1;
        if (s_last) *counter = 0u;              // every block of the group has arrived: nobody else touches it
    }
    __syncthreads();
    const bool last = s_last;
    if (last) __threadfence();
    return last;
}
// not volatile (as CUDA's __ldcg): volatile asm loads stay in program order and each waits for the use of the last
__device__ __forceinline__ float ld_cg(const float* p) {
    float v; asm("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p)); return v;
}
"""

# Compiled with -DIS_BF16=0|1: `scalar` is the activation type's bits, LOAD/STORE convert to and from float.
PRELUDE = PDL_MACROS + r"""
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


@functools.lru_cache(maxsize=None)
def sm_count(device: int) -> int:
    """Streaming multiprocessors of `device` (grid sizing of the kernels)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def kernel_with_shared(source: str, name: str, options: Sequence[str], nbytes: int, device: int = None):
    """The compiled kernel, its dynamic shared-memory limit raised when static + `nbytes` pass the default 48 KB."""
    dev = torch.cuda.current_device() if device is None else device
    return _kernel_with_shared(source, name, tuple(options), nbytes, dev)


@functools.lru_cache(maxsize=None)
def _kernel_with_shared(source: str, name: str, options: Tuple[str, ...], nbytes: int, device: int):
    kernel = get_kernel(source, name, options, device)
    if nbytes + kernel.shared_size_bytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = nbytes
    return kernel


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


class ptr:
    """A tensor passed by address without the contiguity check (the kernel takes its strides as arguments)."""

    def __init__(self, t: torch.Tensor):
        assert t.stride(-1) == 1, "the innermost dimension must be contiguous"
        self.value = np.uint64(t.data_ptr())


def null_ptr() -> np.uint64:
    return np.uint64(0)


_scratch = {}
_outgrown = []     # replaced scratch buffers: a captured CUDA graph may still hold their address


def zeroed_scratch(name: str, nbytes: int, device: int):
    """A per-device buffer of at least `nbytes` (int32 elements), zero when allocated and kept for the process.
    Counters in one must be left zero (arrive_last resets its group's), and calls that share one must run in stream
    order (the engine uses one stream). A buffer that has to grow is replaced but never freed (graphs captured with
    it replay into it). None when it would have to grow during CUDA-graph capture: the caller then takes its path
    without it."""
    key = (name, device)
    buf = _scratch.get(key)
    if buf is None or buf.numel() * 4 < nbytes:
        if torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _outgrown.append(buf)
        words = max(-(-nbytes // 4), 2 * buf.numel() if buf is not None else 16384)
        buf = _scratch[key] = torch.zeros(words, dtype=torch.int32, device=f"cuda:{device}")
    return buf


def _arg(a):
    if isinstance(a, torch.Tensor):
        assert a.is_contiguous(), "RawKernel ignores strides: pass contiguous tensors"
        return np.uint64(a.data_ptr())
    if isinstance(a, ptr):
        return a.value
    assert isinstance(a, np.generic), f"wrap scalars in np.int32 / np.float32 / np.int64, got {type(a)}"
    return a


class _LaunchAttr(ctypes.Structure):          # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):        # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6


@functools.lru_cache(maxsize=None)
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    return lib


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """An integer tuning knob from the environment, refused by name when it is not an integer >= minimum."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """A string tuning knob from the environment, refused by name when it is not one of `choices`."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


# How the splits of split decode attention are combined: "block" = the last CTA of each (sequence, KV head) group in
# the kernel itself (arrive_last: no second launch), "kernel" = reduce_splits, a separate launch, "auto" = block for
# small grids only (paged_attention.block_reduce). LMTRITON_SPLIT_REDUCE.
SPLIT_REDUCE = env_choice("LMTRITON_SPLIT_REDUCE", "auto", ("auto", "block", "kernel"))

PDL_MODE = os.environ.get("LMTRITON_PDL", "auto")
_PDL_MODES = ("auto", "0", "1")


@functools.lru_cache(maxsize=None)
def _pdl_supported(device: int) -> bool:
    """griddepcontrol needs compute capability 9.0+, cuLaunchKernelEx a CUDA 12 driver."""
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        _driver()
    except (OSError, AttributeError):
        return False
    return True


@contextlib.contextmanager
def pdl_mode(mode: str):
    """Launches inside use LMTRITON_PDL=`mode`. A profile wants "0": with PDL a kernel queued behind a long one starts
    early and waits for it, and its measured time then includes the wait."""
    global PDL_MODE
    if mode not in _PDL_MODES:
        raise ValueError(f"PDL mode must be one of {', '.join(_PDL_MODES)}, got {mode!r}")
    saved, PDL_MODE = PDL_MODE, mode
    try:
        yield
    finally:
        PDL_MODE = saved


def pdl_enabled(device: int) -> bool:
    """Whether launches on `device` use PDL: PDL_MODE auto or 1 where supported (1 where unsupported: an error)."""
    if PDL_MODE not in _PDL_MODES:
        raise ValueError(f"LMTRITON_PDL must be one of {', '.join(_PDL_MODES)}, got {PDL_MODE!r}")
    if PDL_MODE == "0":
        return False
    ok = _pdl_supported(device)
    if PDL_MODE == "1" and not ok:
        raise RuntimeError("LMTRITON_PDL=1 needs a compute capability 9.0+ GPU and a CUDA 12 driver")
    return ok


class _PdlLauncher(threading.local):
    """Per thread: one argument buffer of 8-byte slots with its pointer array, and one launch config (the driver
    copies both at launch, so they are reused)."""

    MAX_ARGS = 32

    def __init__(self):
        self.buf = ctypes.create_string_buffer(8 * self.MAX_ARGS)
        base = ctypes.addressof(self.buf)
        self.params = (ctypes.c_void_p * self.MAX_ARGS)(*range(base, base + 8 * self.MAX_ARGS, 8))
        self.attr = _LaunchAttr(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
        self.attr.value[0] = 1
        self.cfg = _LaunchConfig(attrs=ctypes.pointer(self.attr), num_attrs=1)

    def __call__(self, kernel, grid, block, args, shared_mem: int, stream_handle: int) -> None:
        assert len(args) <= self.MAX_ARGS, f"{len(args)} kernel arguments, at most {self.MAX_ARGS}"
        data = b"".join([a.tobytes().ljust(8, b"\0") for a in args])   # every argument type is 4 or 8 bytes
        ctypes.memmove(self.buf, data, len(data))
        cfg = self.cfg
        cfg.grid[0], cfg.grid[1], cfg.grid[2] = grid
        cfg.block[0], cfg.block[1], cfg.block[2] = block
        cfg.shared_mem, cfg.stream = shared_mem, stream_handle
        err = _driver().cuLaunchKernelEx(ctypes.byref(cfg), kernel.kernel.ptr, self.params, None)   # the CUfunction
        if err:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err} (grid {grid}, block {block}, "
                               f"{shared_mem} bytes of shared memory)")


_launch_pdl = _PdlLauncher()


def launch(kernel, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on torch's current stream (so it is captured by torch.cuda.graph like any torch op), with PDL where
    the GPU has it."""
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
    args = tuple(_arg(a) for a in args)
    s = torch.cuda.current_stream()
    if pdl_enabled(s.device.index):
        _launch_pdl(kernel, grid, block, args, shared_mem, s.cuda_stream)
        return
    with _external_stream(s.cuda_stream, s.device.index):
        kernel(grid, block, args, shared_mem=shared_mem)

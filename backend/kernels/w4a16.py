"""W4A16 linear: int4 weights (AWQ, asymmetric, per-group scales and zeros), 16-bit activations.

Canonical format (what `lmtriton lite auto_awq` writes, what a Linear holds and the kernels take):
  qweight int32 [in, out // 8]      AutoAWQ "gemm" packing: nibble i of word j holds column 8*j + AWQ_ORDER[i]
  zeros   fp16  [in // g, out]      fractional zero points: multiples of ZERO_STEP = 1/16 in [0, 15]
  scales  fp16  [in // g, out]
  W[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o];  y = x @ W
A fractional zero holds a group's minimum within 1/32 of a step (w = s * q + m with z = -m / s, as GGUF Q4_1
stores groups), where an integer zero leaves up to half a step of offset on the whole group; on the 1/16 grid
q - z is exact in fp16 and bf16.
AutoAWQ checkpoints store integer zeros packed like qweight (`qzeros` int32 [in // g, out // 8]): the loader
turns them into this format with zeros_from_qzeros, exactly.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import _cupy, activation, w4a16_decode, w4a16_gemm, w4a16_gemv
from .w4a16_runtime import W4A16Runtime, repack, supports

log = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
ZERO_STEP = 1 / 16     # the grid of the zero points; the kernels compute q - z exactly on it
QMAX = 15


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """q: int [rows, cols] values 0..15 -> int32 [rows, cols // 8] in AWQ order."""
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"cannot pack {cols} columns: must be a multiple of 8")
    q = q.to(torch.int64).reshape(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64, device=q.device)
    for i, col in enumerate(AWQ_ORDER):
        packed |= (q[:, :, col] & 0xF) << (4 * i)
    return packed.to(torch.int32) if packed.max() < 2**31 else (packed - (packed >= 2**31) * 2**32).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols // 8] -> int32 [rows, cols] values 0..15."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*p.shape, 8, dtype=torch.int32, device=p.device)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = ((p >> (4 * i)) & 0xF).to(torch.int32)
    return out.reshape(p.shape[0], -1)


def round_zeros(z: torch.Tensor) -> torch.Tensor:
    """Zero points (any float) -> fp16 on the ZERO_STEP grid, clamped to [0, 15]."""
    return (torch.round(z.float() / ZERO_STEP) * ZERO_STEP).clamp(0, QMAX).half()


def zeros_from_qzeros(qzeros: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packed integer zeros int32 [in // g, out // 8] -> fp16 zeros [in // g, out] (exact)."""
    return unpack_awq(qzeros).half()


def dequantize(q, z, scales, group_size: int) -> torch.Tensor:
    """Unpacked codes q [in, out] and zeros z [in/g, out] (fractional or integer) -> W [in, out] in scales' dtype
    (float32 math)."""
    z = z.float().repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    return ((q.float() - z) * s).to(scales.dtype)


def dequantize_awq(qweight, zeros, scales, group_size: int) -> torch.Tensor:
    """Packed qweight and fp16 zeros [in/g, out] -> W [in, out] in scales' dtype (float32 math)."""
    return dequantize(unpack_awq(qweight), zeros, scales, group_size)


def w4a16_linear_ref(x: torch.Tensor, qweight, zeros, scales, group_size: int, bias=None) -> torch.Tensor:
    """x: [T, in] -> [T, out]."""
    w = dequantize_awq(qweight, zeros, scales, group_size).float()
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_rtn(weight: torch.Tensor, group_size: int):
    """Round-to-nearest asymmetric int4. weight: [out, in] -> (qweight, zeros fp16, scales) in the canonical format.

    Each group's range includes 0, so the zero point never clamps; the zero is fractional (round_zeros) and q is
    rounded against the fp16 scale and the zero that are stored, so |W - dequant| <= scale / 2 up to that
    scale's rounding and half a zero step.
    """
    out_features, in_features = weight.shape
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not one of {SUPPORTED_GROUP_SIZES}")
    if in_features % group_size or out_features % 8:
        raise ValueError(f"weight shape {tuple(weight.shape)}: in_features must be a multiple of group_size="
                         f"{group_size} and out_features a multiple of 8")
    w = weight.float().t().reshape(in_features // group_size, group_size, out_features)  # [in/g, g, out]
    wmax, wmin = w.amax(1).clamp(min=0), w.amin(1).clamp(max=0)                        # [in/g, out]
    scales = ((wmax - wmin) / 15).clamp(min=1e-6).half()
    s = scales.float()
    zeros = round_zeros(-wmin / s)
    q = (w / s.unsqueeze(1) + zeros.float().unsqueeze(1)).round().clamp(0, QMAX)     # [in/g, g, out]
    return pack_awq(q.reshape(in_features, out_features)), zeros, scales


def random_awq_linear(in_features: int, out_features: int, group_size: int = 128, dtype=torch.float16,
                      device="cpu", bias: bool = False, std: float = 0.02, seed: int = 0):
    """A Linear with random N(0, std) weights quantized RTN (benchmarks build W4A16 models of real shapes on the
    device). Scales are fp16 as the canonical format says; `dtype` is the bias's."""
    from ..model.layers import Linear  # layers imports this module
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen, device=device, dtype=torch.float32) * std
    qweight, zeros, scales = quantize_rtn(w, group_size)
    b = (torch.randn(out_features, generator=gen, device=device) * std).to(dtype) if bias else None
    return Linear(bias=b, qweight=qweight, zeros=zeros, scales=scales, group_size=group_size)


def prepare(linear) -> W4A16Runtime:
    """Re-pack a Linear's canonical AWQ tensors for the CUDA kernels once; stored in `linear.runtime`.

    Shapes the kernels do not take get `linear.runtime = False` and run as dequantized fp16 through cuBLAS.
    """
    K, N = linear.qweight.shape[0], linear.scales.shape[1]
    reason = supports(K, N, linear.group_size)
    if reason:
        log.warning("W4A16 %dx%d runs dequantized through cuBLAS: %s", K, N, reason)
        linear.runtime = False
        return None
    q = unpack_awq(linear.qweight)
    z = linear.zeros
    scales = linear.scales if linear.scales.dtype in (torch.float16, torch.bfloat16) else linear.scales.half()
    linear.runtime = repack(q, z, scales, linear.group_size)
    return linear.runtime


# Token counts where each CUDA path wins, measured by scripts/bench_kernels.py on an H200 (docs/benchmarks.md):
# the register-streaming decode GEMV up to 8 tokens (DECODE_MAX_TOKENS = 0 selects the ring GEMV there), then the
# ring GEMV or the split-K GEMM (below) up to 64 tokens; from 128 on, dequantize + cuBLAS beats the mma.sync GEMM
# at every M (the GEMM peaks near 210 TFLOP/s, cuBLAS near 650), so the plain GEMM's range (GEMV_MAX_TOKENS,
# GEMM_MAX_TOKENS] is empty here. It stays selectable for GPUs where it measures faster.
DECODE_MAX_TOKENS = w4a16_decode.MAX_TOKENS
GEMV_MAX_TOKENS = 64
GEMM_MAX_TOKENS = 64
# The split-K tensor-core GEMM replaces the ring GEMV from 48 tokens up to GEMV_MAX_TOKENS, and from
# SPLITK_MIN_TOKENS on weights of at least SPLITK_MIN_WEIGHTS (K x N). H200, 8 warps along N (128 channels a block),
# automatic split, TFLOP/s on 4096x4096 / 4096x11008 / 11008x4096: 64 tokens 133 / 183 / 193 (ring GEMV 114 / 119 /
# 131); 48 tokens 105 / 141 / 148 (ring 94 / 101 / 115); 32 tokens 91 / 135 / 139 (ring 94 / 92 / 116); at 16 the
# ring GEMV wins (scripts/bench_kernels.py --quick --gemm-only --gemm-tokens 16,32,48,64; docs/benchmarks.md).
SPLITK_MIN_TOKENS = _cupy.env_int("LMTRITON_W4A16_SPLITK_MIN", 32)
SPLITK_MIN_WEIGHTS = 32 * 2**20


def _use_splitk(T: int, rt: W4A16Runtime) -> bool:
    big = rt.in_features * rt.out_features >= SPLITK_MIN_WEIGHTS
    return SPLITK_MIN_TOKENS <= T <= GEMV_MAX_TOKENS and (T >= 48 or big)


def runtime_of(linear):
    """The Linear's runtime layout, prepared on first use (False: shapes the kernels do not take)."""
    return prepare(linear) if linear.runtime is None else linear.runtime


def w4a16_linear(x: torch.Tensor, linear) -> torch.Tensor:
    """x: [..., in] -> [..., out]. CUDA fp16/bf16: GEMV, tensor-core GEMM or dequant + cuBLAS by token count."""
    bias = linear.bias
    if not (_cupy.available(x) and _cupy.supports_dtype(x)):
        return w4a16_linear_ref(x, linear.qweight, linear.zeros, linear.scales, linear.group_size, bias)
    rt = runtime_of(linear)
    if rt is None or rt is False:
        return F.linear(x, linear.dense_weight().to(x.dtype), None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(-1, x.shape[-1])                                   # [T, in]
    if not x2.is_contiguous() or x2.data_ptr() % 16:   # the kernels read 16-byte pieces of each row
        x2 = x2.clone(memory_format=torch.contiguous_format)
    b = None if bias is None else bias.to(x.dtype).contiguous()
    T = x2.shape[0]
    if T == 0:
        y = x2.new_empty(0, rt.out_features)
    elif T <= DECODE_MAX_TOKENS:
        y = w4a16_decode.gemv(x2, rt, b)
    elif _use_splitk(T, rt):
        sm_count = w4a16_gemv.device_limits(x2.device.index)[0]
        y = w4a16_gemm.gemm(x2, rt, b, w4a16_gemm.splitk_config(T, rt.out_features, rt.in_features, sm_count))
    elif T <= GEMV_MAX_TOKENS:
        y = w4a16_gemv.gemv(x2, rt, b)
    elif T <= GEMM_MAX_TOKENS:
        y = w4a16_gemm.gemm(x2, rt, b)
    else:
        y = w4a16_gemm.dequant_matmul(x2, rt, b)
    return y.reshape(*x.shape[:-1], rt.out_features)


def gate_up_silu(x: torch.Tensor, linear) -> torch.Tensor:
    """silu(gate) * up of a fused [gate | up] W4A16 projection: x [..., in] -> [..., out / 2]. With FUSE_SILU, 1-8
    tokens on CUDA take w4a16_decode.gemv_silu (one kernel); everything else the projection, then silu_and_mul."""
    if activation.FUSE_SILU and _cupy.available(x) and _cupy.supports_dtype(x):
        rt = runtime_of(linear)
        x2 = x.reshape(-1, x.shape[-1])
        if rt and w4a16_decode.gated_supported(rt, x2.shape[0]) and x2.is_contiguous() and x2.data_ptr() % 16 == 0:
            b = None if linear.bias is None else linear.bias.to(x.dtype).contiguous()
            return w4a16_decode.gemv_silu(x2, rt, b).reshape(*x.shape[:-1], rt.out_features // 2)
    return activation.silu_and_mul(w4a16_linear(x, linear))

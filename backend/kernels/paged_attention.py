"""Attention of new query tokens over the paged KV cache (prefill chunks on top of cached prefixes, and decode).

The new tokens' K/V are written to the cache first; attention then reads the whole context from the cache.
Query token i of sequence b sits at position context_lens[b] - q_len_b + i and sees keys 0..that position.

GPU: rows with one new token go to the flash-decoding kernel (paged_attention_cuda.py), which reads only device
tensors and takes `max_context_len` as a static bound (a CUDA graph passes session_len); longer rows (prefill)
gather their blocks and run torch SDPA (flash / memory-efficient attention), see scripts/bench_attention.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _cupy
from .kv_cache import KVLayer, dequantize_ref, gather_kv_ref
from .paged_attention_cuda import DECODE_SOURCE
from .paged_attention_mma import MMA_SOURCE

PARTITION = 512          # tokens per split (128 when the grid is small, e.g. bs=1) up to the split cap; longer
SMALL_PARTITION = 128    # contexts get longer splits (split_len in the kernels)
SMALL_GRID = 64          # CTAs per split below which the small partition is used (bs=1; measured, docs)
# Split cap of the tensor-core kernel: at most this many CTAs an SM over all splits (0: no cap, splits cover the
# bound). When one split's grid already fills the GPU (bs=64 MHA: 2,048 CTAs), a CUDA graph captured at
# session_len would still launch a split per partition of the bound and a reduce pass; capped, long contexts get
# longer splits instead (H200, docs/benchmarks.md: W4A16 + KV int8 bs=64 at session_len 4,160 8,160 -> 8,463
# tok/s; MHA int8 16 x 4k 0.167 -> 0.157 ms). The CUDA-core kernel stays uncapped: it streams MHA fp16 best with
# many CTAs (16 x 4k: 0.248 ms with 8 splits, 0.261 with 3).
# The cap depends on the grid, never on the bound, so a graph still computes exactly what the eager path does.
SPLIT_CTAS_PER_SM = _cupy.env_int("LMTRITON_ATTN_SPLIT_CTAS", 8)
_KV_KIND = {"auto": 0, "int8": 1, "int4": 2}
# Decode kernel: "cuda" (CUDA cores, paged_attention_cuda.py), "mma" (tensor cores, paged_attention_mma.py, for
# GQA ratios <= 8; others fall back to "cuda") or "auto": mma for GQA or an int8/int4 cache, cuda for MHA with a
# 16-bit cache (measured on an H200, docs/benchmarks.md: mma 0.63x the cuda kernel's time for GQA 32:8 int8/int4,
# 0.95x fp16, 0.85x MHA int4, 1.08x MHA fp16). The bench and tests flip this module constant.
DECODE_IMPL = _cupy.env_choice("LMTRITON_DECODE_ATTN", "auto", ("auto", "cuda", "mma"))
MMA_TILES = 0            # tensor-core kernel: 16-token tiles in flight per warp (0: its default, 1/2/4 by KV kind)
# tensor-core kernel: CTAs an SM to budget registers for (0: 4 for a 16-bit cache with head_dim 128, where GQA
# 16 x 4k went 0.077 -> 0.071 ms; none for int8/int4, which slowed (0.055 -> 0.062 ms), nor head_dim 64 (15:5 x 64
# 0.025 -> 0.030 ms); 5-8 slower for all; H200, docs/benchmarks.md)
MMA_MINB = 0
# tensor-core kernel: which quantized caches take RAW codes (MAGIC + c into the mma, the offset folded into the zero
# points; paged_attention_mma.py) instead of exact codes (subtract, then dequantize V in registers). H100,
# 2026-12-06, 16 x 4k (docs/benchmarks.md, session 5): int4 GQA 32:8 48.3 -> 44.0 us, MHA 136.8 -> 119.4 us; int8
# slower (64.4 -> 66.7, 204 -> 210 us), so "int4" (LMTRITON_ATTN_RAW_CODES=int4|all|none).
_RAW_KINDS = {"none": (), "int4": ("int4",), "all": ("int8", "int4")}
MMA_RAW = _cupy.env_choice("LMTRITON_ATTN_RAW_CODES", "int4", tuple(_RAW_KINDS))
_LOG2E = 1.4426950408889634


@dataclass
class AttnMetadata:
    positions: torch.Tensor      # [T] int32, position of each new token
    slot_mapping: torch.Tensor   # [T] int32, cache slot of each new token
    block_tables: torch.Tensor   # [B, max_blocks] int32 (padded with 0)
    context_lens: torch.Tensor   # [B] int32, tokens in cache after this step (prefix + new)
    cu_seqlens_q: torch.Tensor   # [B + 1] int32, offsets of each sequence's new tokens in the flat batch
    q_lens: List[int]            # host copies, so the reference path never syncs
    ctx_lens: List[int]
    is_decode: bool              # every sequence has exactly one new token
    max_context_len: int


def paged_attention_ref(q: torch.Tensor, layer: KVLayer, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]; GQA by repeating each KV head over Hq // Hk query heads; float32 math."""
    out = torch.empty_like(q)
    hq = q.shape[1]
    bs = layer.block_size
    start = 0
    for b, (ql, cl) in enumerate(zip(meta.q_lens, meta.ctx_lens)):
        nblk = (cl + bs - 1) // bs
        k, v = gather_kv_ref(layer, meta.block_tables[b, :nblk].long(), cl)   # [Hk, cl, D]
        rep = hq // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)        # [Hq, cl, D]
        qb = q[start:start + ql].float().transpose(0, 1)                        # [Hq, ql, D]
        s = torch.matmul(qb, k.transpose(1, 2)) * scale                         # [Hq, ql, cl]
        qpos = torch.arange(cl - ql, cl, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(cl, device=q.device)[None, :] > qpos, float("-inf"))
        out[start:start + ql] = torch.matmul(s.softmax(-1), v).transpose(0, 1).to(q.dtype)
        start += ql
    return out


def rep_tile(rep: int) -> int:
    """Query heads per CTA: a divisor of the GQA ratio, at most 4 (8 only when nothing between 2 and 4 divides)."""
    best = max(d for d in range(1, min(rep, 4) + 1) if rep % d == 0)
    return rep if best == 1 and rep <= 8 else best


def use_mma(hq: int, hk: int, impl: str = "", kv_dtype: str = "auto") -> bool:
    """Whether the tensor-core kernel takes this shape and cache dtype under `impl` ("" = DECODE_IMPL)."""
    impl = impl or DECODE_IMPL
    if impl not in ("cuda", "mma", "auto"):
        raise ValueError(f"decode attention impl must be 'auto', 'cuda' or 'mma', got {impl!r}")
    if impl == "auto":
        return hq // hk <= 8 and (hq > hk or kv_dtype != "auto")
    return impl == "mma" and hq // hk <= 8


def ctas_per_split(b: int, hq: int, hk: int, impl: str = "", kv_dtype: str = "auto") -> int:
    return b * hk if use_mma(hq, hk, impl, kv_dtype) else b * (hq // rep_tile(hq // hk))


def small_grid(b: int, hq: int, hk: int, impl: str = "", kv_dtype: str = "auto") -> bool:
    """One split's grid is below SMALL_GRID CTAs (bs=1): short partitions, and (auto) the combine in the last CTA."""
    return ctas_per_split(b, hq, hk, impl, kv_dtype) < SMALL_GRID


def default_partition(b: int, hq: int, hk: int, impl: str = "", kv_dtype: str = "auto") -> int:
    """Tokens per split: the small partition on a small grid."""
    return SMALL_PARTITION if small_grid(b, hq, hk, impl, kv_dtype) else PARTITION


def block_reduce(b: int, hq: int, hk: int, impl: str = "", kv_dtype: str = "auto") -> bool:
    """Whether the last CTA of each group combines the splits (no reduce_splits launch). auto: only where one split's
    grid is small (small_grid, bs=1): there the second launch is a visible part of the step (Llama-2-7B W4A16 bs=1:
    1.97 -> 1.95 ms); on bigger grids the combining CTAs lengthen the kernel's tail (16 x 4k alone: 2-23% slower,
    session 9)."""
    if _cupy.SPLIT_REDUCE != "auto":
        return _cupy.SPLIT_REDUCE == "block"
    return small_grid(b, hq, hk, impl, kv_dtype)


def split_len(ctx: int, nsplit: int, min_part: int) -> int:
    """Tokens per split of a ctx-token sequence (the kernels' split_len, ATTN_COMMON in paged_attention_cuda.py)."""
    return max(min_part, 16 * -(-ctx // (16 * nsplit)))


def split_plan(b: int, hq: int, hk: int, bound: int, device: int, partition: int = 0, impl: str = "",
               kv_dtype: str = "auto") -> Tuple[int, int]:
    """(splits, min tokens a split). partition 0: default_partition, and for the tensor-core kernel at most
    SPLIT_CTAS_PER_SM CTAs an SM over all splits; given: splits of exactly `partition` tokens covering `bound`.
    A sequence's split length is max(min, 16 * ceil(ctx / (16 * splits))) (split_len in the kernels)."""
    fixed = partition > 0
    if not fixed:
        partition = default_partition(b, hq, hk, impl, kv_dtype)
    if partition % 16:
        raise ValueError(f"partition must be a multiple of 16, got {partition}")
    n = max(1, -(-bound // partition))
    if not fixed and SPLIT_CTAS_PER_SM > 0 and use_mma(hq, hk, impl, kv_dtype):
        n = min(n, max(1, -(-SPLIT_CTAS_PER_SM * _cupy.sm_count(device) // ctas_per_split(b, hq, hk, impl, kv_dtype))))
    return n, partition


def paged_decode(q: torch.Tensor, layer: KVLayer, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 max_context_len: int, scale: float, partition: int = 0, impl: str = "") -> torch.Tensor:
    """q: [B, Hq, D] one token per sequence -> [B, Hq, D]. Reads only device tensors (CUDA-graph safe).
    partition (0: default_partition, and the split cap) must be a multiple of 16; given, the splits cover
    max_context_len at exactly that many tokens each (no cap). impl "" = DECODE_IMPL."""
    b, hq, d = q.shape
    hk = layer.k.shape[1]
    tile = rep_tile(hq // hk)
    mma = use_mma(hq, hk, impl, layer.kv_dtype) and layer.block_size >= 16   # a 16-token tile never straddles a block
    nsplit, partition = split_plan(b, hq, hk, max_context_len, q.device.index, partition, impl, layer.kv_dtype)
    out = torch.empty_like(q)
    if b == 0:
        return out
    opts = _cupy.dtype_options(q.dtype) + (f"-DHEAD_DIM={d}", f"-DKV_KIND={_KV_KIND[layer.kv_dtype]}",
                                           f"-DREP={tile}")
    quant = layer.kv_dtype != "auto"
    if nsplit > 1:
        part_acc = torch.empty(b, hq, nsplit, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(b, hq, nsplit, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out      # unused by the kernel
    grid = (hk, b, nsplit) if mma else (hq // tile, b, nsplit)
    counters = None
    if nsplit > 1 and block_reduce(b, hq, hk, impl, layer.kv_dtype):   # the last CTA of a group combines
        counters = _cupy.zeroed_scratch("attention_split_counters", 4 * b * grid[0], q.device.index)
    reduce_opt = (f"-DSPLIT_REDUCE={int(counters is not None)}",)
    if mma:
        minb = MMA_MINB or (4 if layer.kv_dtype == "auto" and d == 128 else 0)
        tiles = ((f"-DTILES={MMA_TILES}",) if MMA_TILES > 0 else ()) + ((f"-DMINB={minb}",) if minb else ()) + (
            f"-DRAW_CODES={int(layer.kv_dtype in _RAW_KINDS[MMA_RAW])}",)
        kernel = _cupy.get_kernel(MMA_SOURCE, "paged_decode_mma", opts[:-1] + (f"-DREP={hq // hk}",) + tiles
                                  + reduce_opt)
    else:
        kernel = _cupy.get_kernel(DECODE_SOURCE, "paged_decode", opts + reduce_opt)
    _cupy.launch(kernel, grid, (128,),
                 (q, layer.k, layer.v, layer.k_qp if quant else _cupy.null_ptr(),
                  layer.v_qp if quant else _cupy.null_ptr(), block_tables, np.int32(block_tables.shape[1]),
                  context_lens, out, part_acc, part_ml, np.int32(hq), np.int32(hk),
                  np.int32(int(math.log2(layer.block_size))), np.int32(partition), np.float32(scale * _LOG2E),
                  _cupy.null_ptr() if counters is None else counters))
    if nsplit > 1 and counters is None:
        _cupy.launch(_cupy.get_kernel(DECODE_SOURCE, "reduce_splits", opts), (b * hq,), (d,),
                     (part_acc, part_ml, context_lens, out, np.int32(hq), np.int32(nsplit), np.int32(partition)))
    return out


def gather_kv(layer: KVLayer, block_ids: torch.Tensor, length: int, dtype: torch.dtype):
    """K, V of one sequence in `dtype` (dequantized if needed): [Hk, length, D] each."""
    out = []
    for cache, qp in ((layer.k, layer.k_qp), (layer.v, layer.v_qp)):
        x = cache[block_ids]                                                  # [nblk, Hk, bs, D']
        if qp is not None:
            x = dequantize_ref(x, qp[block_ids], layer.kv_dtype).to(dtype)     # [nblk, Hk, bs, D]
        out.append(x.permute(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[-1])[:, :length])
    return out


def prefill_attention(q: torch.Tensor, layer: KVLayer, block_ids: torch.Tensor, ctx_len: int,
                      scale: float) -> torch.Tensor:
    """q: [ql, Hq, D] the last ql tokens of a ctx_len-token context -> [ql, Hq, D], by gather + SDPA."""
    ql, hq, _ = q.shape
    k, v = gather_kv(layer, block_ids, ctx_len, q.dtype)                      # [Hk, cl, D]
    rep = hq // k.shape[0]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)       # [Hq, cl, D]
    qb = q.transpose(0, 1)[None]                                              # [1, Hq, ql, D]
    if ql == ctx_len:
        o = F.scaled_dot_product_attention(qb, k[None], v[None], is_causal=True, scale=scale)
    else:   # causal with the queries at the end of the context
        pos = torch.arange(ctx_len - ql, ctx_len, device=q.device)
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= pos[:, None]          # [ql, cl]
        o = F.scaled_dot_product_attention(qb, k[None], v[None], attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1)                                               # [ql, Hq, D]


def _kernel_ok(q: torch.Tensor, layer: KVLayer) -> bool:
    return (_cupy.available(q) and _cupy.supports_dtype(q) and q.shape[-1] in (64, 128) and q.is_contiguous()
            and (layer.kv_dtype != "auto" or layer.k.dtype == q.dtype))


def paged_attention(q: torch.Tensor, layer: KVLayer, meta: AttnMetadata, scale: float) -> torch.Tensor:
    if not _kernel_ok(q, layer):
        return paged_attention_ref(q, layer, meta, scale)
    if meta.is_decode:
        return paged_decode(q, layer, meta.block_tables, meta.context_lens, meta.max_context_len, scale)
    out = torch.empty_like(q)
    dec_seqs, dec_toks, start = [], [], 0
    bs = layer.block_size
    for b, (ql, cl) in enumerate(zip(meta.q_lens, meta.ctx_lens)):
        if ql == 1:
            dec_seqs.append(b)
            dec_toks.append(start)
        else:
            blocks = meta.block_tables[b, :-(-cl // bs)]
            out[start:start + ql] = prefill_attention(q[start:start + ql], layer, blocks, cl, scale)
        start += ql
    if dec_seqs:
        seqs = torch.tensor(dec_seqs, device=q.device)
        toks = torch.tensor(dec_toks, device=q.device)
        max_ctx = max(meta.ctx_lens[b] for b in dec_seqs)
        out[toks] = paged_decode(q[toks], layer, meta.block_tables[seqs], meta.context_lens[seqs], max_ctx, scale)
    return out

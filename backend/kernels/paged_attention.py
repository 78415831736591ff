"""Attention of new query tokens over the paged KV cache (prefill chunks on top of cached prefixes, and decode).

The new tokens' K/V are written to the cache first; attention then reads the whole context from the cache.
Query token i of sequence b sits at position context_lens[b] - q_len_b + i and sees keys 0..that position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .kv_cache import KVLayer, gather_kv_ref


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


def paged_attention(q, layer, meta, scale):
    return paged_attention_ref(q, layer, meta, scale)

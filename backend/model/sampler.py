"""Batched sampling on any device with no host sync per row: penalties, min_tokens, temperature, top-k, top-p,
min-p, and a counter-based random draw.

Randomness is a hash of (request seed, output index, token id), turned into an exponential race
(argmax of log p - log E with E ~ Exp(1) is a draw from p). A request's tokens therefore depend only on its
seed and its own history: the same whatever else is in the batch, after preemption, on CPU and GPU alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 finalizer on int64 tensors holding 32-bit values (products wrap; the mask keeps the low word)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds, steps: [B] int64 -> [B, vocab] float64 uniforms in (0, 1)."""
    key = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ _mix32((steps * 0x9E3779B9) & _M32)))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    u = _mix32(key[:, None] ^ _mix32((ids[None, :] * 0x632BE5AB + 0x2545F491) & _M32))
    return (u.double() + 0.5) / 4294967296.0


@dataclass
class SamplingBatch:
    """Per-row parameters of the rows that sample this step (tensors on the logits' device)."""
    temperature: torch.Tensor        # [B] float32 (0 = greedy)
    top_k: torch.Tensor              # [B] int64 (0 = off)
    top_p: torch.Tensor              # [B] float32
    min_p: torch.Tensor              # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    seeds: torch.Tensor              # [B] int64
    steps: torch.Tensor              # [B] int64: tokens generated so far in this turn
    history: Optional[torch.Tensor]  # [B, L] int64 token ids padded with -1 (only if a penalty is set)
    banned: Optional[torch.Tensor]   # [B, V] bool: tokens not allowed yet (min_tokens), or None
    all_greedy: bool
    need_logprobs: bool


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF semantics: for every token seen in prompt or output, logit / p if positive else logit * p."""
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.scatter_(1, history.clamp_min(0), history >= 0)
    p = penalty[:, None]
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def sample(logits: torch.Tensor, sb: SamplingBatch):
    """logits: [B, V] float32 -> (token ids [B] int64, logprobs [B] float32 or None)."""
    logprobs = torch.log_softmax(logits, -1) if sb.need_logprobs else None
    x = logits
    if sb.history is not None:
        x = apply_repetition_penalty(x, sb.history, sb.repetition_penalty)
    if sb.banned is not None:
        x = x.masked_fill(sb.banned, float("-inf"))
    greedy = x.argmax(-1)
    if sb.all_greedy:
        tokens = greedy
    else:
        tokens = torch.where(sb.temperature == 0, greedy, _sample_random(x, sb))
    lp = None if logprobs is None else logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, lp


def _sample_random(x: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    vocab = x.shape[1]
    temp = torch.where(sb.temperature > 0, sb.temperature, torch.ones_like(sb.temperature))
    x = x / temp[:, None]
    sorted_x, idx = x.sort(dim=-1, descending=True)                                  # [B, V]
    probs = sorted_x.softmax(-1)
    rank = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(sb.top_k > 0, sb.top_k, torch.full_like(sb.top_k, vocab))
    drop = rank >= k[:, None]
    drop |= (probs.cumsum(-1) - probs) > sb.top_p[:, None]                            # keeps at least the top one
    drop |= probs < sb.min_p[:, None] * probs[:, :1]
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    logp = torch.log_softmax(sorted_x, -1).double()
    exp_noise = -torch.log(uniform_noise(sb.seeds, sb.steps, vocab))                  # [B, V] by token id
    choice = (logp - torch.log(exp_noise.gather(1, idx))).argmax(-1)
    return idx.gather(1, choice[:, None]).squeeze(1)


def build_sampling_batch(seqs: List, device, eos_ids: List[int], vocab: int) -> SamplingBatch:
    """From sequences that sample this step (objects with .params, .token_ids, .output_ids, .seed)."""
    ps = [s.params for s in seqs]
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    history = None
    if any(p.repetition_penalty != 1.0 for p in ps):
        width = max(len(s.token_ids) for s in seqs)
        history = torch.full((len(seqs), width), -1, **i64)
        for r, s in enumerate(seqs):
            history[r, :len(s.token_ids)] = torch.tensor(s.token_ids, **i64)
    banned = None
    for r, s in enumerate(seqs):
        if len(s.output_ids) < s.params.min_tokens:    # no end token before min_tokens
            if banned is None:
                banned = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
            ids = [i for i in set(eos_ids) | set(s.params.stop_token_ids) if i < vocab]
            banned[r, ids] = True
    return SamplingBatch(
        temperature=torch.tensor([p.temperature for p in ps], **f32),
        top_k=torch.tensor([p.top_k for p in ps], **i64),
        top_p=torch.tensor([p.top_p for p in ps], **f32),
        min_p=torch.tensor([p.min_p for p in ps], **f32),
        repetition_penalty=torch.tensor([p.repetition_penalty for p in ps], **f32),
        seeds=torch.tensor([s.seed for s in seqs], **i64),
        steps=torch.tensor([len(s.output_ids) for s in seqs], **i64),
        history=history, banned=banned,
        all_greedy=all(p.temperature == 0 or p.top_k == 1 for p in ps),
        need_logprobs=any(p.logprobs for p in ps))

"""Tensor-parallel sharding at load time: one copy of the weights on disk serves any tp.

Rank r of tp holds:
  qkv, gate_up   column-parallel: each fused part (q | k | v heads, gate | up) sliced by output, then re-fused
  o, down        row-parallel: the input dimension sliced; partial outputs are summed by an all-reduce,
                 so their bias is kept by rank 0 only (added once, before the sum)
  embed, norms, lm_head   replicated (rank 0 samples)
Dense weights are [out, in]; AWQ tensors are [in, out/8] (qweight), [in/g, out] (zeros, scales) and, in workspaces
written before fp16 zeros, [in/g, out/8] (qzeros): column splits slice their dim 1, row splits their dim 0
(backend/kernels/w4a16.py has the format).
Tensors may be safetensors slices (`safe_open(...).get_slice`): only the rank's part is read from disk.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, Iterable, List, Tuple, Union

import torch

from .config import ENGINE_CONFIG_FILE, ModelConfig

_LAYER = re.compile(r"^layers\.\d+\.(qkv|o|gate_up|down)\.(weight|bias|qweight|zeros|qzeros|scales)$")
PACK = 8   # int4 values per int32 word along AWQ's output dimension


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming the numbers when tp cannot split this model."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if cfg.num_heads % tp or cfg.num_kv_heads % tp:
        raise ValueError(f"tp={tp} must divide num_heads={cfg.num_heads} and num_kv_heads={cfg.num_kv_heads} "
                         f"(KV heads are split across ranks, never replicated)")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide intermediate_size={cfg.intermediate_size}")
    if not cfg.quant:
        return
    g = cfg.quant["group_size"]
    for what, n in (("q heads x head_dim", cfg.q_size), ("kv heads x head_dim", cfg.kv_size),
                    ("intermediate_size", cfg.intermediate_size)):
        if (n // tp) % PACK:
            raise ValueError(f"AWQ column split: {what}={n} / tp={tp} = {n // tp} is not a multiple of {PACK} "
                             f"(int4 values packed per int32)")
    for what, n in (("o_proj in (q heads x head_dim)", cfg.q_size), ("down_proj in (intermediate_size)",
                                                                     cfg.intermediate_size)):
        if (n // tp) % g:
            raise ValueError(f"AWQ row split: {what}={n} / tp={tp} = {n // tp} is not a multiple of "
                             f"group_size={g}")


def shard_config(cfg: ModelConfig, rank: int, tp: int) -> ModelConfig:
    """The rank-local ModelConfig: heads and intermediate size divided by tp."""
    check_tp(cfg, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank={rank} must be in [0, tp={tp})")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp,
                               eos_token_ids=list(cfg.eos_token_ids))


def _shape(x) -> List[int]:
    return list(x.shape) if isinstance(x, torch.Tensor) else list(x.get_shape())


def _take(x, dim: int, lo: int, hi: int) -> torch.Tensor:
    """x[lo:hi] along dim (0 or 1) as an owned tensor (a view would keep the whole weight alive)."""
    part = x[lo:hi] if dim == 0 else x[:, lo:hi]
    return part.clone() if isinstance(x, torch.Tensor) else part


def _column(x, dim: int, parts: List[int], unit: int, rank: int, tp: int) -> torch.Tensor:
    """Slice each fused part (sizes in output features; `unit` features per stored element) to its rank's share."""
    out, start = [], 0
    for n in parts:
        share = n // tp // unit
        lo = start // unit + rank * share
        out.append(_take(x, dim, lo, lo + share))
        start += n
    assert start // unit == _shape(x)[dim], (parts, _shape(x))
    return torch.cat(out, dim) if len(out) > 1 else out[0]


def _row(x, dim: int, rank: int, tp: int) -> torch.Tensor:
    share = _shape(x)[dim] // tp
    return _take(x, dim, rank * share, (rank + 1) * share)


def shard_tensor(name: str, x, cfg: ModelConfig, rank: int, tp: int):
    """Rank `rank`'s part of the full-model tensor `name` (engine names); None when the rank keeps nothing."""
    m = _LAYER.match(name)
    if ".rt_" in name:
        raise ValueError(f"{name}: W4A16 in the kernels' runtime layout cannot be split; build each rank's shard "
                         f"itself (backend.engine.tp.RankWeights)")
    if m is None:                     # embed, norms, lm_head: replicated
        return x[:] if not isinstance(x, torch.Tensor) else x
    linear, suffix = m.groups()
    if linear in ("qkv", "gate_up"):
        parts = ([cfg.q_size, cfg.kv_size, cfg.kv_size] if linear == "qkv"
                 else [cfg.intermediate_size, cfg.intermediate_size])
        dim = 0 if suffix in ("weight", "bias") else 1
        unit = PACK if suffix in ("qweight", "qzeros") else 1
        return _column(x, dim, parts, unit, rank, tp)
    if suffix == "bias":              # row-parallel bias: added once, by rank 0
        return (x[:] if not isinstance(x, torch.Tensor) else x) if rank == 0 else None
    return _row(x, 1 if suffix == "weight" else 0, rank, tp)


def shard_weights(weights: Union[Dict[str, object], Iterable[Tuple[str, object]]], cfg: ModelConfig, rank: int,
                  tp: int) -> Dict[str, torch.Tensor]:
    """Full-model weights (a dict or an iterator of (name, tensor), e.g. iter_hf_weights) -> rank's shard.

    Consuming an iterator keeps at most one full fused tensor in memory at a time."""
    check_tp(cfg, tp)
    items = weights.items() if isinstance(weights, dict) else weights
    out: Dict[str, torch.Tensor] = {}
    for name, x in items:
        part = shard_tensor(name, x, cfg, rank, tp)
        if part is not None:
            out[name] = part
    return out


def load_shard(model_dir, cfg: ModelConfig, rank: int, tp: int) -> Dict[str, torch.Tensor]:
    """Read only rank's shard of a checkpoint: an engine-layout directory through safetensors slices, an HF
    checkpoint one fused tensor at a time."""
    d = Path(model_dir)
    from .random_model import is_random, load_random
    if is_random(d):                  # each rank makes its own shard on its GPU (benchmarks)
        return load_random(d, cfg, rank, tp)
    files = sorted(d.glob("*.safetensors"))
    if (d / ENGINE_CONFIG_FILE).exists() and files:
        from safetensors import safe_open
        handles = [safe_open(str(f), framework="pt") for f in files]
        return shard_weights(((k, h.get_slice(k)) for h in handles for k in h.keys()), cfg, rank, tp)
    from .weights import iter_hf_weights, load_weights
    if (d / ENGINE_CONFIG_FILE).exists():
        return shard_weights(load_weights(d, cfg), cfg, rank, tp)
    return shard_weights(iter_hf_weights(d, cfg), cfg, rank, tp)

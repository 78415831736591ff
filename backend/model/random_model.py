"""Random-weight models of real shapes, made where they run (benchmarks: weights never travel or touch disk).

A model directory with lmtriton_model.json and random_weights.json ({"seed": 0}) and no weight files is such a
model: every rank makes its own shard on its device when the engine loads it (seconds for a 70B shape, where
writing and reading 35 GB of random int4 would take minutes). Dense linears are N(0, 0.02); W4A16 linears are made
directly in the kernels' runtime layout (w4a16_runtime.random_runtime: uniform nibbles, zero point 8, scale
0.02 / 4.6, std ~0.02 after dequantization). Replicated tensors (embeddings, norms, lm_head) are the same on every
rank (same seed); each rank's linears are its own random values, so outputs are noise: benchmarks only.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict

import torch

from ..kernels.w4a16_runtime import random_runtime
from .config import ModelConfig
from .tp import shard_config
from .weights import random_weights

RANDOM_FILE = "random_weights.json"


def is_random(model_dir) -> bool:
    return model_dir is not None and (Path(model_dir) / RANDOM_FILE).exists()


def random_shard(cfg: ModelConfig, dtype: torch.dtype, device, seed: int, rank: int = 0, tp: int = 1) -> Dict:
    """Rank `rank`'s shard of a random model of cfg's shape (the whole model at tp=1), made on `device`."""
    local = shard_config(cfg, rank, tp)
    if not cfg.quant:
        return random_weights(local, dtype, device, seed)
    w = random_weights(dataclasses.replace(local, num_layers=0), dtype, device, seed)   # embed, norm, lm_head
    g = torch.Generator(device=device).manual_seed(seed + 1 + rank)
    h, inter, gs = cfg.hidden_size, local.intermediate_size, cfg.quant["group_size"]
    shapes = {"qkv": (h, local.q_size + 2 * local.kv_size), "o": (local.q_size, h),
              "gate_up": (h, 2 * inter), "down": (inter, h)}                 # (in, out) of each linear on this rank
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        w[p + "input_norm.weight"] = torch.ones(h, dtype=dtype, device=device)
        w[p + "post_attn_norm.weight"] = torch.ones(h, dtype=dtype, device=device)
        for name, (n_in, n_out) in shapes.items():
            rt = random_runtime(n_in, n_out, gs, 0.02 / 4.6, torch.float16, device, g)
            w[p + name + ".rt_qweight"], w[p + name + ".rt_zeros"] = rt.qweight, rt.zeros
            w[p + name + ".rt_scales"] = rt.scales[torch.float16]
    return w


def load_random(model_dir, cfg: ModelConfig, rank: int = 0, tp: int = 1) -> Dict:
    """The shard of a random model directory, made on this process's current CUDA device (else the CPU)."""
    spec = json.loads((Path(model_dir) / RANDOM_FILE).read_text())
    seed = spec.get("seed", 0)
    if not isinstance(seed, int):
        raise ValueError(f"{Path(model_dir) / RANDOM_FILE}: seed must be an integer, got {seed!r}")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return random_shard(cfg, dtype, device, seed, rank, tp)


def write_random(model_dir, cfg: ModelConfig, seed: int = 0) -> Path:
    """Make `model_dir` a random model of cfg's shape: lmtriton_model.json + random_weights.json, no weights."""
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.safetensors"):
        old.unlink()
    cfg.save(d)
    (d / RANDOM_FILE).write_text(json.dumps({"seed": seed}) + "\n")
    return d

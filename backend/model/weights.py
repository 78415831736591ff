"""Checkpoint loading: HF names of each family -> the engine's fused layout, and the engine layout on disk.

Engine names: embed.weight, norm.weight, lm_head.weight (absent when tied), and per layer i
  layers.i.input_norm.weight, layers.i.post_attn_norm.weight,
  layers.i.{qkv,o,gate_up,down}.{weight,bias | qweight,zeros,scales}
qkv = [q; k; v] and gate_up = [gate; up] are fused along the output dimension (dim 0 of a dense [out, in]
weight, dim 1 of the AWQ tensors). AWQ zeros are fp16 (backend/kernels/w4a16.py); an AutoAWQ checkpoint's packed
integer `qzeros` are converted here, and workspaces written before that still hold `qzeros` (Linear converts).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Iterator, Tuple

import torch

from ..kernels.w4a16 import zeros_from_qzeros
from .config import ModelConfig

log = logging.getLogger(__name__)

QUANT_SUFFIXES = ("qweight", "zeros", "scales")

# per family: engine linear -> HF parts (concatenated in this order); None prefix parts are handled specially
_LLAMA = {
    "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "o": ["self_attn.o_proj"],
    "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "down": ["mlp.down_proj"],
    "input_norm": ["input_layernorm"],
    "post_attn_norm": ["post_attention_layernorm"],
}
_INTERNLM2 = {
    "qkv": ["attention.wqkv"],
    "o": ["attention.wo"],
    "gate_up": ["feed_forward.w1", "feed_forward.w3"],
    "down": ["feed_forward.w2"],
    "input_norm": ["attention_norm"],
    "post_attn_norm": ["ffn_norm"],
}
FAMILY = {
    "LlamaForCausalLM": (_LLAMA, "model.embed_tokens", "model.norm", "lm_head", "model.layers"),
    "MistralForCausalLM": (_LLAMA, "model.embed_tokens", "model.norm", "lm_head", "model.layers"),
    "Qwen2ForCausalLM": (_LLAMA, "model.embed_tokens", "model.norm", "lm_head", "model.layers"),
    "InternLM2ForCausalLM": (_INTERNLM2, "model.tok_embeddings", "model.norm", "output", "model.layers"),
}


def _open_checkpoint(model_dir: Path) -> Tuple[Callable[[str], torch.Tensor], set]:
    files = sorted(model_dir.glob("*.safetensors"))
    index: Dict[str, Path] = {}
    if files:
        from safetensors import safe_open
        handles = {}
        for f in files:
            h = safe_open(str(f), framework="pt")
            handles[f] = h
            for k in h.keys():
                index[k] = f
        return (lambda name: handles[index[name]].get_tensor(name)), set(index)
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {model_dir}")
    state: Dict[str, torch.Tensor] = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return state.__getitem__, set(state)


def _split_internlm2_wqkv(w: torch.Tensor, cfg: ModelConfig, dim: int):
    """InternLM2 packs [Hk, q_per_kv + 2, D] along the output dim; return (q, k, v) along `dim`."""
    rep = cfg.num_heads // cfg.num_kv_heads
    out_per_head = w.shape[dim] // (cfg.num_kv_heads * (rep + 2))   # D (dense) or D/8 (AWQ packed)
    wt = w.movedim(dim, 0)
    g = wt.reshape(cfg.num_kv_heads, rep + 2, out_per_head, *wt.shape[1:])
    q = g[:, :rep].reshape(-1, *wt.shape[1:])
    k = g[:, rep].reshape(-1, *wt.shape[1:])
    v = g[:, rep + 1].reshape(-1, *wt.shape[1:])
    return [x.movedim(0, dim) for x in (q, k, v)]


def iter_hf_weights(model_dir, cfg: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (engine name, tensor) for every weight of an HF checkpoint, fused into the engine layout."""
    model_dir = Path(model_dir)
    get, names = _open_checkpoint(model_dir)
    table, embed, norm, head, layers = FAMILY[cfg.arch]
    yield "embed.weight", get(f"{embed}.weight")
    yield "norm.weight", get(f"{norm}.weight")
    if f"{head}.weight" in names and not cfg.tie_word_embeddings:
        yield "lm_head.weight", get(f"{head}.weight")
    suffixes = QUANT_SUFFIXES if cfg.quant else ("weight",)
    for i in range(cfg.num_layers):
        pre = f"{layers}.{i}"
        for ours, parts in table.items():
            sufs = suffixes
            if cfg.quant and f"{pre}.{parts[0]}.qweight" not in names and f"{pre}.{parts[0]}.weight" in names:
                sufs = ("weight",)        # a linear the AWQ checkpoint keeps in fp (modules_to_not_convert)
            for suf in (("weight",) if ours.endswith("norm") else sufs + ("bias",)):
                packed = suf == "zeros" and f"{pre}.{parts[0]}.zeros" not in names   # AutoAWQ: int4 in int32
                keys = [f"{pre}.{p}.{'qzeros' if packed else suf}" for p in parts]
                if not all(k in names for k in keys):
                    if suf == "bias":
                        continue
                    raise KeyError(f"missing {[k for k in keys if k not in names]} in {model_dir}")
                dim = 0 if suf in ("weight", "bias") else 1
                tensors = [get(k) for k in keys]
                if cfg.arch == "InternLM2ForCausalLM" and ours == "qkv":
                    tensors = _split_internlm2_wqkv(tensors[0], cfg, dim)
                t = torch.cat(tensors, dim) if len(tensors) > 1 else tensors[0]
                yield f"layers.{i}.{ours}.{suf}", zeros_from_qzeros(t) if packed else t


def load_weights(model_dir, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """All weights of a checkpoint (HF or engine layout) in engine names, on the CPU."""
    model_dir = Path(model_dir)
    from .config import ENGINE_CONFIG_FILE
    from .random_model import is_random, load_random
    if is_random(model_dir):          # made here, on the GPU when there is one (benchmarks)
        return load_random(model_dir, cfg)
    if (model_dir / ENGINE_CONFIG_FILE).exists():
        get, names = _open_checkpoint(model_dir)
        return {n: get(n) for n in names}
    return dict(iter_hf_weights(model_dir, cfg))


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights of a real shape (benchmarks, GPU tests): fp weights, N(0, 0.02), norms ~1."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    w = {"embed.weight": rnd(cfg.vocab_size, h), "norm.weight": 1 + rnd(h)}
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = rnd(cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        w[p + "input_norm.weight"] = 1 + rnd(h)
        w[p + "post_attn_norm.weight"] = 1 + rnd(h)
        w[p + "qkv.weight"] = rnd(qkv, h)
        if cfg.qkv_bias:
            w[p + "qkv.bias"] = rnd(qkv)
        w[p + "o.weight"] = rnd(h, cfg.q_size)
        w[p + "gate_up.weight"] = rnd(2 * cfg.intermediate_size, h)
        w[p + "down.weight"] = rnd(h, cfg.intermediate_size)
    return w

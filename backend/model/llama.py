"""The Llama family (Llama, Mistral, Qwen2, InternLM2) over a paged KV cache, on flattened token batches."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from ..kernels import dense_decode
from ..kernels.kv_cache import KVCache, write_kv
from ..kernels.kv_static import write_kv_static
from ..kernels.paged_attention import AttnMetadata, paged_attention
from ..kernels.rms_norm import rms_norm
from ..kernels.rotary import rotary
from ..kernels.rotary_kv import rotary_write_kv
from .config import ModelConfig
from .layers import Linear
from .rotation import fold_o_cols, fold_v_rows, hadamard, rotate


class DecoderLayer:
    def __init__(self, w: Dict[str, torch.Tensor], i: int, group_size: int):
        p = f"layers.{i}."
        self.input_norm = w[p + "input_norm.weight"]
        self.post_attn_norm = w[p + "post_attn_norm.weight"]
        self.qkv = Linear.from_weights(w, p + "qkv", group_size)
        self.o = Linear.from_weights(w, p + "o", group_size)
        self.gate_up = Linear.from_weights(w, p + "gate_up", group_size)
        self.down = Linear.from_weights(w, p + "down", group_size)
        self.rotate_v = self.rotate_o = False     # KV rotation the weights could not absorb (W4A16): at run time

    def fold_rotation(self, cfg: ModelConfig, h: torch.Tensor) -> None:
        """Fold the v rotation / o un-rotation into dense weights (backend/model/rotation.py); W4A16 keeps them."""
        if self.qkv.is_quantized:
            self.rotate_v = True
        else:
            self.qkv.weight = fold_v_rows(self.qkv.weight, cfg.q_size, cfg.kv_size, cfg.head_dim, h)
            if self.qkv.bias is not None:
                self.qkv.bias = fold_v_rows(self.qkv.bias, cfg.q_size, cfg.kv_size, cfg.head_dim, h)
        if self.o.is_quantized:
            self.rotate_o = True
        else:
            self.o.weight = fold_o_cols(self.o.weight, cfg.head_dim, h)

    def linears(self) -> List[Linear]:
        return [self.qkv, self.o, self.gate_up, self.down]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: Dict[str, torch.Tensor], rope_scaling_factor: float = 0.0,
                 use_logn_attn: bool = False, kv_rotation: bool = False):
        self.cfg = cfg
        gs = cfg.quant["group_size"] if cfg.quant else 0
        self.embed = weights["embed.weight"]
        self.norm = weights["norm.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed)
        self.layers = [DecoderLayer(weights, i, gs) for i in range(cfg.num_layers)]
        self.inv_freq = cfg.inv_freq(self.embed.device)
        self.rope_scaling_factor = rope_scaling_factor
        self.logn_max_pos = cfg.max_position_embeddings if use_logn_attn else 0
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.kv_qparams = None    # [L, 2, Hk, 2] static KV (scale, zero), set by the model runner when configured
        self.all_reduce = None    # tensor parallel: sums the row-parallel o / down partial outputs across ranks
        self.fuse_rope_kv = False  # one kernel for rotary + KV write (EngineConfig.fuse_rope_kv)
        self.rot = self.rot_t = None   # [D, D] Hadamard rotation of q / k / v heads (quantized KV): rotation.py
        if kv_rotation:
            self.rot = hadamard(cfg.head_dim, device=self.embed.device)
            for layer in self.layers:
                layer.fold_rotation(cfg, self.rot)
            self.rot = self.rot.to(self.embed.dtype)
            self.rot_t = self.rot.t().contiguous()

    def rotary_freqs(self, meta: AttnMetadata) -> torch.Tensor:
        """[D/2], or [T, D/2] under dynamic NTK: a sequence longer than the training length gets a larger base."""
        cfg = self.cfg
        if self.rope_scaling_factor <= 0 or meta.max_context_len <= cfg.max_position_embeddings:
            return self.inv_freq
        f, d, mp = self.rope_scaling_factor, cfg.head_dim, cfg.max_position_embeddings
        lens = torch.tensor([c for c, q in zip(meta.ctx_lens, meta.q_lens) for _ in range(q)],
                            dtype=torch.float64)                                   # [T] each token's context
        ratio = torch.clamp(f * lens / mp - (f - 1), min=1.0)
        base = cfg.rope_theta * ratio ** (d / (d - 2))                             # [T]
        exps = torch.arange(0, d, 2, dtype=torch.float64) / d
        inv = 1.0 / base[:, None] ** exps[None, :]
        return inv.to(torch.float32).to(self.embed.device)

    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, kv: KVCache) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden]."""
        cfg = self.cfg
        t = input_ids.shape[0]
        inv_freq = self.rotary_freqs(meta)
        h = F.embedding(input_ids, self.embed)                                       # [T, hidden]
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = rms_norm(h, layer.input_norm, cfg.rms_norm_eps, residual)
            q, k, v = layer.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.view(t, cfg.num_heads, cfg.head_dim)                               # [T, Hq, D]
            k = k.view(t, cfg.num_kv_heads, cfg.head_dim)                            # [T, Hk, D]
            v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
            cache = kv.layer(i)
            if self.fuse_rope_kv and self.kv_qparams is None:
                # RoPE'd (and Hadamard-rotated) K and V go straight into the cache (static KV needs K in between)
                rot = 0 if self.rot is None else 2 if layer.rotate_v else 1
                q = rotary_write_kv(q, k, v, meta.positions, inv_freq, self.logn_max_pos, cache, meta.slot_mapping,
                                    hadamard=rot)
            else:
                q, k = rotary(q, k, meta.positions, inv_freq, self.logn_max_pos)
                if self.rot is not None:    # one matmul for q, k (and v when not folded into the weights)
                    hq, hk = cfg.num_heads, cfg.num_kv_heads
                    if layer.rotate_v:
                        q, k, v = rotate(torch.cat([q, k, v], 1), self.rot).split([hq, hk, hk], 1)
                    else:
                        q, k = rotate(torch.cat([q, k], 1), self.rot).split([hq, hk], 1)
                    q = q.contiguous()      # a view for T > 1; the GPU attention kernels read contiguous q
                if self.kv_qparams is None:
                    write_kv(k, v, cache, meta.slot_mapping)
                else:
                    write_kv_static(k, v, cache, meta.slot_mapping, self.kv_qparams[i])
            o = paged_attention(q, cache, meta, self.scale)                          # [T, Hq, D]
            if layer.rotate_o:
                o = rotate(o, self.rot_t)   # o = o' H^T: back to the unrotated basis
            h = layer.o(o.reshape(t, cfg.q_size))
            if self.all_reduce is not None:
                h = self.all_reduce(h)
            x, residual = rms_norm(h, layer.post_attn_norm, cfg.rms_norm_eps, residual)
            h = layer.down(layer.gate_up.gate_up_silu(x))
            if self.all_reduce is not None:
                h = self.all_reduce(h)
        h, _ = rms_norm(h, self.norm, cfg.rms_norm_eps, residual)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, hidden] -> float32 logits [B, vocab]."""
        return dense_decode.linear(hidden, self.lm_head.to(hidden.dtype)).float()

"""Memory-bounded, layer-by-layer execution of an HF checkpoint for calibration and AWQ.

Only one decoder layer's weights are in memory at a time (read from safetensors on demand); the hidden states of
the calibration samples move from layer to layer. The forward is a plain dense causal forward (no KV cache),
built from the engine's reference ops, and reports every linear's input and the post-RoPE K / V to `observe`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from backend.kernels.rms_norm import rms_norm_ref
from backend.kernels.rotary import rotary_ref
from backend.model.config import ModelConfig
from backend.model.weights import _open_checkpoint

from .quant_family import QuantFamily, family_for

log = logging.getLogger(__name__)

Observer = Callable[[str, torch.Tensor], None]


class LayerwiseCheckpoint:
    """An HF checkpoint read one decoder layer at a time."""

    def __init__(self, model_dir):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"{self.model_dir} is not an HF model directory (no config.json)")
        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        if self.hf_config.get("quantization_config"):
            raise ValueError(f"{self.model_dir} is already quantized ({self.hf_config['quantization_config']}); "
                             f"calibrate and quantize the fp checkpoint")
        self.cfg = ModelConfig.from_hf(self.hf_config)
        self.family: QuantFamily = family_for(self.cfg.arch)
        self._get, self.names = _open_checkpoint(self.model_dir)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"{name} is missing from {self.model_dir}")
        return self._get(name)

    def layer(self, i: int) -> Dict[str, torch.Tensor]:
        """HF suffix (e.g. 'self_attn.q_proj.weight') -> float32 tensor, for decoder layer i."""
        pre = f"{self.family.layers}.{i}."
        return {n[len(pre):]: self._get(n).float() for n in self.names if n.startswith(pre)}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, S] -> [N, S, H] float32."""
        return F.embedding(ids, self.get(f"{self.family.embed}.weight").float())

    def non_layer_names(self) -> List[str]:
        pre = f"{self.family.layers}."
        return sorted(n for n in self.names if not n.startswith(pre))


def _linear(w: Dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def layer_forward(w: Dict[str, torch.Tensor], cfg: ModelConfig, fam: QuantFamily, x: torch.Tensor,
                  observe: Optional[Observer] = None, batch: int = 4, until: Optional[str] = None
                  ) -> torch.Tensor:
    """x: [N, S, H] float32 hidden states -> the layer's output [N, S, H]; `batch` samples at a time.
    observe(name, t) sees t [n*S, C] for name in qkv | o | gate_up | down (linear inputs) and [n, S, Hk, D]
    for k (after RoPE, as the KV cache stores it) | v. until "o" | "gate_up": stop each batch once that input
    has been observed (the returned tensor is then meaningless)."""
    r = fam.roles
    out = torch.empty_like(x)
    n_all, s, _ = x.shape
    inv_freq = cfg.inv_freq()
    for b0 in range(0, n_all, batch):
        h = x[b0:b0 + batch]
        n = h.shape[0]
        t = h.reshape(n * s, -1)                                                  # [n*S, H]
        a, _ = rms_norm_ref(t, w[r["input_norm"] + ".weight"], cfg.rms_norm_eps)
        if observe:
            observe("qkv", a)
        q = _linear(w, r["q"], a).view(n * s, cfg.num_heads, cfg.head_dim)       # [n*S, Hq, D]
        k = _linear(w, r["k"], a).view(n * s, cfg.num_kv_heads, cfg.head_dim)    # [n*S, Hk, D]
        v = _linear(w, r["v"], a).view(n * s, cfg.num_kv_heads, cfg.head_dim)
        pos = torch.arange(s).repeat(n)                                           # [n*S]
        q, k = rotary_ref(q, k, pos, inv_freq)
        if observe:
            observe("k", k.view(n, s, cfg.num_kv_heads, cfg.head_dim))
            observe("v", v.view(n, s, cfg.num_kv_heads, cfg.head_dim))
        rep = cfg.num_heads // cfg.num_kv_heads
        qh = q.view(n, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)          # [n, Hq, S, D]
        kh = k.view(n, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2).repeat_interleave(rep, 1)
        vh = v.view(n, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2).repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)           # [n, Hq, S, D]
        o = o.transpose(1, 2).reshape(n * s, cfg.q_size)                          # [n*S, Hq*D]
        if observe:
            observe("o", o)
        if until == "o":
            continue
        t = t + _linear(w, r["o"], o)
        a, _ = rms_norm_ref(t, w[r["post_attn_norm"] + ".weight"], cfg.rms_norm_eps)
        if observe:
            observe("gate_up", a)
        if until == "gate_up":
            continue
        act = F.silu(_linear(w, r["gate"], a)) * _linear(w, r["up"], a)           # [n*S, I]
        if observe:
            observe("down", act)
        t = t + _linear(w, r["down"], act)
        out[b0:b0 + n] = t.view(n, s, -1)
    return out

"""ModelConfig: the hyper-parameters of a Llama-family checkpoint, read from its config.json."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM")
ENGINE_CONFIG_FILE = "lmtriton_model.json"   # marks a directory written by `lmtriton convert` (engine layout)


@dataclass
class ModelConfig:
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    torch_dtype: str = "float16"
    bos_token_id: Optional[int] = None
    eos_token_ids: List[int] = field(default_factory=list)
    quant: Optional[dict] = None          # {"method": "awq", "bits": 4, "group_size": g}

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        qkv_bias = {"Qwen2ForCausalLM": True, "InternLM2ForCausalLM": bool(hf.get("bias", False))}.get(
            arch, bool(hf.get("attention_bias", False)))
        # transformers >= 5 writes rope_parameters {rope_theta, rope_type, ...}; older configs rope_theta + rope_scaling
        rp = dict(hf.get("rope_parameters") or {})
        theta = float(rp.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        quant = None
        qc = hf.get("quantization_config")
        if qc:
            from .quant_config import parse_awq_config
            head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
            quant = parse_awq_config(qc, {"hidden_size": hf["hidden_size"], "o_proj in": heads * head_dim,
                                          "intermediate_size": hf["intermediate_size"]})
        return cls(
            arch=arch, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float16").replace("torch.", ""),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos, quant=quant)

    @classmethod
    def load(cls, model_dir) -> "ModelConfig":
        d = Path(model_dir)
        if (d / ENGINE_CONFIG_FILE).exists():
            return cls(**json.loads((d / ENGINE_CONFIG_FILE).read_text()))
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d} has neither config.json nor {ENGINE_CONFIG_FILE}")
        hf = json.loads((d / "config.json").read_text())
        from .quant_config import QUANT_CONFIG_FILE
        if not hf.get("quantization_config") and (d / QUANT_CONFIG_FILE).exists():   # older AutoAWQ checkpoints
            hf["quantization_config"] = json.loads((d / QUANT_CONFIG_FILE).read_text())
        cfg = cls.from_hf(hf)
        gen = d / "generation_config.json"
        if gen.exists():   # chat models often end turns with a token only generation_config names
            eos = json.loads(gen.read_text()).get("eos_token_id")
            for t in (eos if isinstance(eos, list) else [eos] if eos is not None else []):
                if t not in cfg.eos_token_ids:
                    cfg.eos_token_ids.append(t)
        return cfg

    def save(self, model_dir) -> None:
        (Path(model_dir) / ENGINE_CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate_tp(self, tp: int) -> None:
        if self.num_heads % tp or self.num_kv_heads % tp:
            raise ValueError(f"tp={tp} must divide num_heads={self.num_heads} and num_kv_heads={self.num_kv_heads}")

    def inv_freq(self, device=None) -> torch.Tensor:
        """[D/2] float32 rotary frequencies, with Llama-3 style rope_scaling folded in."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
            old = rs.get("original_max_position_embeddings", 8192)
            wavelen = 2 * math.pi / inv
            smooth = ((old / wavelen) - lo) / (hi - lo)
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            mid = (wavelen <= old / lo) & (wavelen >= old / hi)
            inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        elif kind == "linear":
            inv = inv / rs["factor"]
        elif kind not in (None, "default", "dynamic"):
            raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear, dynamic)")
        return inv.to(torch.float32).to(device)

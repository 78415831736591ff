"""Tiny random-weight HF checkpoints of each supported family, written to a directory (no hub)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def make_hf(family: str, out: Path, seed: int = 0, **overrides):
    """Save a random HF model of `family` (llama | qwen2 | mistral) into out; returns the HF model (eval, fp32)."""
    import transformers as tf
    torch.manual_seed(seed)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[family]
    kw = dict(COMMON, **overrides)
    if family == "mistral":
        kw.setdefault("sliding_window", None)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():   # non-trivial norms and biases, so a mix-up cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:   # peaked attention, so positions (RoPE) matter
                p.mul_(12.0)
    model.save_pretrained(out)
    return model


def make_internlm2(out: Path, seed: int = 0):
    """An InternLM2 checkpoint (packed wqkv, its own names) holding the weights of a random Llama, which
    transformers can run as the reference (InternLM2 needs remote code it does not ship)."""
    llama = make_hf("llama", out / "_llama", seed)
    cfg = llama.config
    hk, hq, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    rep = hq // hk
    sd = {}
    for name, t in llama.state_dict().items():
        sd[name] = t.contiguous()
    out_sd = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight":
              sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        q = sd[a + "q_proj.weight"].view(hk, rep, d, -1)
        k = sd[a + "k_proj.weight"].view(hk, 1, d, -1)
        v = sd[a + "v_proj.weight"].view(hk, 1, d, -1)
        out_sd[p + "attention.wqkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, cfg.hidden_size).contiguous()
        out_sd[p + "attention.wo.weight"] = sd[a + "o_proj.weight"]
        out_sd[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out_sd[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out_sd[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out_sd[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out_sd[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    save_file(out_sd, str(out / "model.safetensors"))
    conf = dict(COMMON, architectures=["InternLM2ForCausalLM"], bias=False, rope_theta=10000.0)
    (out / "config.json").write_text(json.dumps(conf))
    return llama

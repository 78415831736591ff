"""The peer in every benchmark run: HF transformers `generate` on the same prompts (as LMDeploy's tutorial puts
benchmark_transformer.py next to benchmark_lmdeploy.py), reported as tokens/s and words/s.

A model directory is loaded with `from_pretrained`, the way an HF user would. A random-weight shape gets an HF
LlamaForCausalLM whose parameters are views of the engine's own weights (no second copy in GPU memory), so both
sides compute the same function.
"""
from __future__ import annotations

import logging
import time
from typing import List, Optional

import torch

log = logging.getLogger(__name__)


def _hf_config(cfg, dtype: torch.dtype):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
                       tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                       eos_token_id=(cfg.eos_token_ids or [None])[0], pad_token_id=0, dtype=dtype)


def shared_weight_model(engine):
    """An HF LlamaForCausalLM over the (dense) weights the engine already holds."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    runner, cfg = engine.runner, engine.model_cfg
    m = runner.model
    if cfg.quant:
        raise ValueError("the HF peer needs dense weights: run it without --quant")
    sd = {"model.embed_tokens.weight": m.embed, "model.norm.weight": m.norm, "lm_head.weight": m.lm_head}
    for i, layer in enumerate(m.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.qkv.weight.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)     # [out, in] each
        gate, up = layer.gate_up.weight.split([cfg.intermediate_size] * 2, dim=0)
        sd.update({p + "input_layernorm.weight": layer.input_norm,
                   p + "post_attention_layernorm.weight": layer.post_attn_norm,
                   p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.o.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": layer.down.weight})
    hf_cfg = _hf_config(cfg, runner.dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    with torch.device(runner.device):
        model.model.rotary_emb = LlamaRotaryEmbedding(hf_cfg)       # its inv_freq is a buffer, not in the dict
    return model.eval()


def load(mut):
    """The HF peer for a ModelUnderTest."""
    if mut.model_dir is None:
        return shared_weight_model(mut.engine)
    from transformers import AutoModelForCausalLM
    r = mut.engine.runner
    return AutoModelForCausalLM.from_pretrained(mut.model_dir, dtype=r.dtype).to(r.device).eval()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def generate(model, prompts: List[List[int]], max_new_tokens: List[int], batch_size: int, tokenizer=None,
             progress=None) -> dict:
    """Static batches of `batch_size` prompts, left-padded; each batch runs to its longest requested output,
    ignoring EOS. Useful tokens are those each request asked for; the rest is what static batching wastes."""
    device = model.device
    pad = model.config.pad_token_id or 0
    useful = generated = words = 0
    t0 = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        batch, outs = prompts[b:b + batch_size], max_new_tokens[b:b + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)        # [B, S]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        n = max(outs)
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad)
        new = seq[:, width:].tolist()                                                           # [B, n]
        generated += len(batch) * n
        useful += sum(outs)
        if tokenizer is not None:
            words += sum(len(tokenizer.decode(t[:k], skip_special_tokens=True).split()) for t, k in zip(new, outs))
        if progress is not None:
            progress.update(len(batch))
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "output_tok_s": useful / elapsed, "generated_tok_s": generated / elapsed,
            "words_s": words / elapsed if tokenizer is not None else None, "batch_size": batch_size}


def words_per_second(tokenizer, outputs: List[List[int]], elapsed: float) -> Optional[float]:
    """Words in the decoded outputs per second (None without a tokenizer), as LMDeploy's benchmark reports."""
    if tokenizer is None or elapsed <= 0:
        return None
    return sum(len(tokenizer.decode(o, skip_special_tokens=True).split()) for o in outputs) / elapsed

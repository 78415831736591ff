"""Each supported family: the engine's logits over the paged cache equal HF transformers' (fp32, 1e-4)."""
import pytest
import torch

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.engine.sequence import Sequence
from backend.model.config import ModelConfig
from tests.tiny_models import make_hf, make_internlm2

PROMPT = [5, 17, 99, 3, 250, 7, 64, 128, 11, 2, 200, 31, 45, 8, 19, 77, 300, 1, 42]


def engine_logits(model_dir, token_ids, chunk=None, **cfg):
    """Logits of every prompt position, computed through the paged cache (optionally in chunks)."""
    eng = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", cache_block_seq_len=8,
                                 cache_max_entry_count=32, session_len=256, **cfg))
    seq = Sequence("x", token_ids, SamplingParams(max_tokens=1))
    runner, out = eng.runner, []
    step = chunk or len(token_ids)
    with torch.inference_mode():
        while seq.num_computed_tokens < len(seq):
            n = min(step, len(seq) - seq.num_computed_tokens)
            eng.block_manager.allocate(seq, seq.num_computed_tokens + n)
            ids, meta, _ = runner.prepare([(seq, n)])
            out.append(runner.model.logits(runner.model.forward(ids, meta, runner.kv_cache)))
            seq.num_computed_tokens += n
    return torch.cat(out)


def hf_logits(model, token_ids):
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_family_logits_match_hf(tmp_path, family):
    model = make_hf(family, tmp_path)
    ours = engine_logits(tmp_path, PROMPT)
    torch.testing.assert_close(ours, hf_logits(model, PROMPT), atol=1e-4, rtol=1e-4)


def test_qwen2_has_qkv_bias(tmp_path):
    make_hf("qwen2", tmp_path)
    assert ModelConfig.load(tmp_path).qkv_bias


def test_internlm2_packed_wqkv_matches_llama_reference(tmp_path):
    llama = make_internlm2(tmp_path)
    assert ModelConfig.load(tmp_path).arch == "InternLM2ForCausalLM"
    torch.testing.assert_close(engine_logits(tmp_path, PROMPT), hf_logits(llama, PROMPT), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_over_cache_matches_hf(tmp_path):
    model = make_hf("llama", tmp_path)
    torch.testing.assert_close(engine_logits(tmp_path, PROMPT, chunk=5), hf_logits(model, PROMPT),
                               atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_matches_hf(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model = make_hf("llama", tmp_path, rope_scaling=scaling, rope_theta=500000.0)
    cfg = ModelConfig.load(tmp_path)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    torch.testing.assert_close(engine_logits(tmp_path, PROMPT), hf_logits(model, PROMPT), atol=1e-4, rtol=1e-4)


def test_dynamic_ntk_changes_only_past_training_length(tmp_path):
    make_hf("llama", tmp_path, max_position_embeddings=16)
    plain = engine_logits(tmp_path, PROMPT[:12])
    ntk = engine_logits(tmp_path, PROMPT[:12], rope_scaling_factor=2.0)
    torch.testing.assert_close(plain, ntk)                       # 12 tokens < 16: untouched
    long_plain = engine_logits(tmp_path, PROMPT)
    long_ntk = engine_logits(tmp_path, PROMPT, rope_scaling_factor=2.0)
    assert not torch.allclose(long_plain, long_ntk)              # 19 tokens > 16: a larger base


def test_logn_attention_scales_queries_past_training_length(tmp_path):
    make_hf("llama", tmp_path, max_position_embeddings=16)
    a = engine_logits(tmp_path, PROMPT)
    b = engine_logits(tmp_path, PROMPT, use_logn_attn=True)
    torch.testing.assert_close(a[:16], b[:16])
    assert not torch.allclose(a[16:], b[16:])


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.load(tmp_path)

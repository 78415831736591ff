"""Hadamard rotation of K/V heads (backend/model/rotation.py) on the real SmolLM2 (head_dim 64), CPU fp32.

Rotation is exact algebra (q.k and the attention output are unchanged), so with an fp KV cache the logits must
not move (1e-4); with int4 KV it must cut the quantization error (mean KL to the fp-KV logits).
"""
from __future__ import annotations

import pytest
import torch

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.engine.sequence import Sequence
from backend.model.rotation import fold_o_cols, fold_v_rows, hadamard, resolve_kv_rotation


@torch.inference_mode()     # as the engine's own step: the CUDA graphs' static inputs are inference tensors
def forced_logits(engine: LLMEngine, ids, n_prompt: int) -> torch.Tensor:
    """Teacher-forced float32 logits [len(ids) - n_prompt + 1, V]: the prompt in one prefill, then one decode step
    a token (through the runner's CUDA graphs when it has them), each reading K/V back from the cache."""
    runner, bm = engine.runner, engine.block_manager
    seq = Sequence("forced", list(ids[:n_prompt]), SamplingParams(max_tokens=len(ids)))
    out = []
    try:
        n = n_prompt
        while True:
            bm.allocate(seq, len(seq))
            input_ids, meta, last = runner.prepare([(seq, n)])
            g = runner.graphs
            if g is not None and g.can_run(meta):
                hidden = g.run(input_ids, meta)
            else:
                hidden = runner.model.forward(input_ids, meta, runner.kv_cache)
            out.append(runner.model.logits(hidden[last]).float().cpu())
            seq.num_computed_tokens = len(seq)
            if len(seq) == len(ids):
                return torch.cat(out)
            seq.append_token(ids[len(seq)], None)
            n = 1
    finally:
        bm.free(seq)


def mean_kl(ref: torch.Tensor, x: torch.Tensor) -> float:
    p = torch.log_softmax(ref.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(x.double(), -1))).sum(-1).mean())


def _engine(model_dir, kv="auto", rotation="auto", **kw):
    cfg = dict(model=str(model_dir), dtype="float32", device="cpu", kv_cache_dtype=kv, kv_rotation=rotation,
               session_len=512, max_batch_size=1, cache_block_seq_len=16, cache_max_entry_count=40)
    return LLMEngine(EngineConfig(**dict(cfg, **kw)))


@pytest.fixture(scope="module")
def text_ids(demo_model_dir):
    from backend.llm import load_tokenizer
    from tools.wiki_text import token_windows
    return token_windows(load_tokenizer(demo_model_dir), "wiki", "eval", 1, 200, 0)[0]


def test_hadamard_is_orthonormal_and_folds_are_exact():
    h = hadamard(64, torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(64, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="head_dim a power of two, got head_dim 80"):
        hadamard(80)
    g = torch.Generator().manual_seed(0)
    hq, hk, d, hid = 4, 2, 64, 32
    w = torch.randn((hq + 2 * hk) * d, hid, generator=g, dtype=torch.float64)
    x = torch.randn(5, hid, generator=g, dtype=torch.float64)
    v = (x @ w.t())[:, (hq + hk) * d:].reshape(5, hk, d)
    v2 = (x @ fold_v_rows(w, hq * d, hk * d, d, h).t())[:, (hq + hk) * d:].reshape(5, hk, d)
    assert torch.allclose(v2, v @ h, atol=1e-10)                         # v' = v H
    wo = torch.randn(hid, hq * d, generator=g, dtype=torch.float64)
    o = torch.randn(5, hq, d, generator=g, dtype=torch.float64)
    assert torch.allclose((o @ h).reshape(5, -1) @ fold_o_cols(wo, d, h).t(), o.reshape(5, -1) @ wo.t(), atol=1e-10)


def test_kv_rotation_resolution_and_errors():
    assert resolve_kv_rotation("auto", "int4", 64, False) is True
    assert resolve_kv_rotation("auto", "int8", 64, False) is False   # int8 measured no better: docs/quantization.md
    assert resolve_kv_rotation("auto", "auto", 64, False) is False
    assert resolve_kv_rotation("auto", "int4", 64, True) is False    # static kv_qparams: calibrated unrotated
    assert resolve_kv_rotation("auto", "int4", 80, False) is False
    assert resolve_kv_rotation("hadamard", "auto", 128, False) is True
    assert resolve_kv_rotation("off", "int4", 64, False) is False
    with pytest.raises(ValueError, match="head_dim 96"):
        resolve_kv_rotation("hadamard", "int4", 96, False)
    with pytest.raises(ValueError, match="kv_rotation must be one of"):
        EngineConfig(kv_rotation="random")
    with pytest.raises(ValueError, match="kv_rotation=hadamard cannot be combined with kv_qparams"):
        EngineConfig(kv_cache_dtype="int4", kv_qparams="x.json", kv_rotation="hadamard")


@pytest.mark.slow      # the two SmolLM2 tests: ~60 s together on the 2-core box
def test_rotation_leaves_fp_kv_logits_unchanged(demo_model_dir, text_ids):
    ref = forced_logits(_engine(demo_model_dir, rotation="off"), text_ids, 160)
    rot_engine = _engine(demo_model_dir, rotation="hadamard")
    assert rot_engine.runner.model.rot is not None
    rot = forced_logits(rot_engine, text_ids, 160)
    assert ref.shape == (41, 49152)
    assert (rot - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_rotation_cuts_int4_kv_error(demo_model_dir, text_ids):
    ref = forced_logits(_engine(demo_model_dir), text_ids, 160)
    auto = _engine(demo_model_dir, kv="int4")                             # auto: rotated
    assert auto.runner.model.rot is not None
    kl_rot = mean_kl(ref, forced_logits(auto, text_ids, 160))
    kl_off = mean_kl(ref, forced_logits(_engine(demo_model_dir, kv="int4", rotation="off"), text_ids, 160))
    assert kl_rot < 0.75 * kl_off, (kl_rot, kl_off)


def test_rotation_at_run_time_for_w4a16_weights(tmp_path):
    """W4A16 qkv / o cannot absorb H: v and o are rotated at run time; fp-KV logits still do not move."""
    from tests.tiny_models import make_hf
    from tools.awq import quantize_model
    make_hf("llama", tmp_path / "hf", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512)
    quantize_model(tmp_path / "hf", tmp_path / "awq", 4, 64, None, "rtn", progress=False)
    ids = list(range(3, 43))
    ref = forced_logits(_engine(tmp_path / "awq", rotation="off"), ids, 30)
    eng = _engine(tmp_path / "awq", rotation="hadamard")
    assert all(layer.rotate_v and layer.rotate_o for layer in eng.runner.model.layers)
    assert (forced_logits(eng, ids, 30) - ref).abs().max().item() < 1e-4

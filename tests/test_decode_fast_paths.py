"""The decode fast-path switches (EngineConfig.decode_step_in_graph, fuse_rope_kv) never change tokens.

CPU: the real SmolLM2 runs the pure-torch path, where the fused rotary + KV write is its reference (rotary, then
the write) and there is no CUDA graph: every switch must leave tokens, logprobs and KV accounting unchanged.
The GPU side (kernel vs unfused kernels, graphs with lm_head + argmax inside) is in test_kernels.py and
test_gpu_engine.py.
"""
import pytest
import torch

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.kernels.kv_cache import KVCache, write_kv_ref
from backend.kernels.rotary import rotary_ref
from backend.kernels.rotary_kv import rotary_write_kv

SWITCHES = [dict(fuse_rope_kv=True), dict(decode_step_in_graph=True),
            dict(fuse_rope_kv=True, decode_step_in_graph=True)]
# one batch mixing what the sampler does: plain greedy, seeded sampling, logprobs, a penalty, min_tokens
PARAMS = [SamplingParams(max_tokens=10, temperature=0.0),
          SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5),
          SamplingParams(max_tokens=10, temperature=0.0, logprobs=True),
          SamplingParams(max_tokens=10, temperature=0.7, top_k=20, repetition_penalty=1.3, seed=11, min_tokens=4)]
TEXTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,", "Water boils at"]


def _run(model_dir, prompts, **switches):
    eng = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", session_len=256,
                                 max_batch_size=8, cache_block_seq_len=16, cache_max_entry_count=64, **switches))
    for i, (p, sp) in enumerate(zip(prompts, PARAMS)):
        eng.add_request(i, p, sp)
    tokens = {i: [] for i in range(len(prompts))}
    logprobs = {i: [] for i in range(len(prompts))}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.error is None, o.error
            tokens[o.request_id] += o.new_token_ids
            logprobs[o.request_id] += o.new_logprobs
    assert eng.block_manager.num_used_blocks == 0
    return tokens, logprobs


@pytest.fixture(scope="module")
def prompts(demo_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(demo_model_dir))
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def baseline(demo_model_dir, prompts):
    return _run(demo_model_dir, prompts)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "+".join(s))
def test_switches_leave_tokens_unchanged(demo_model_dir, prompts, baseline, switches):
    tokens, logprobs = _run(demo_model_dir, prompts, **switches)
    assert tokens == baseline[0]
    assert logprobs == baseline[1]
    assert all(len(t) == 10 for t in tokens.values())


def test_fused_rotary_kv_reference_is_rotary_then_write():
    torch.manual_seed(0)
    t, hq, hk, d, bs = 5, 4, 2, 64, 4
    qkv = torch.randn(t, (hq + 2 * hk) * d)
    q = qkv[:, :hq * d].view(t, hq, d)                                              # strided views, as in the model
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    pos = torch.tensor([0, 3, 9, 200, 511], dtype=torch.int32)
    slots = torch.tensor([1, 6, 0, 13, 9], dtype=torch.int32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    for kv_dtype in ("auto", "int8", "int4"):
        fused, plain = (KVCache(1, 4, bs, hk, d, kv_dtype, torch.float32, "cpu") for _ in range(2))
        got = rotary_write_kv(q, k, v, pos, inv, 256, fused.layer(0), slots)
        q_ref, k_ref = rotary_ref(q, k, pos, inv, 256)
        write_kv_ref(k_ref, v, plain.layer(0), slots)
        assert torch.equal(got, q_ref)
        assert torch.equal(fused.k, plain.k) and torch.equal(fused.v, plain.v)
        if kv_dtype != "auto":
            assert torch.equal(fused.k_qp, plain.k_qp) and torch.equal(fused.v_qp, plain.v_qp)


def test_switches_are_engine_parameters():
    cfg = EngineConfig.from_dict({"decode_step_in_graph": True, "fuse_rope_kv": True})
    assert cfg.decode_step_in_graph and cfg.fuse_rope_kv
    assert EngineConfig().decode_step_in_graph and EngineConfig().fuse_rope_kv            # on by default
    cfg = EngineConfig.from_dict({"decode_step_in_graph": False, "fuse_rope_kv": False})
    assert not cfg.decode_step_in_graph and not cfg.fuse_rope_kv


def test_load_decode_writes_what_prepare_builds():
    """The one-copy input layout of decode_step_in_graph against ModelRunner.prepare (checked on CPU tensors)."""
    from types import SimpleNamespace

    from backend.engine.cuda_graph import DecodeGraphs
    from backend.engine.model_runner import ModelRunner
    from backend.engine.sequence import Sequence
    cfg = EngineConfig(device="cpu", session_len=64, max_batch_size=8, cache_block_seq_len=4,
                       decode_step_in_graph=True)
    runner = SimpleNamespace(config=cfg, block_size=4, device=torch.device("cpu"), model=None)
    g = DecodeGraphs.__new__(DecodeGraphs)           # the buffers and layout only: no model, no capture
    g.runner, g.session_len, g.max_bs, g.max_blocks = runner, 64, 8, 16
    g.buckets, g.in_graph, g.enabled = [1, 2, 4, 8], True, True
    g._static_buffers()

    def seq(n_tokens, table):
        s = Sequence("r", list(range(100, 100 + n_tokens)), SamplingParams())
        s.num_computed_tokens, s.block_table = n_tokens - 1, table
        return s
    big = [(seq(n, list(range(30 + 5 * i, 30 + 5 * i + -(-n // 4)))), 1) for i, n in enumerate((3, 9, 17, 40, 64))]
    for batch in (big, big[::-1][:3], big[:1]):                 # a smaller batch after a larger one: padding is reset
        assert g.can_load(batch)
        bs = g.load_decode(batch)
        n = len(batch)
        ids, meta, _ = ModelRunner.prepare(runner, batch)
        assert bs == min(b for b in g.buckets if b >= n)
        assert torch.equal(g.ids32[:n], ids.to(torch.int32))
        assert torch.equal(g.positions[:n], meta.positions)
        assert torch.equal(g.slot_mapping[:n], meta.slot_mapping)
        assert torch.equal(g.context_lens[:n], meta.context_lens)
        for r, c in enumerate(meta.ctx_lens):             # the blocks attention reads; the rest may be stale
            assert torch.equal(g.block_tables[r, :-(-c // 4)], meta.block_tables[r, :-(-c // 4)])
        assert (g.slot_mapping[n:bs] == -1).all() and (g.context_lens[n:bs] == 0).all()
    assert not g.can_load([(seq(64, list(range(16))), 1), (seq(65, list(range(17))), 1)])   # past session_len

"""W4A16 linears that exist only in the kernels' runtime layout (random benchmark weights of 70B shapes, made per
tensor-parallel rank on its GPU): the layout round-trips, the CPU path computes what the layout holds, the CUDA
kernels agree with it, and tp sharding refuses such tensors instead of replicating them."""
import dataclasses
import functools

import pytest
import torch

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.engine.tp import RankWeights
from backend.kernels.w4a16_runtime import random_runtime, repack, unrepack
from backend.model.layers import Linear
from backend.model.tp import shard_tensor
from backend.model.random_model import random_shard
from scripts.bench_tp import TINY_AWQ

K, N, G = 256, 96, 128


def _runtime_dict(device="cpu", bias=False):
    rt = random_runtime(K, N, G, 0.01, torch.float16, device, torch.Generator(device=device).manual_seed(3))
    w = {"l.rt_qweight": rt.qweight, "l.rt_zeros": rt.zeros, "l.rt_scales": rt.scales[torch.float16]}
    if bias:
        w["l.bias"] = torch.randn(N, device=device).half()
    return rt, w


def test_random_runtime_is_a_valid_layout():
    rt, _ = _runtime_dict()
    q, z, s = unrepack(rt)
    assert q.shape == (K, N) and 0 <= int(q.min()) and int(q.max()) <= 15 and q.float().std() > 4
    assert torch.equal(z, torch.full((K // G, N), 8, dtype=torch.int32))
    assert torch.equal(s, torch.full((K // G, N), 0.01, dtype=torch.float16))
    again = repack(q, z, s, G)
    assert torch.equal(again.qweight, rt.qweight) and torch.equal(again.zeros, rt.zeros)
    with pytest.raises(ValueError, match=r"out_features=100 \(kernels need a multiple of 16\)"):
        random_runtime(K, 100, G, 0.01, torch.float16, "cpu", torch.Generator())
    with pytest.raises(ValueError, match=r"scales dtype=torch.float32"):
        random_runtime(K, N, G, 0.01, torch.float32, "cpu", torch.Generator())


def test_runtime_only_linear_on_cpu_computes_the_layout():
    rt, w = _runtime_dict(bias=True)
    lin = Linear.from_weights(w, "l", G)
    assert lin.is_quantized and lin.qweight is None and lin.out_features == N and lin.runtime is not None
    q, z, s = unrepack(rt)
    want_w = ((q.float() - z.float().repeat_interleave(G, 0)) * s.float().repeat_interleave(G, 0)).half().float()
    x = torch.randn(3, K)
    torch.testing.assert_close(lin(x), x @ want_w + w["l.bias"].float(), atol=1e-4, rtol=1e-4)


def test_sharding_refuses_the_runtime_layout():
    with pytest.raises(ValueError, match=r"layers.0.qkv.rt_qweight: W4A16 in the kernels' runtime layout cannot "
                                         r"be split"):
        shard_tensor("layers.0.qkv.rt_qweight", torch.zeros(1), TINY_AWQ, 0, 2)


def test_rank_weights_build_each_shard_at_tp2():
    """Each rank makes its own shard (no full copy); the engine runs; rank 0 holds half the heads' columns."""
    cfg = dataclasses.replace(TINY_AWQ, quant={"method": "awq", "bits": 4, "group_size": G})
    make = RankWeights(functools.partial(random_shard, cfg, torch.float32, "cpu", 0))
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", tp=2, session_len=128, max_batch_size=2,
                                    cache_max_entry_count=8), model_cfg=cfg, weights=make)
    try:
        layer = engine.runner.model.layers[0]
        assert layer.qkv.out_features == (cfg.q_size + 2 * cfg.kv_size) // 2 and layer.qkv.qweight is None
        assert layer.down.runtime.in_features == cfg.intermediate_size // 2
        engine.add_request(0, [1, 2, 3, 4], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        out = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
        assert len(out) == 3
    finally:
        engine.close()


@pytest.mark.gpu
def test_runtime_only_linear_kernels_match_the_layout():
    rt, w = _runtime_dict("cuda", bias=True)
    lin = Linear.from_weights(w, "l", G)
    dense = lin.dense_weight().float()                                # [N, K] from the layout itself
    for tokens in (1, 5, 33, 200):                                    # decode GEMV, ring GEMV, dequant + cuBLAS
        x = torch.randn(tokens, K, device="cuda").half()
        want = x.float() @ dense.t() + w["l.bias"].float()
        torch.testing.assert_close(lin(x).float(), want, atol=2e-2, rtol=2e-2)


def test_random_model_directory_loads_at_tp1_and_tp2(tmp_path):
    """A workspace with random_weights.json and no weight files: each rank makes its shard when it loads."""
    from backend.model.random_model import write_random
    cfg = dataclasses.replace(TINY_AWQ, quant={"method": "awq", "bits": 4, "group_size": G})
    write_random(tmp_path, cfg, seed=5)
    assert not list(tmp_path.glob("*.safetensors"))
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", tp=tp, session_len=128,
                                        max_batch_size=2, cache_max_entry_count=8))
        try:
            qkv = engine.runner.model.layers[1].qkv
            assert qkv.qweight is None and qkv.out_features == (cfg.q_size + 2 * cfg.kv_size) // tp
            engine.add_request(0, [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
            while engine.has_unfinished():
                engine.step()
        finally:
            engine.close()

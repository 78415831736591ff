"""The tensor-core paged decode kernel (paged_attention_mma.py) against the pure-torch reference.

Run on the device: PYTHONPATH=. python -m pytest -m gpu tests/test_attention_mma.py
Tolerances as in test_kernels.py (outputs rounded to fp16/bf16); P goes through the mma in fp16/bf16 (for int8/int4
V times the token's scale: RAW codes, pa.MMA_RAW) or int8/int4 V is dequantized in f16x2/bf16x2 (exact codes), each
one more rounding that averages out over the context.
"""
import math

import pytest
import torch

from backend.kernels import paged_attention as pa
from backend.kernels.paged_attention import AttnMetadata
from tests.test_kernels import _random_cache      # random codes + scale / zero, as the CUDA-core kernel's tests

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
CTX = [1, 17, 300, 1100, 257]           # none but 1 fills its last block (16 | 64 | 128)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _meta(ctx_lens, bs):
    width = max(-(-c // bs) for c in ctx_lens)
    num_blocks = width * len(ctx_lens) + 3
    perm = torch.randperm(num_blocks)[:width * len(ctx_lens)].view(len(ctx_lens), width)
    n = len(ctx_lens)
    i32 = dict(dtype=torch.int32, device=DEV)
    return AttnMetadata(positions=torch.zeros(n, **i32), slot_mapping=torch.zeros(n, **i32),
                        block_tables=perm.to(**i32), context_lens=torch.tensor(ctx_lens, **i32),
                        cu_seqlens_q=torch.arange(n + 1, **i32), q_lens=[1] * n, ctx_lens=ctx_lens,
                        is_decode=True, max_context_len=max(ctx_lens)), num_blocks


def _case(hq, hk, d, bs, kv_dtype, dtype=torch.float16, ctx=CTX):
    meta, nb = _meta(ctx, bs)
    cache = _random_cache(kv_dtype, dtype, nb, bs, hk, d)
    q = torch.randn(len(ctx), hq, d, dtype=dtype, device=DEV)
    return meta, cache.layer(0), q


GRID = [(hq, hk, d, bs, kv) for hq, hk in [(32, 32), (9, 3), (32, 8), (16, 2)] for d in (64, 128)
        for bs in (16, 64, 128) for kv in ("auto", "int8", "int4")]


@pytest.mark.parametrize("partition", [128, 2048])          # split (reduce kernel) and one split
@pytest.mark.parametrize("hq,hk,d,bs,kv_dtype", GRID)
def test_mma_decode_matches_reference(hq, hk, d, bs, kv_dtype, partition):
    meta, layer, q = _case(hq, hk, d, bs, kv_dtype)
    scale = 1 / math.sqrt(d)
    got = pa.paged_decode(q, layer, meta.block_tables, meta.context_lens, meta.max_context_len, scale,
                          partition=partition, impl="mma")
    torch.testing.assert_close(got, pa.paged_attention_ref(q, layer, meta, scale), **TOL[torch.float16])


@pytest.mark.parametrize("raw", ["none", "all"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_raw_and_exact_codes_both_match_reference(monkeypatch, kv_dtype, dtype, raw):
    # RAW folds MAGIC into the zero points (bf16 int8 always takes the exact path); long contexts: many tiles
    monkeypatch.setattr(pa, "MMA_RAW", raw)
    meta, layer, q = _case(32, 8, 128, 64, kv_dtype, dtype, ctx=[5, 700, 4000])
    got = pa.paged_decode(q, layer, meta.block_tables, meta.context_lens, meta.max_context_len, 0.088, impl="mma")
    torch.testing.assert_close(got, pa.paged_attention_ref(q, layer, meta, 0.088), **TOL[dtype])


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (9, 3, 64)])
def test_mma_decode_bf16(hq, hk, d, kv_dtype):
    meta, layer, q = _case(hq, hk, d, 64, kv_dtype, torch.bfloat16, ctx=[5, 700, 2000])
    got = pa.paged_decode(q, layer, meta.block_tables, meta.context_lens, meta.max_context_len, 0.088, impl="mma")
    torch.testing.assert_close(got, pa.paged_attention_ref(q, layer, meta, 0.088), **TOL[torch.bfloat16])


def test_mma_dispatch_switch(monkeypatch):
    """paged_attention takes the tensor-core kernel when DECODE_IMPL is 'mma' (GQA ratio <= 8)."""
    meta, layer, q = _case(32, 8, 128, 64, "int8")
    monkeypatch.setattr(pa, "DECODE_IMPL", "mma")
    got = pa.paged_attention(q, layer, meta, 0.1)
    forced = pa.paged_decode(q, layer, meta.block_tables, meta.context_lens, meta.max_context_len, 0.1,
                             impl="mma")
    torch.testing.assert_close(got, forced, atol=0, rtol=0)
    torch.testing.assert_close(got, pa.paged_attention_ref(q, layer, meta, 0.1), **TOL[torch.float16])
    with pytest.raises(ValueError, match="impl"):
        pa.use_mma(32, 8, "tensor")


@pytest.mark.parametrize("kv_dtype", ["auto", "int4"])
def test_mma_static_bound_is_exact_and_pads_with_zeros(kv_dtype):
    """A CUDA graph passes session_len as the bound and context 0 for padded rows."""
    meta, layer, q = _case(32, 8, 128, 64, kv_dtype, ctx=[900, 33, 1])
    args = (q, layer, meta.block_tables, meta.context_lens)
    tight = pa.paged_decode(*args, 900, 0.1, impl="mma")
    loose = pa.paged_decode(*args, 8192, 0.1, impl="mma")
    torch.testing.assert_close(tight, loose, atol=0, rtol=0)
    padded = pa.paged_decode(q, layer, meta.block_tables, torch.zeros_like(meta.context_lens), 64, 0.1,
                             impl="mma")
    assert padded.abs().max().item() == 0


@pytest.mark.parametrize("cap", [8, 1])
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_split_cap_grows_the_splits_exactly(monkeypatch, kv_dtype, cap):
    """Capped split counts: long contexts get longer splits (cap 1: thousands of tokens a split), the reference
    still holds and a looser static bound changes no bit."""
    monkeypatch.setattr(pa, "SPLIT_CTAS_PER_SM", cap)
    meta, layer, q = _case(32, 8, 128, 64, kv_dtype, ctx=[7000, 5700, 33])
    args = (q, layer, meta.block_tables, meta.context_lens)
    tight = pa.paged_decode(*args, 7000, 0.1, impl="mma")
    loose = pa.paged_decode(*args, 8192, 0.1, impl="mma")
    assert pa.split_plan(3, 32, 8, 8192, 0, 0, "mma", kv_dtype)[0] < 8192 // pa.SMALL_PARTITION   # the cap acts
    assert torch.equal(tight, loose)
    torch.testing.assert_close(loose, pa.paged_attention_ref(q, layer, meta, 0.1), **TOL[torch.float16])


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_mma_decode_in_cuda_graph(kv_dtype):
    """Captured once with a static bound, replayed with other context lengths: equals the eager kernel."""
    hq, hk, d, bs, bound = 32, 8, 128, 64, 4096
    meta, layer, q = _case(hq, hk, d, bs, kv_dtype, ctx=[bound] * 3)
    lens = meta.context_lens.clone()
    static_q = q.clone()
    pa.paged_decode(static_q, layer, meta.block_tables, lens, bound, 0.1, impl="mma")    # compile outside
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = pa.paged_decode(static_q, layer, meta.block_tables, lens, bound, 0.1, impl="mma")
    torch.cuda.current_stream().wait_stream(stream)
    for ctx in ([4096, 1, 2000], [77, 3000, 0], [513, 64, 4095]):
        lens.copy_(torch.tensor(ctx, dtype=torch.int32))
        static_q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        eager = pa.paged_decode(static_q, layer, meta.block_tables, lens, max(ctx), 0.1, impl="mma")
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
        live = [i for i, c in enumerate(ctx) if c > 0]
        meta_live = AttnMetadata(meta.positions[live], meta.slot_mapping[live], meta.block_tables[live],
                                 lens[live], meta.cu_seqlens_q[:len(live) + 1], [1] * len(live),
                                 [ctx[i] for i in live], True, max(ctx))
        ref = pa.paged_attention_ref(static_q[live], layer, meta_live, 0.1)
        torch.testing.assert_close(out[live], ref, **TOL[torch.float16])
        assert out[[i for i, c in enumerate(ctx) if c == 0]].abs().sum().item() == 0


@pytest.mark.parametrize("impl", ["mma", "cuda"])
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_split_reduce_in_the_last_cta_equals_the_reduce_kernel(monkeypatch, impl, kv_dtype):
    """LMTRITON_SPLIT_REDUCE: the last CTA of a group combines the splits with the same arithmetic as reduce_splits
    (bit for bit), padded rows (context 0) still get zeros, and the arrival counters are zero again afterwards (the
    next launch and every CUDA-graph replay count from zero)."""
    from backend.kernels import _cupy
    meta, layer, q = _case(32, 8, 128, 64, kv_dtype, ctx=[900, 33, 1, 2000])
    lens = meta.context_lens.clone()
    lens[2] = 0
    args = (q, layer, meta.block_tables, lens, 2048, 0.1)
    got = {}
    for mode in ("kernel", "block"):
        monkeypatch.setattr(_cupy, "SPLIT_REDUCE", mode)
        got[mode] = [pa.paged_decode(*args, partition=p, impl=impl) for p in (128, 512)]
    for a, b in zip(got["kernel"], got["block"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert b[2].abs().max().item() == 0
    ref = pa.paged_attention_ref(q, layer, meta, 0.1)          # row 2 had context 1 there
    torch.testing.assert_close(got["block"][0][[0, 1, 3]], ref[[0, 1, 3]], **TOL[torch.float16])
    assert int(_cupy.zeroed_scratch("attention_split_counters", 4, q.device.index).abs().sum()) == 0

"""GPU kernels vs their pure-torch references (run on the device: PYTHONPATH=. python -m pytest -m gpu).

Tolerances: outputs are rounded to fp16 (bf16), so the kernels may differ from the float32 references by one
rounding of the result plus float32 reordering: fp16 atol = rtol = 3e-3, bf16 2e-2. The KV write is exact
(same float32 formulas, IEEE division, round-half-even), and so is the decode kernel against itself under a
looser static bound on the context (what a CUDA graph passes).
"""
import math

import pytest
import torch

from backend.kernels import activation, kv_cache, paged_attention, rms_norm, rotary, rotary_kv
from backend.kernels.kv_cache import KVCache
from backend.kernels.paged_attention import AttnMetadata

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 64), (7, 1376), (33, 11008)])
def test_silu_and_mul(dtype, t, inter):
    x = torch.randn(t, 2 * inter, dtype=dtype, device=DEV) * 3
    torch.testing.assert_close(activation.silu_and_mul(x), activation.silu_and_mul_ref(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 1024, 4096, 8192])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    x = torch.randn(5, hidden, dtype=dtype, device=DEV)
    res = torch.randn(5, hidden, dtype=dtype, device=DEV) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    out, h = rms_norm.rms_norm(x, w, 1e-5, res)
    ref_out, ref_h = rms_norm.rms_norm_ref(x, w, 1e-5, res)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (9, 3, 64), (16, 16, 128)])
@pytest.mark.parametrize("per_token,logn", [(False, 0), (True, 0), (False, 2048)])
def test_rotary(dtype, hq, hk, d, per_token, logn):
    t = 37
    qkv = torch.randn(t, (hq + 2 * hk) * d, dtype=dtype, device=DEV)            # fused projection output
    q = qkv[:, :hq * d].view(t, hq, d)                                            # strided views, as in the model
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    pos = torch.randint(0, 5000, (t,), dtype=torch.int32, device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    if per_token:
        inv = inv[None, :] / (1 + torch.rand(t, 1, device=DEV))                  # [T, D/2]
    got = rotary.rotary(q, k, pos, inv, logn)
    ref = rotary.rotary_ref(q, k, pos, inv, logn)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL[dtype])


def _cache(kv_dtype, dtype, num_blocks, bs, hk, d):
    return KVCache(1, num_blocks, bs, hk, d, kv_dtype, dtype, DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("d", [64, 128])
def test_write_kv(dtype, kv_dtype, d):
    hk, bs, t = 4, 16, 50
    qkv = torch.randn(t, 3 * hk * d, dtype=dtype, device=DEV) * 2
    k = qkv[:, hk * d:2 * hk * d].view(t, hk, d)
    v = qkv[:, 2 * hk * d:].view(t, hk, d)
    slots = torch.randperm(8 * bs, device=DEV)[:t].to(torch.int32)
    got, ref = _cache(kv_dtype, dtype, 8, bs, hk, d), _cache(kv_dtype, dtype, 8, bs, hk, d)
    kv_cache.write_kv(k, v, got.layer(0), slots)
    kv_cache.write_kv_ref(k, v, ref.layer(0), slots)
    if kv_dtype == "auto":
        torch.testing.assert_close(got.k, ref.k, atol=0, rtol=0)
        torch.testing.assert_close(got.v, ref.v, atol=0, rtol=0)
        return
    # same float32 formulas as torch on the GPU (a scalar divisor becomes a reciprocal multiply), so scale and
    # zero are exact; a code may still land one step off where (x - min) / scale sits at .5
    torch.testing.assert_close(got.k_qp, ref.k_qp, atol=0, rtol=0)
    torch.testing.assert_close(got.v_qp, ref.v_qp, atol=0, rtol=0)
    for a, b in ((got.k, ref.k), (got.v, ref.v)):
        ca, cb = _codes(a, kv_dtype), _codes(b, kv_dtype)
        assert (ca - cb).abs().max().item() <= 1
        assert (ca != cb).float().mean().item() < 5e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("per_token,logn", [(False, 0), (True, 2048)])
def test_rotary_write_kv_equals_unfused(dtype, kv_dtype, hq, hk, d, per_token, logn):
    """The fused kernel against rotary + write_kv kernels: the same float32 expressions, so bit-identical is
    expected; allowed: one rounding step on < 0.1% of elements (NVRTC may contract a * b - c * d into an FMA
    differently in the two kernels), and then a code one step off where a head's min or max moved."""
    t, bs = 37, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d, dtype=dtype, device=DEV) * 2
    q = qkv[:, :hq * d].view(t, hq, d)                                            # strided views, as in the model
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    pos = torch.randint(0, 5000, (t,), dtype=torch.int32, device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    if per_token:
        inv = inv[None, :] / (1 + torch.rand(t, 1, device=DEV))                  # [T, D/2]
    slots = torch.randperm(8 * bs, device=DEV)[:t].to(torch.int32)
    slots[::5] = -1                                                               # padded rows: no write
    fused, plain = _cache(kv_dtype, dtype, 8, bs, hk, d), _cache(kv_dtype, dtype, 8, bs, hk, d)
    got = rotary_kv.rotary_write_kv(q, k, v, pos, inv, logn, fused.layer(0), slots)
    q_ref, k_rot = rotary.rotary(q, k, pos, inv, logn)
    kv_cache.write_kv(k_rot, v, plain.layer(0), slots)
    torch.testing.assert_close(got, q_ref, **TOL[dtype])
    assert (got != q_ref).float().mean().item() < 1e-3
    if kv_dtype == "auto":
        for a, b in ((fused.k, plain.k), (fused.v, plain.v)):
            torch.testing.assert_close(a, b, **TOL[dtype])
            assert (a != b).float().mean().item() < 1e-3
        return
    torch.testing.assert_close(fused.v_qp, plain.v_qp, atol=0, rtol=0)           # V is not rotated: exact
    assert torch.equal(fused.v, plain.v)
    torch.testing.assert_close(fused.k_qp, plain.k_qp, atol=1e-3, rtol=1e-2)
    ca, cb = _codes(fused.k, kv_dtype), _codes(plain.k, kv_dtype)
    assert (ca - cb).abs().max().item() <= 1
    assert (ca != cb).float().mean().item() < 5e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("had", [1, 2])
def test_rotary_write_kv_hadamard_equals_matmul(dtype, kv_dtype, hq, hk, d, had):
    """The in-kernel Walsh-Hadamard transform (KV rotation) against rotary, a matmul by the Hadamard matrix and the
    KV write: the same product summed in another order, so q and the cache agree to one rounding, and codes to one
    step where a head's min or max moved."""
    from backend.model.rotation import hadamard, rotate
    t, bs = 29, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d, dtype=dtype, device=DEV) * 2
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    pos = torch.randint(0, 5000, (t,), dtype=torch.int32, device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    slots = torch.randperm(8 * bs, device=DEV)[:t].to(torch.int32)
    fused, plain = _cache(kv_dtype, dtype, 8, bs, hk, d), _cache(kv_dtype, dtype, 8, bs, hk, d)
    got = rotary_kv.rotary_write_kv(q, k, v, pos, inv, 0, fused.layer(0), slots, hadamard=had)
    h = hadamard(d, dtype=dtype, device=DEV)
    q_ref, k_ref = rotary.rotary(q, k, pos, inv, 0)
    q_ref, k_ref = rotate(q_ref, h), rotate(k_ref, h)
    v_ref = rotate(v, h) if had == 2 else v
    kv_cache.write_kv(k_ref.contiguous(), v_ref.contiguous(), plain.layer(0), slots)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=8e-2, rtol=4e-2)
    torch.testing.assert_close(got, q_ref, **tol)
    if kv_dtype == "auto":
        torch.testing.assert_close(fused.k, plain.k, **tol)
        torch.testing.assert_close(fused.v, plain.v, **tol)
        return
    for a, b in ((fused.k, plain.k), (fused.v, plain.v)):
        ca, cb = _codes(a, kv_dtype), _codes(b, kv_dtype)
        assert (ca - cb).abs().max().item() <= 1
        assert (ca != cb).float().mean().item() < 0.05


def _codes(packed: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    if kv_dtype == "int4":
        packed = torch.stack([packed & 0xF, packed >> 4], -1)
    return packed.to(torch.int32)


def test_write_kv_skips_negative_slots():
    cache = _cache("int8", torch.float16, 2, 16, 2, 64)
    k = torch.randn(3, 2, 64, dtype=torch.float16, device=DEV)
    kv_cache.write_kv(k, k, cache.layer(0), torch.tensor([-1, 5, -1], dtype=torch.int32, device=DEV))
    written = (cache.k_qp[0, :, :, :, 0] != 0).sum().item()
    assert written == 2                                        # one token x two heads


def _random_cache(kv_dtype, dtype, num_blocks, bs, hk, d):
    c = _cache(kv_dtype, dtype, num_blocks, bs, hk, d)
    if kv_dtype == "auto":
        c.k.normal_()
        c.v.normal_()
    else:
        for x, qp in ((c.k, c.k_qp), (c.v, c.v_qp)):
            x.copy_(torch.randint(0, 256, x.shape, dtype=torch.uint8, device=DEV))
            qp[..., 0].uniform_(0.005, 0.03)
            qp[..., 1].uniform_(-2.0, -0.5)
    return c


def _decode_meta(ctx_lens, bs, q_lens=None):
    """-> (metadata with scattered blocks, number of blocks the cache needs)."""
    q_lens = q_lens or [1] * len(ctx_lens)
    width = max(-(-c // bs) for c in ctx_lens)
    num_blocks = width * len(ctx_lens) + 3
    perm = torch.randperm(num_blocks)[:width * len(ctx_lens)].view(len(ctx_lens), width)
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    i32 = dict(dtype=torch.int32, device=DEV)
    return AttnMetadata(positions=torch.zeros(cu[-1], **i32), slot_mapping=torch.zeros(cu[-1], **i32),
                        block_tables=perm.to(**i32), context_lens=torch.tensor(ctx_lens, **i32),
                        cu_seqlens_q=torch.tensor(cu, **i32), q_lens=q_lens, ctx_lens=ctx_lens,
                        is_decode=all(q == 1 for q in q_lens), max_context_len=max(ctx_lens)), num_blocks


DECODE_GRID = [(hq, hk, d, bs, kv) for hq, hk in [(32, 32), (9, 3), (32, 8), (8, 1)] for d in (64, 128)
               for bs in (16, 64, 128) for kv in ("auto", "int8", "int4")]


@pytest.mark.parametrize("hq,hk,d,bs,kv_dtype", DECODE_GRID)
def test_paged_decode(hq, hk, d, bs, kv_dtype):
    dtype = torch.float16
    ctx = [1, 17, 300, 1100, 257]
    meta, nb = _decode_meta(ctx, bs)
    cache = _random_cache(kv_dtype, dtype, nb, bs, hk, d)
    q = torch.randn(len(ctx), hq, d, dtype=dtype, device=DEV)
    scale = 1 / math.sqrt(d)
    got = paged_attention.paged_attention(q, cache.layer(0), meta, scale)
    ref = paged_attention.paged_attention_ref(q, cache.layer(0), meta, scale)
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_paged_decode_bf16(kv_dtype):
    dtype, hq, hk, d, bs = torch.bfloat16, 32, 8, 128, 64
    meta, nb = _decode_meta([5, 700, 2000], bs)
    cache = _random_cache(kv_dtype, dtype, nb, bs, hk, d)
    q = torch.randn(3, hq, d, dtype=dtype, device=DEV)
    got = paged_attention.paged_attention(q, cache.layer(0), meta, 0.088)
    torch.testing.assert_close(got, paged_attention.paged_attention_ref(q, cache.layer(0), meta, 0.088),
                               **TOL[dtype])


def test_paged_decode_static_bound_is_exact_and_pads_with_zeros():
    """A CUDA graph passes session_len as the bound and context 0 for padded rows."""
    hq, hk, d, bs = 32, 8, 128, 64
    meta, nb = _decode_meta([900, 33, 1], bs)
    cache = _random_cache("int8", torch.float16, nb, bs, hk, d)
    q = torch.randn(3, hq, d, dtype=torch.float16, device=DEV)
    layer = cache.layer(0)
    tight = paged_attention.paged_decode(q, layer, meta.block_tables, meta.context_lens, 900, 0.1)
    loose = paged_attention.paged_decode(q, layer, meta.block_tables, meta.context_lens, 8192, 0.1)
    torch.testing.assert_close(tight, loose, atol=0, rtol=0)
    padded = paged_attention.paged_decode(q, layer, meta.block_tables, torch.zeros_like(meta.context_lens),
                                          64, 0.1)
    assert padded.abs().max().item() == 0


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (9, 3, 64)])
def test_prefill_over_cached_prefix_varlen(kv_dtype, hq, hk, d):
    """Chunked prefill on top of cached blocks, mixed with decode rows, in one varlen batch."""
    dtype, bs = torch.float16, 16
    q_lens, ctx = [5, 1, 37, 1, 64], [70, 20, 37, 301, 200]
    meta, nb = _decode_meta(ctx, bs, q_lens)
    cache = _random_cache(kv_dtype, dtype, nb, bs, hk, d)
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=DEV)
    got = paged_attention.paged_attention(q, cache.layer(0), meta, 0.1)
    torch.testing.assert_close(got, paged_attention.paged_attention_ref(q, cache.layer(0), meta, 0.1),
                               **TOL[dtype])

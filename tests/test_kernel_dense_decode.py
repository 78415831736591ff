"""Dense fp16/bf16 decode GEMV (backend/kernels/dense_decode.py) vs its float32 reference, and where it is used.

Tolerances: the kernel multiplies the fp16/bf16 inputs exactly and accumulates in fp32 (in another order than the
reference), then rounds y once: ||y - ref|| / ||ref|| < 1e-3 (fp16) / 8e-3 (bf16), and every element within
4e-3 / 2e-2 of max|ref|.
"""
import pytest
import torch

from backend.kernels import dense_decode

TOL = {torch.float16: (1e-3, 4e-3), torch.bfloat16: (8e-3, 2e-2)}


def _check(y, ref):
    assert y.dtype == ref.dtype and y.shape == ref.shape and torch.isfinite(y).all()
    rel_tol, elem_tol = TOL[y.dtype]
    y, ref = y.float(), ref.float()
    assert float((y - ref).norm() / ref.norm()) < rel_tol
    assert float((y - ref).abs().max()) <= elem_tol * float(ref.abs().max())


def test_supports_only_gpu_decode_shapes():
    w = torch.randn(64, 128, dtype=torch.float16)
    assert not dense_decode.supports(torch.randn(1, 128, dtype=torch.float16), w)       # CPU tensors: cuBLAS/CPU path
    with pytest.raises(ValueError, match="1..8 tokens, got 9"):
        dense_decode.gemv(torch.randn(9, 128, dtype=torch.float16), w)


def test_linear_falls_back_to_f_linear_where_unsupported():
    x, w, b = torch.randn(3, 64), torch.randn(32, 64), torch.randn(32).half()   # CPU, fp32 x, fp16 bias
    torch.testing.assert_close(dense_decode.linear(x, w, b), torch.nn.functional.linear(x, w, b.float()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(576, 960), (1536, 576), (576, 49152), (4096, 4096), (11008, 4096), (96, 32)])
def test_dense_decode_matches_reference(monkeypatch, K, N, dtype):
    monkeypatch.setattr(dense_decode, "ENABLED", True)
    gen = torch.Generator(device="cuda").manual_seed(K + N)
    w = (torch.randn(N, K, device="cuda", generator=gen) / K ** 0.5).to(dtype)
    bias = torch.randn(N, device="cuda", generator=gen).to(dtype)
    for M in range(1, 9):
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        assert dense_decode.supports(x, w)
        _check(dense_decode.gemv(x, w), dense_decode.reference(x, w))
        _check(dense_decode.gemv(x, w, bias), dense_decode.reference(x, w, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("ks,u", [(1, 1), (2, 4), (4, 2), (8, 8), (16, 1), (3, 4), (8, 3)])
def test_dense_decode_configs_agree(ks, u):
    # K = 1248: 39 chunks of 32, so warps get uneven ranges, tails, and (ks 16) some none
    w = (torch.randn(1728, 1248, device="cuda") / 35).half()
    for M in (1, 5, 8):
        x = torch.randn(M, 1248, device="cuda").half()
        _check(dense_decode.gemv(x, w, None, dense_decode.DenseConfig(ks=ks, u=u)), dense_decode.reference(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None, (2, 1), (4, 4), (8, 2), (16, 4), (6, 3)])
def test_gemv_silu_equals_silu_of_the_gemv(dtype, cfg):
    """silu(gate) * up from the epilogue of the GEMV over a [gate | up] weight (I = 864: 54 blocks; K = 1248: uneven
    warp ranges) vs the float32 reference of the projection, then SiLU·mul."""
    import torch.nn.functional as F
    gen = torch.Generator(device="cuda").manual_seed(7)
    w = (torch.randn(1728, 1248, device="cuda", generator=gen) / 35).to(dtype)
    bias = torch.randn(1728, device="cuda", generator=gen).to(dtype)
    config = None if cfg is None else dense_decode.DenseConfig(ks=cfg[0], u=cfg[1])
    for M in (1, 5, 8):
        x = torch.randn(M, 1248, device="cuda", generator=gen).to(dtype)
        gate, up = F.linear(x.float(), w.float(), bias.float()).chunk(2, dim=-1)
        _check(dense_decode.gemv_silu(x, w, bias, config), (F.silu(gate) * up).to(dtype))


def test_gemv_silu_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="I a multiple of 16, got 1 tokens and 48 rows"):
        dense_decode.gemv_silu(torch.zeros(1, 128, dtype=torch.float16), torch.zeros(48, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="got 9 tokens"):
        dense_decode.gemv_silu(torch.zeros(9, 128, dtype=torch.float16), torch.zeros(64, 128, dtype=torch.float16))


@pytest.mark.gpu
def test_dense_decode_refuses_what_it_cannot_take(monkeypatch):
    monkeypatch.setattr(dense_decode, "ENABLED", True)
    w = torch.randn(64, 128, device="cuda").half()
    x = torch.randn(1, 128, device="cuda").half()
    assert not dense_decode.supports(x.float(), w)                   # fp32: F.linear
    assert not dense_decode.supports(x, w.bfloat16())                # mixed dtypes
    assert not dense_decode.supports(torch.randn(1, 120, device="cuda").half(), torch.randn(64, 120).cuda().half())
    assert not dense_decode.supports(x, torch.randn(60, 128, device="cuda").half())   # N % 16
    assert not dense_decode.supports(torch.randn(9, 128, device="cuda").half(), w)     # 9 tokens: cuBLAS
    assert not dense_decode.supports(x, torch.randn(128, 64, device="cuda").half().t())   # strided weight
    monkeypatch.setattr(dense_decode, "ENABLED", False)
    assert not dense_decode.supports(x, w)                            # LMTRITON_DENSE_GEMV=0: cuBLAS

"""W4A16 linear: canonical AWQ packing, RTN quantization, the runtime layout, and the CUDA kernels vs the reference.

GPU tolerances (relative to the fp32 reference `w4a16_linear_ref`, which dequantizes W to the scales' dtype):
- fp16: the kernels dequantize (q - z) * s with the same single fp16 rounding and accumulate in fp32; what is
  left is the summation order and the fp16 rounding of y: ||y - ref|| / ||ref|| < 2e-3.
- bf16: weights and scales are rounded to bf16 for the bf16 mma (8 mantissa bits) and y to bf16:
  ||y - ref|| / ||ref|| < 1.5e-2.
Every element is also checked: |y - ref| <= tol * max|ref| (tol 1e-2 fp16, 4e-2 bf16).
"""

import numpy as np
import pytest
import torch

from backend.kernels import w4a16
from backend.kernels.w4a16_runtime import repack, supports, unrepack
from backend.model.layers import Linear


def _random_awq(K, N, group, seed=0, device="cpu", frac=True):
    """-> (qweight, zeros fp16, scales, q, zeros): random codes, zero points on the 1/16 grid (integers if not
    frac), scales."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 241, (K // group, N), generator=gen, dtype=torch.int32).half() / 16
    z = z if frac else z.round()
    s = (torch.rand(K // group, N, generator=gen) * 0.02 + 0.001).half()
    return w4a16.pack_awq(q).to(device), z.to(device), s.to(device), q, z


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (64, 96), dtype=torch.int32)
    packed = w4a16.pack_awq(q)
    assert packed.shape == (64, 12) and packed.dtype == torch.int32
    assert torch.equal(w4a16.unpack_awq(packed), q)
    # AWQ order: nibble 1 of word 0 holds column 2
    one = torch.zeros(1, 8, dtype=torch.int32)
    one[0, 2] = 5
    assert int(w4a16.pack_awq(one)[0, 0]) == 5 << 4


def test_pack_rejects_bad_columns():
    with pytest.raises(ValueError, match="multiple of 8"):
        w4a16.pack_awq(torch.zeros(2, 12, dtype=torch.int32))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_rtn_error_bound(group):
    w = torch.randn(48, 256) * 0.05
    w[3, 7] = 0.9                                                        # an outlier widens one group
    qweight, zeros, scales = w4a16.quantize_rtn(w, group)
    assert qweight.shape == (256, 6) and zeros.shape == (256 // group, 48) and scales.shape == (256 // group, 48)
    assert scales.dtype == torch.float16 and zeros.dtype == torch.float16
    deq = w4a16.dequantize_awq(qweight, zeros, scales, group).float().t()    # [out, in]
    s = scales.float().repeat_interleave(group, 0).t()
    err = (deq - w).abs()
    assert (err <= 0.51 * s + 1e-6).all(), float((err / s).max())
    assert err.mean() < 0.3 * s.mean()                                   # most values land well inside


def test_quantize_rtn_names_bad_arguments():
    with pytest.raises(ValueError, match="group_size=48"):
        w4a16.quantize_rtn(torch.randn(8, 96), 48)
    with pytest.raises(ValueError, match="in_features must be a multiple"):
        w4a16.quantize_rtn(torch.randn(8, 100), 32)


def test_random_awq_linear_cpu_matches_dense():
    lin = w4a16.random_awq_linear(128, 64, group_size=64, bias=True, dtype=torch.float32)
    x = torch.randn(3, 128)
    ref = w4a16.w4a16_linear_ref(x, lin.qweight, lin.zeros, lin.scales, 64, lin.bias)
    torch.testing.assert_close(lin(x), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_runtime_layout_round_trip(group):
    K, N = 256, 48
    _, _, s, q, z = _random_awq(K, N, group)
    rt = repack(q, z, s, group)
    assert rt.qweight.shape == (N // 16, K // 64, 32, 4) and rt.zeros.shape == (N // 16, K // group, 16)
    assert rt.frac_zeros and not repack(q, z.round(), s, group).frac_zeros   # the kernels' integer path
    q2, z2, s2 = unrepack(rt)
    assert torch.equal(q2, q) and torch.equal(z2, z.float()) and torch.equal(s2, s)
    _, _, sb = unrepack(rt, torch.bfloat16)                                # converted once, cached
    assert sb.dtype == torch.bfloat16 and torch.bfloat16 in rt.scales


def test_supports_names_the_field():
    assert supports(4096, 11008, 128) == ""
    assert "group_size=16" in supports(4096, 4096, 16)
    assert "in_features=96" in supports(96, 64, 32)
    assert "out_features=40" in supports(128, 40, 64)


def _emulate_kernel(x, rt):
    """The GEMV/GEMM kernels' lane arithmetic in numpy: fragments as PTX's m16n8k16 .row.col defines them."""
    K, N, G = rt.in_features, rt.out_features, rt.group_size
    words = rt.qweight.numpy().astype(np.int64) & 0xFFFFFFFF            # [N/16, K/64, 32, 4]
    sc = rt.scales_for(torch.float16).view(torch.float16).numpy().astype(np.float32)  # [N/16, K/G, 16]
    zb = rt.zeros.numpy().astype(np.float32).reshape(N // 16, K // G, 8, 2) / 16   # [N/16, K/G, g, row half]
    xs = x.numpy().astype(np.float32)                                    # [M <= 8, K]
    y = np.zeros((8, N), np.float32)
    for nt in range(N // 16):
        for c in range(K // 64):
            for j in range(4):
                h, jj = divmod(j, 2)
                A, B = np.zeros((16, 16), np.float32), np.zeros((16, 8), np.float32)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    grp = (c * 64 + 32 * h) // G
                    s_lo, s_hi = sc[nt, grp, 2 * g], sc[nt, grp, 2 * g + 1]
                    z_lo, z_hi = zb[nt, grp, g, 0], zb[nt, grp, g, 1]
                    w = words[nt, c, lane, j]
                    for r in range(4):                                   # a_r = (w >> 4r) & 0x000F000F
                        lo, hi = (w >> (4 * r)) & 0xF, (w >> (4 * r + 16)) & 0xF
                        row = g + 8 * (r % 2)
                        col = 2 * t + 8 * (r // 2)
                        z, s = (z_lo, s_lo) if r % 2 == 0 else (z_hi, s_hi)
                        A[row, col: col + 2] = np.float16([(lo - z) * s, (hi - z) * s])   # one fp16 rounding
                    if g < xs.shape[0]:
                        piece = xs[g, c * 64 + 32 * h + 8 * t: c * 64 + 32 * h + 8 * t + 8]   # one 16-byte load
                        B[2 * t: 2 * t + 2, g] = piece[4 * jj: 4 * jj + 2]          # b0 = word 2jj
                        B[2 * t + 8: 2 * t + 10, g] = piece[4 * jj + 2: 4 * jj + 4]  # b1 = word 2jj+1
                y[:, 16 * nt: 16 * nt + 16] += (A @ B).T
    return y[: xs.shape[0]]


@pytest.mark.parametrize("group", [32, 128])
def test_kernel_fragment_math_matches_reference(group):
    K, N = 128, 32
    qweight, zeros, s, q, z = _random_awq(K, N, group, seed=1)
    x = torch.randn(3, K).half()
    y = _emulate_kernel(x, repack(q, z, s, group))
    ref = w4a16.w4a16_linear_ref(x.float(), qweight, z, s, group)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_cpu_dispatch_is_the_reference():
    qweight, _, s, _, z = _random_awq(128, 32, 64)
    lin = Linear(qweight=qweight, zeros=z.half(), scales=s, group_size=64)
    x = torch.randn(2, 5, 128)
    assert torch.equal(w4a16.w4a16_linear(x, lin), w4a16.w4a16_linear_ref(x, qweight, z.half(), s, 64))
    assert lin.runtime is None                                           # nothing prepared on the CPU


# ---------------------------------------------------------------- GPU: kernels vs reference

TOL = {torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 4e-2)}
SHAPES = [(576, 1728), (4096, 11008)]   # K=576 takes groups 32/64; group 128 runs it as 640x1728
TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024]


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    rel_tol, elem_tol = TOL[dtype]
    y, ref = y.float(), ref.float()
    rel = float((y - ref).norm() / ref.norm())
    assert rel < rel_tol, rel
    assert float((y - ref).abs().max()) <= elem_tol * float(ref.abs().max())


@pytest.fixture(scope="module")
def gpu_linears():
    cache = {}

    def get(K, N, group, frac=True):
        """RTN-quantized random weights: fractional zero points, or (frac=False) the same rounded to integers,
        which the kernels run through their integer path."""
        if (K, N, group, frac) not in cache:
            lin = w4a16.random_awq_linear(K, N, group, device="cuda", bias=True, seed=K + N + group)
            if not frac:
                lin.zeros = lin.zeros.round()
            cache[(K, N, group, frac)] = lin
        return cache[(K, N, group, frac)]
    return get


def _ref(x, lin):
    return w4a16.w4a16_linear_ref(x.float(), lin.qweight, lin.zeros, lin.scales, lin.group_size, lin.bias.float())


@pytest.mark.gpu
@pytest.mark.parametrize("frac", [True, False], ids=["frac_zeros", "int_zeros"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("K,N", SHAPES)
def test_w4a16_paths_match_reference(gpu_linears, K, N, group, dtype, frac):
    from backend.kernels import w4a16_decode, w4a16_gemm, w4a16_gemv
    K = 640 if K % group else K
    lin = gpu_linears(K, N, group, frac)
    rt = w4a16.prepare(lin)
    assert rt.frac_zeros == frac
    bias = lin.bias.to(dtype)
    for M in TOKENS:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        ref = _ref(x, lin)
        _check(w4a16.w4a16_linear(x, lin), ref, dtype)                 # the dispatch
        if M <= 64:
            _check(w4a16_gemv.gemv(x, rt, bias), ref, dtype)
            _check(w4a16_gemm.gemm(x, rt, bias, w4a16_gemm.splitk_config(M, N, K, 132)), ref, dtype)
        if M <= 8:
            _check(w4a16_decode.gemv(x, rt, bias), ref, dtype)
        _check(w4a16_gemm.gemm(x, rt, bias), ref, dtype)
    _check(w4a16_gemm.dequant_matmul(x, rt, bias), ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("frac", [True, False], ids=["frac_zeros", "int_zeros"])
@pytest.mark.parametrize("cfg", [None, (2, 1, 0), (2, 2, 1), (8, 4, 0), (8, 2, 1), (16, 4, 1), (16, 1, 0), (6, 8, 1),
                                 (4, 8, 0)])
def test_gemv_silu_equals_silu_of_the_gemv(gpu_linears, group, frac, cfg):
    """silu(gate) * up in the decode GEMV's epilogue vs the fp32 reference of the [gate | up] projection, then SiLU·mul:
    K=1216/1280 (uneven whole-group ranges, warps with none), I=864 (54 tiles), biases on, 1-8 tokens."""
    import torch.nn.functional as F
    from backend.kernels.w4a16_decode import DecodeConfig, gemv_silu
    lin = gpu_linears(1280 if group == 128 else 1216, 1728, group, frac)
    rt = w4a16.prepare(lin)
    config = None if cfg is None else DecodeConfig(nt=1, ks=cfg[0], u=cfg[1], il=bool(cfg[2]))
    for M in (1, 3, 8):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(M, rt.in_features, device="cuda", dtype=dtype)
            gate, up = _ref(x, lin).chunk(2, dim=-1)
            _check(gemv_silu(x, rt, lin.bias.to(dtype), config), F.silu(gate) * up, dtype)


def test_gemv_silu_refuses_what_it_cannot_fuse():
    from backend.kernels.w4a16_decode import gemv_silu
    _, _, s, q, z = _random_awq(128, 48, 64)
    with pytest.raises(ValueError, match="I a multiple of 16, got 1 tokens and 48 rows"):    # I = 24
        gemv_silu(torch.zeros(1, 128, dtype=torch.float16), repack(q, z, s, 64))
    _, _, s, q, z = _random_awq(128, 64, 64)
    with pytest.raises(ValueError, match="got 9 tokens"):
        gemv_silu(torch.zeros(9, 128, dtype=torch.float16), repack(q, z, s, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(1, 1, 1, 2, 0), (1, 2, 4, 4, 0), (2, 1, 8, 4, 1), (4, 2, 2, 2, 0), (1, 4, 8, 3, 1),
                                 (2, 2, 16, 3, 0), (1, 4, 16, 2, 1), (1, 2, 4, 3, 1)])
def test_gemv_configs_agree(gpu_linears, cfg):
    from backend.kernels.w4a16_gemv import GemvConfig, gemv
    mt, nt, ks, stages, contig = cfg
    lin = gpu_linears(576, 1728, 32)
    rt = w4a16.prepare(lin)
    for M in (1, 5, 8 * mt, 8 * mt + 3):
        x = torch.randn(M, 576, device="cuda", dtype=torch.float16)
        _check(gemv(x, rt, lin.bias.half(), GemvConfig(mt=mt, nt=nt, ks=ks, stages=stages, contig=bool(contig))),
               _ref(x, lin),
               torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("frac", [True, False], ids=["frac_zeros", "int_zeros"])
@pytest.mark.parametrize("cfg", [(1, 1, 1, 0), (1, 2, 2, 0), (2, 4, 4, 0), (1, 16, 4, 0), (4, 8, 1, 0), (2, 16, 2, 0),
                                 (1, 3, 8, 0), (1, 8, 2, 1), (1, 4, 1, 1), (2, 4, 4, 1), (1, 3, 8, 1), (1, 16, 1, 1),
                                 (1, 16, 2, 1), (1, 8, 4, 1),      # cfg12 / cfg13: the defaults at groups 64 / 32
                                 (1, 4, 2, 1)])                    # cfg14: the qkv shapes' sweep best (H100)
def test_decode_gemv_configs_agree(gpu_linears, cfg, group, frac):
    # K=1216: 19 chunks, so warps get uneven whole-group ranges and some none; N=1728 is 108 tiles (odd tails)
    from backend.kernels.w4a16_decode import DecodeConfig, gemv
    nt, ks, u, il = cfg
    lin = gpu_linears(1280 if group == 128 else 1216, 1728, group, frac)
    rt = w4a16.prepare(lin)
    for M in (1, 3, 8):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(M, rt.in_features, device="cuda", dtype=dtype)
            _check(gemv(x, rt, lin.bias.to(dtype), DecodeConfig(nt=nt, ks=ks, u=u, il=bool(il))),
                   _ref(x, lin), dtype)


@pytest.mark.gpu
def test_decode_gemv_refuses_more_than_8_tokens(gpu_linears):
    from backend.kernels.w4a16_decode import gemv
    lin = gpu_linears(576, 1728, 64)
    with pytest.raises(ValueError, match="1..8 tokens, got 9"):
        gemv(torch.randn(9, 576, device="cuda", dtype=torch.float16), w4a16.prepare(lin))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(64, 2, 2, 1), (128, 2, 2, 1), (64, 1, 2, 1), (128, 1, 2, 1), (64, 4, 1, 1),
                                 (32, 4, 1, 1), (64, 2, 1, 1), (64, 1, 1, 4), (16, 1, 2, 3), (32, 1, 1, 9),
                                 (64, 2, 1, 2)])
def test_gemm_configs_agree(gpu_linears, cfg):
    # split-K (last field > 1): K=576 is 9 chunks, so 4 splits get 3, 3, 3, 0 chunks... (an empty split adds 0)
    from backend.kernels.w4a16_gemm import GemmConfig, gemm
    lin = gpu_linears(576, 1728, 64)
    rt = w4a16.prepare(lin)
    for M in (1, 37, 300):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(M, 576, device="cuda", dtype=dtype)
            config = GemmConfig(bm=cfg[0], warps_m=cfg[1], ntw=cfg[2], splitk=cfg[3], minb=2 if cfg[3] > 1 else 1)
            _check(gemm(x, rt, lin.bias.to(dtype), config), _ref(x, lin), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("frac", [True, False])
def test_dequantize_kernel_is_exact(frac):
    from backend.kernels.w4a16_gemm import dequantize
    qweight, zeros, s, _, _ = _random_awq(256, 96, 32, device="cuda", frac=frac)
    lin = Linear(qweight=qweight, zeros=zeros, scales=s, group_size=32)
    wt = dequantize(w4a16.prepare(lin), torch.float16)
    assert torch.equal(wt, w4a16.dequantize_awq(qweight, zeros, s, 32).t())


@pytest.mark.gpu
def test_unsupported_shape_falls_back_and_3d_input():
    qweight, zeros, s, _, _ = _random_awq(96, 64, 32, device="cuda")   # K=96 is not a multiple of 64
    lin = Linear(qweight=qweight, zeros=zeros, scales=s, group_size=32)
    x = torch.randn(2, 3, 96, device="cuda", dtype=torch.float16)
    y = lin(x)
    assert lin.runtime is False and y.shape == (2, 3, 64)
    _check(y.reshape(6, 64), w4a16.w4a16_linear_ref(x.reshape(6, 96).float(), qweight, zeros, s, 32), torch.float16)


@pytest.mark.gpu
def test_kernels_replay_in_cuda_graph(gpu_linears):
    lin = gpu_linears(640, 1728, 128)
    x = torch.randn(4, 640, device="cuda", dtype=torch.float16)
    lin(x)                                                               # prepare + compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lin(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _check(y, _ref(x, lin), torch.float16)

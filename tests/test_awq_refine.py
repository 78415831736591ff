"""tools/awq_refine.py: the per-group scale / zero / codes refinement never raises the activation-weighted error
of AWQ's clipped round-to-nearest, and keeps the checkpoint format (fp16 scales, fp16 zeros on the 1/16 grid in
0..15)."""
import torch

from backend.kernels.w4a16 import round_zeros
from tools.awq_refine import refine_groups
from tools.awq_search import codes_for, dequantize, output_error, quantize_rtn, search_clip


def _on_grid(zeros: torch.Tensor) -> bool:
    return torch.equal(zeros, round_zeros(zeros))


def test_refine_lowers_the_group_error_and_keeps_the_format():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2000, 256, generator=g) * (3 * torch.rand(256, generator=g))   # uneven channel scales
    sigma = x.t() @ x / 2000
    codes, scales, zeros = quantize_rtn(w, 32, search_clip(w, sigma, 32))
    c2, s2, z2 = refine_groups(w, codes, scales, zeros, sigma, 32)
    assert (c2.dtype, s2.dtype, z2.dtype) == (torch.uint8, torch.float16, torch.float16)
    assert c2.shape == codes.shape and s2.shape == scales.shape and int(c2.max()) <= 15 and _on_grid(z2)
    before = output_error(dequantize(codes, scales, zeros) - w, sigma)
    after = output_error(dequantize(c2, s2, z2) - w, sigma)
    assert after < 0.97 * before, (float(before), float(after))


def test_gptq_spreads_rounding_error_over_correlated_inputs():
    from tools.awq_refine import gptq_quantize
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2000, 256, generator=g) * (3 * torch.rand(256, generator=g))
    x[:, 1:] += 0.5 * x[:, :-1]                                                   # correlated neighbours
    sigma = x.t() @ x / 2000
    rtn = output_error(dequantize(*quantize_rtn(w, 32, search_clip(w, sigma, 32))) - w, sigma)
    codes, scales, zeros = gptq_quantize(w, sigma, 32)
    assert (codes.dtype, scales.dtype, zeros.dtype) == (torch.uint8, torch.float16, torch.float16)
    assert _on_grid(zeros) and bool((zeros != zeros.round()).any())          # fractional zeros
    assert output_error(dequantize(codes, scales, zeros) - w, sigma) < 0.8 * rtn


def _correlated_layer(seed: int):
    """A [64, 256] weight and the input moments of 2,000 tokens whose channels differ in scale and are correlated
    with their neighbours (where GPTQ's error feedback and a refit have something to work with)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2000, 256, generator=g) * (3 * torch.rand(256, generator=g))
    x[:, 1:] += 0.5 * x[:, :-1]
    return w, x.t() @ x / 2000


def test_gptq_act_order_static_groups_joint_range_keep_the_format():
    from tools.awq_refine import gptq_quantize
    w, sigma = _correlated_layer(2)
    rtn = output_error(dequantize(*quantize_rtn(w, 32, search_clip(w, sigma, 32))) - w, sigma)
    for kw in ({"act_order": True}, {"joint": True}, {"act_order": True, "joint": True, "damp": 0.1}):
        codes, scales, zeros = gptq_quantize(w, sigma, 32, shrinks=(1.0, 0.9), **kw)
        assert (codes.dtype, scales.dtype, zeros.dtype) == (torch.uint8, torch.float16, torch.float16), kw
        assert scales.shape == (64, 8) and int(codes.max()) <= 15 and _on_grid(zeros), kw
        assert output_error(dequantize(codes, scales, zeros) - w, sigma) < 0.8 * rtn, kw


def test_joint_range_finds_the_lattice_step_of_a_q4_1_group():
    from tools.awq_refine import _group_range, _lattice_step
    g = torch.Generator().manual_seed(3)
    d = torch.rand(16, 1, generator=g) * 0.1 + 0.01
    q = torch.randint(2, 12, (16, 32), generator=g).float()
    q[:, 0], q[:, 1] = 2, 11                                   # 10 levels used of 16: range / 15 is not the step
    grp = (q - 7) * d.half().float()                           # an integer zero (7) exists for this lattice
    assert torch.allclose(_lattice_step(grp), d.half().float().squeeze(1), rtol=1e-3)
    for joint, exact in ((False, False), (True, True)):
        s, z = _group_range(grp, torch.eye(32), (1.0,), joint=joint)
        deq = (codes_for(grp, s[:, None], z[:, None]) - z[:, None]) * s[:, None]
        assert torch.allclose(deq, grp, atol=1e-6) == exact


def test_scale_search_judged_by_gptq_never_worse_than_ratio_zero():
    from tools.awq_refine import gptq_quantize
    from tools.awq_search import search_scale
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(1000, 128, generator=g) * (4 * torch.rand(128, generator=g) + 0.1)
    sigma = x.t() @ x / 1000
    quant = lambda ws, sg: dequantize(*gptq_quantize(ws, sg, 32))       # noqa: E731
    s, ratio, rel = search_scale([w], sigma, x.abs().mean(0), 32, quant=quant, ratios=(0.0, 0.3, 0.6))
    assert s.shape == (128,) and ratio in (0.0, 0.3, 0.6) and rel <= 1.0


def test_gptq_refit_of_scales_and_zeros_never_raises_the_error():
    from tools.awq_refine import gptq_quantize
    w, sigma = _correlated_layer(5)
    for group in (32, 64):
        codes, scales, zeros = gptq_quantize(w, sigma, group)
        c2, s2, z2 = gptq_quantize(w, sigma, group, refit=1)
        assert torch.equal(c2, codes) and (s2.dtype, z2.dtype) == (torch.float16, torch.float16) and _on_grid(z2)
        before = output_error(dequantize(codes, scales, zeros) - w, sigma)
        after = output_error(dequantize(c2, s2, z2) - w, sigma)
        assert after < 0.99 * before, (group, float(before), float(after))
        two = output_error(dequantize(*gptq_quantize(w, sigma, group, refit=2)) - w, sigma)   # GPTQ again between
        assert two <= after, (group, float(after), float(two))

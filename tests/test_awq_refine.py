"""tools/awq_refine.py: the per-group scale / zero / codes refinement never raises the activation-weighted error
of AWQ's clipped round-to-nearest, and keeps the checkpoint format (fp16 scales, integer zeros 0..15)."""
import torch

from tools.awq_refine import refine_groups
from tools.awq_search import dequantize, output_error, quantize_rtn, search_clip


def test_refine_lowers_the_group_error_and_keeps_the_format():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2000, 256, generator=g) * (3 * torch.rand(256, generator=g))   # uneven channel scales
    sigma = x.t() @ x / 2000
    codes, scales, zeros = quantize_rtn(w, 32, search_clip(w, sigma, 32))
    c2, s2, z2 = refine_groups(w, codes, scales, zeros, sigma, 32)
    assert (c2.dtype, s2.dtype, z2.dtype) == (torch.uint8, torch.float16, torch.uint8)
    assert c2.shape == codes.shape and s2.shape == scales.shape and int(c2.max()) <= 15 and int(z2.max()) <= 15
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
    assert (codes.dtype, scales.dtype, zeros.dtype) == (torch.uint8, torch.float16, torch.uint8)
    assert output_error(dequantize(codes, scales, zeros) - w, sigma) < 0.8 * rtn

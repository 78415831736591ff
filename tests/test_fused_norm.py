"""RMSNorm in the W4A16 decode GEMV's prologue (LMTRITON_FUSE_NORM): the model path it takes and its logits. The
kernel itself: test_norm_gemv_equals_rms_norm_then_the_gemv in tests/test_kernel_w4a16.py."""
from __future__ import annotations

import pytest
import torch

from backend.kernels import w4a16, w4a16_decode
from backend.kernels.rms_norm import rms_norm_ref
from tests.test_gpu_engine import engine_logits
from tests.test_pdl import model_dirs  # noqa: F401  (module-scoped fixture: a random GQA Llama and its W4A16)


@pytest.mark.parametrize("gated", [False, True])
def test_cpu_takes_rms_norm_then_the_linear(gated):
    lin = w4a16.random_awq_linear(128, 64, group_size=64, bias=True, dtype=torch.float32)
    h, res, w = torch.randn(3, 128), torch.randn(3, 128), torch.rand(128)
    y, res_out = lin.after_norm(h, res, w, 1e-5, gated=gated)
    x, res_ref = rms_norm_ref(h, w, 1e-5, res)
    torch.testing.assert_close(res_out, res_ref)
    torch.testing.assert_close(y, lin.gate_up_silu(x) if gated else lin(x))


@pytest.mark.gpu
def test_decode_logits_with_the_fused_norm_equal_unfused(monkeypatch, model_dirs):  # noqa: F811
    """Every prompt position decoded one token a step through the paged cache, fused vs unfused: the fused kernel
    runs for both norms of every layer at every step, and the logits differ only by the order of the sum of squares."""
    calls = []
    real = w4a16_decode.norm_gemv
    monkeypatch.setattr(w4a16_decode, "norm_gemv",
                        lambda *a, **k: (calls.append((a[0].shape[0], a[6] if len(a) > 6 else k.get("gated"))),
                                         real(*a, **k))[1])
    prompt = torch.randint(3, 32000, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    monkeypatch.setattr(w4a16_decode, "FUSE_NORM", False)
    off = engine_logits(model_dirs["w4a16"], prompt, 1)
    assert not calls
    monkeypatch.setattr(w4a16_decode, "FUSE_NORM", True)
    on = engine_logits(model_dirs["w4a16"], prompt, 1)
    assert len(calls) == 2 * 4 * 64 and {m for m, _ in calls} == {1}     # 2 norms, 4 layers, 64 steps of one token
    assert sorted({bool(g) for _, g in calls}) == [False, True]
    assert float((on - off).norm() / off.norm()) < 5e-3
    assert float((on.argmax(-1) == off.argmax(-1)).float().mean()) >= 0.95
    engine_logits(model_dirs["w4a16"], prompt, 16)                          # 16 tokens a step: two kernels again
    assert len(calls) == 2 * 4 * 64

"""silu(gate) * up in the decode GEMV's epilogue (LMTRITON_FUSE_SILU): the model path it takes and its logits, W4A16
and fp16. The kernels themselves: test_gemv_silu_equals_silu_of_the_gemv in tests/test_kernel_w4a16.py and
tests/test_kernel_dense_decode.py."""
from __future__ import annotations

import pytest
import torch

from backend.kernels import activation, dense_decode, w4a16, w4a16_decode
from backend.model.layers import Linear
from tests.test_gpu_engine import engine_logits
from tests.test_pdl import model_dirs  # noqa: F401  (module-scoped fixture: a random GQA Llama and its W4A16)


def test_cpu_takes_the_projection_then_silu_and_mul(monkeypatch):
    monkeypatch.setattr(activation, "FUSE_SILU", True)
    lin = w4a16.random_awq_linear(128, 64, group_size=64, bias=True, dtype=torch.float32)
    x = torch.randn(3, 128)
    gate, up = lin(x).chunk(2, dim=-1)
    torch.testing.assert_close(lin.gate_up_silu(x), torch.nn.functional.silu(gate) * up)
    dense = Linear(weight=torch.randn(64, 128))
    gate, up = dense(x).chunk(2, dim=-1)
    torch.testing.assert_close(dense.gate_up_silu(x), torch.nn.functional.silu(gate) * up)


@pytest.mark.gpu
@pytest.mark.parametrize("weights,kernels", [("w4a16", w4a16_decode), ("fp16", dense_decode)])
def test_decode_logits_with_the_fused_epilogue_equal_unfused(monkeypatch, model_dirs, weights, kernels):  # noqa: F811
    """Every prompt position decoded one token a step through the paged cache, fused vs unfused: the fused kernel
    runs at every layer of every step, and the logits differ by its single rounding of the MLP activation only."""
    calls = []
    real = kernels.gemv_silu
    monkeypatch.setattr(kernels, "gemv_silu", lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))[1])
    prompt = torch.randint(3, 32000, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    monkeypatch.setattr(activation, "FUSE_SILU", False)
    off = engine_logits(model_dirs[weights], prompt, 1)
    assert not calls
    monkeypatch.setattr(activation, "FUSE_SILU", True)
    on = engine_logits(model_dirs[weights], prompt, 1)
    assert len(calls) == 4 * 64 and set(calls) == {1}          # 4 layers, 64 steps of one token
    assert float((on - off).norm() / off.norm()) < 5e-3
    assert float((on.argmax(-1) == off.argmax(-1)).float().mean()) >= 0.95

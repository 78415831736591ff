"""tools/awq.py true-sequential quantization of one real SmolLM2 decoder layer: the same checkpoint tensors as the
one-pass path, and an output close to the fp layer's; bad GPTQ options are refused with the allowed values."""
import pytest
import torch

from tools.awq import quantize_layer, quantize_model
from tools.awq_seq import quantize_layer_sequential
from tools.awq_search import gram
from tools.calibrate import calib_windows
from tools.layerwise import LayerwiseCheckpoint, layer_forward


def test_true_sequential_layer_matches_the_format_and_the_fp_output(demo_model_dir):
    ckpt = LayerwiseCheckpoint(demo_model_dir)
    cfg, fam = ckpt.cfg, ckpt.family
    w = ckpt.layer(0)
    x = ckpt.embed(calib_windows(demo_model_dir, "wiki", 2, 64, 0))               # [2, 64, H]
    sums, absmean = {}, {}

    def observe(name, t):
        if name not in ("k", "v"):
            sums[name] = gram(t)
            absmean[name] = t.abs().mean(0)
    with torch.inference_mode():
        ref = layer_forward(w, cfg, fam, x, observe, batch=2)
        stats = {k: {"absmean": v} for k, v in absmean.items()}
        sig = {k: v / 128 for k, v in sums.items()}
        one = quantize_layer(w, fam, 32, "awq_gptq", sig, stats, n_grid=4)
        seq, y, _ = quantize_layer_sequential(w, cfg, fam, x, 32, "awq_gptq", stats, n_grid=4,
                                              gptq={"act_order": True}, batch=2)
        xq = x + 0.01 * torch.randn_like(x)          # a perturbed "quantized" stream: asym fits the fp output
        asym, yq, yf = quantize_layer_sequential(w, cfg, fam, xq, 32, "awq_gptq", stats, n_grid=4, batch=2,
                                                 x_fp=x)
    assert sorted(seq) == sorted(one) == sorted(asym)
    assert all(seq[k].dtype == one[k].dtype and seq[k].shape == one[k].shape for k in one)
    assert float((y - ref).norm() / ref.norm()) < 0.05
    assert torch.allclose(yf, ref, atol=1e-4)
    assert float((yq - ref).norm() / ref.norm()) < 0.05


def test_bad_gptq_options_are_refused(demo_model_dir, tmp_path):
    with pytest.raises(ValueError, match="damp must be in"):
        quantize_model(demo_model_dir, tmp_path, 4, 32, calib=tmp_path, method="awq_gptq", gptq={"damp": 0})
    with pytest.raises(ValueError, match="gptq options must be among"):
        quantize_model(demo_model_dir, tmp_path, 4, 32, calib=tmp_path, method="awq_gptq", gptq={"order": 1})
    with pytest.raises(ValueError, match="asym_target needs true_sequential"):
        quantize_model(demo_model_dir, tmp_path, 4, 32, calib=tmp_path, method="awq_gptq", asym_target=True)
    with pytest.raises(ValueError, match="true_sequential needs calibration"):
        quantize_model(demo_model_dir, tmp_path, 4, 32, method="rtn", true_sequential=True)

"""Quantization tools on the real SmolLM2 (CPU, small sizes): packing, AWQ vs RTN on one layer, static KV
parameters, perplexity through the engine vs HF, and a clear error for each bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from backend.config import EngineConfig
from backend.kernels.kv_cache import KVCache, gather_kv_ref
from backend.kernels.kv_static import load_kv_qparams, write_kv_static
from backend.kernels.w4a16 import dequantize_awq, pack_awq, unpack_awq
from backend.model.config import ModelConfig
from tools.awq import quantize_layer, quantize_model
from tools.awq_search import dequantize, gram, quantize_rtn
from tools.calibrate import LayerStats, calib_windows, calibrate, load_stats
from tools.kv_qparams import write_kv_qparams
from tools.layerwise import LayerwiseCheckpoint, layer_forward
from tools.wiki_text import load_paragraphs


def test_pack_unpack_round_trip_and_canonical_dequant():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 96), generator=g)
    assert torch.equal(unpack_awq(pack_awq(codes)), codes.to(torch.int32))
    w = torch.randn(96, 128, generator=g)                                     # [out, in]
    q, s, z = quantize_rtn(w, 32)
    ours = dequantize(q, s, z)                                                 # [out, in]
    canon = dequantize_awq(pack_awq(q.t()), z.t(), s.t(), 32).float().t()
    torch.testing.assert_close(canon, ours, rtol=1e-3, atol=1e-3)
    assert (ours - w).abs().max() <= s.float().max()                           # within one step everywhere


def test_calibration_and_eval_text_do_not_overlap():
    calib, held_out = load_paragraphs("wiki", "calib"), load_paragraphs("wiki", "eval")
    assert len(held_out) > 500 and len(calib) > 8 * len(held_out)
    assert not set(calib) & set(held_out)
    assert load_paragraphs("wiki", "eval", seed=0)[:5] == held_out[:5]       # deterministic


@pytest.fixture(scope="module")
def layer0(demo_model_dir):
    """Layer 0 of SmolLM2 with statistics from 2 calibration windows and moments from 2 other windows."""
    ckpt = LayerwiseCheckpoint(demo_model_dir)
    ids = calib_windows(demo_model_dir, "wiki", 4, 128, 0)                    # [4, 128]
    x = ckpt.embed(ids)
    w = ckpt.layer(0)
    stats, sums = LayerStats(), {}

    def moments(name, t):
        if name not in ("k", "v"):
            sums[name] = sums.get(name, 0) + gram(t)
    with torch.inference_mode():
        layer_forward(w, ckpt.cfg, ckpt.family, x[:2], stats.observe)
        y = layer_forward(w, ckpt.cfg, ckpt.family, x[2:], moments)
    sigmas = {k: v / (2 * 128) for k, v in sums.items()}
    return ckpt, w, x[2:], y, stats.result(), sigmas


def _dense(q: dict, fam, group_size: int) -> dict:
    w = {k: v.float() for k, v in q.items() if not k.endswith(("qweight", "zeros", "scales"))}
    for lin in fam.linears:
        w[lin + ".weight"] = dequantize_awq(q[lin + ".qweight"], q[lin + ".zeros"], q[lin + ".scales"],
                                            group_size).float().t()
    return w


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_lowers_layer_output_error_vs_rtn(layer0, group_size):
    """At g32 the groups are the demo model's Q4_1 blocks, which fractional zeros hold almost exactly: RTN is
    already near lossless there and AWQ (ratio 0 and no clipping on its grids) can only tie it."""
    ckpt, w, x, y, stats, sigmas = layer0
    errs = {}
    for method in ("rtn", "awq"):
        q = quantize_layer(w, ckpt.family, group_size, method, sigmas, stats, n_grid=10)
        with torch.inference_mode():
            yq = layer_forward(_dense(q, ckpt.family, group_size), ckpt.cfg, ckpt.family, x)
        errs[method] = ((yq - y).norm() / (y - x).norm()).item()
    if group_size == 32:
        assert errs["awq"] <= errs["rtn"] < 0.01, errs
    else:
        assert errs["awq"] < 0.9 * errs["rtn"], errs


def test_calibration_stats_kv_qparams_and_engine_static_kv(demo_model_dir, tmp_path):
    path = calibrate(demo_model_dir, tmp_path, samples=2, seqlen=32, progress=False)
    stats = load_stats(tmp_path, 30)
    assert stats["meta"]["num_tokens"] == 64 and len(stats["layers"]) == 30
    s0 = stats["layers"][0]
    assert s0["qkv"]["absmean"].shape == (576,) and s0["down"]["absmax"].shape == (1536,)
    assert s0["k"]["min"].shape == (3,) and bool((s0["k"]["min"] < s0["k"]["max"]).all())
    kvq = write_kv_qparams(tmp_path)
    params = load_kv_qparams(kvq, 30, 3, "int8")                               # [L, 2, Hk, 2]
    assert params.shape == (30, 2, 3, 2) and bool((params[..., 0] > 0).all())
    # a static write round-trips values inside the calibrated range to within half a step
    cache = KVCache(1, 2, 16, 3, 64, "int8", torch.float32, "cpu")
    layer = cache.layer(0)
    lo, hi = params[0, :, :, 1], params[0, :, :, 1] + 255 * params[0, :, :, 0]    # [2, Hk]
    k = lo[0][None, :, None] + torch.rand(20, 3, 64) * (hi[0] - lo[0])[None, :, None]
    v = lo[1][None, :, None] + torch.rand(20, 3, 64) * (hi[1] - lo[1])[None, :, None]
    write_kv_static(k, v, layer, torch.arange(20, dtype=torch.int32), params[0])
    kd, vd = gather_kv_ref(layer, torch.tensor([0, 1]), 20)                     # [Hk, 20, D]
    assert (kd - k.transpose(0, 1)).abs().max() <= params[0, 0, :, 0].max() / 2 + 1e-5
    assert (vd - v.transpose(0, 1)).abs().max() <= params[0, 1, :, 0].max() / 2 + 1e-5
    with pytest.raises(ValueError, match="kv_qparams.*needs kv_cache_dtype int8 or int4"):
        EngineConfig(model=str(demo_model_dir), kv_qparams=str(kvq))
    with pytest.raises(ValueError, match="is for 30 layers x 3 KV heads, the model has 2 x 3"):
        load_kv_qparams(kvq, 2, 3, "int8")


def test_ppl_through_engine_matches_hf_and_kv_int8_is_close(demo_model_dir, hf_demo_model):
    from tools.eval_ppl import eval_ppl
    from tools.wiki_text import token_windows
    from backend.llm import load_tokenizer
    fp = eval_ppl(demo_model_dir, "auto", windows=2, seqlen=96, batch=2)
    assert fp["tokens"] == 2 * 95
    wins = torch.tensor(token_windows(load_tokenizer(demo_model_dir), "wiki", "eval", 2, 96))
    with torch.inference_mode():
        logits = hf_demo_model(wins).logits[:, :-1]                             # [2, 95, V]
    hf_nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), wins[:, 1:].reshape(-1))
    assert fp["ppl"] == pytest.approx(hf_nll.exp().item(), rel=1e-4)
    kv8 = eval_ppl(demo_model_dir, "int8", windows=2, seqlen=96, batch=2)
    assert kv8["kv_bytes_per_token"] == 2 * 30 * 3 * (64 + 8) < 0.6 * fp["kv_bytes_per_token"]
    assert abs(kv8["ppl"] / fp["ppl"] - 1) < 0.01


# -- bad input ---------------------------------------------------------------------------------------------------
def _copy_config(src, dst, **changes):
    hf = json.loads((src / "config.json").read_text())
    hf.update(changes)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def test_bad_quantization_input_gives_clear_errors(demo_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"w_group_size 128 does not divide in_features .*576.*work for this model: "
                                         r"\[32, 64\]"):
        quantize_model(demo_model_dir, tmp_path / "g128", group_size=128, method="rtn")
    with pytest.raises(ValueError, match="w_bits must be 4"):
        quantize_model(demo_model_dir, tmp_path / "w8", w_bits=8, group_size=64, method="rtn")
    with pytest.raises(FileNotFoundError, match="no calibration statistics .* run `lmtriton lite calibrate"):
        quantize_model(demo_model_dir, tmp_path / "awq", group_size=64, calib=tmp_path / "nothing")
    bad = _copy_config(demo_model_dir, tmp_path / "internlm", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        LayerwiseCheckpoint(bad)
    bad = _copy_config(demo_model_dir, tmp_path / "internlm2", architectures=["InternLM2ForCausalLM"])
    with pytest.raises(ValueError, match="quantization tools do not support architecture 'InternLM2ForCausalLM'"):
        LayerwiseCheckpoint(bad)


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 64}, "quant_method must be 'awq'"),
    ({"quant_method": "awq", "bits": 8, "group_size": 64}, "bits must be 4"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemv"}, "version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False}, "zero_point must be true"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": "bf16"},
     r"zero_point must be true \(AutoAWQ: packed int4 qzeros\) or 'fp16' .*got 'bf16'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, r"group_size 128 does not divide .* fit this model: \[32, 64\]"),
    ({"quant_method": "awq", "bits": 4, "group_size": 100}, "group_size must be one of"),
])
def test_loader_validates_quantization_config(demo_model_dir, tmp_path, qc, message):
    d = _copy_config(demo_model_dir, tmp_path / "m", quantization_config=qc)
    with pytest.raises(ValueError, match=message):
        ModelConfig.load(d)


def test_autoawq_side_file_is_read(demo_model_dir, tmp_path):
    d = _copy_config(demo_model_dir, tmp_path / "m")
    (d / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4,
                                                     "version": "GEMM"}))
    assert ModelConfig.load(d).quant == {"method": "awq", "bits": 4, "group_size": 32}


def test_lite_cli_reports_errors(demo_model_dir, tmp_path, capsys):
    from tools.lite import main
    assert main(["auto_awq", "--model", str(demo_model_dir), "--w-group-size", "64", "--work-dir",
                 str(tmp_path)]) == 2
    assert "no calibration statistics" in capsys.readouterr().err
    assert main(["kv_qparams", "--work-dir", str(tmp_path)]) == 2
    shutil.rmtree(tmp_path)

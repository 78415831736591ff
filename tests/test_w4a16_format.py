"""The W4A16 checkpoint format's fp16 fractional zero points (backend/kernels/w4a16.py): the 1/16 grid, the exact
conversion of AutoAWQ's packed integer zeros, what a fractional zero buys over an integer one, and loading
AutoAWQ checkpoints (packed `qzeros`) next to ours (fp16 `zeros`) through the loader and `convert`."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.kernels import w4a16
from tests.tiny_models import make_hf

G = 32


def test_round_zeros_is_on_the_sixteenth_grid_and_clamped():
    z = torch.tensor([-3.0, -0.01, 0.0, 0.025, 0.035, 1.0 / 3, 7.97, 14.99, 15.0, 15.2, 40.0])
    r = w4a16.round_zeros(z)
    assert r.dtype == torch.float16
    assert r.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0625, 0.3125, 8.0, 15.0, 15.0, 15.0, 15.0]
    every = torch.arange(0, 241) * w4a16.ZERO_STEP                          # the whole grid: fixed points
    assert torch.equal(w4a16.round_zeros(every).float(), every)
    assert torch.equal(every.half().float(), every) and torch.equal(every.bfloat16().float(), every)


def test_zeros_from_qzeros_is_exact():
    z = torch.randint(0, 16, (6, 48), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    zeros = w4a16.zeros_from_qzeros(w4a16.pack_awq(z))
    assert zeros.dtype == torch.float16 and zeros.shape == (6, 48)
    assert torch.equal(zeros.float(), z.float())
    q = torch.randint(0, 16, (6 * G, 48), dtype=torch.int32)
    s = torch.rand(6, 48).half()
    assert torch.equal(w4a16.dequantize_awq(w4a16.pack_awq(q), zeros, s, G), w4a16.dequantize(q, z, s, G))


def _integer_zero_rtn(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The old format's RTN (integer zeros), dequantized -> [out, in]."""
    out_f, in_f = weight.shape
    w = weight.float().t().reshape(in_f // group_size, group_size, out_f)
    s = ((w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)) / 15).clamp(min=1e-6).half().float()
    z = (-w.amin(1).clamp(max=0) / s).round().clamp(0, 15)
    q = (w / s[:, None] + z[:, None]).round().clamp(0, 15)
    return ((q - z[:, None]) * s[:, None]).reshape(in_f, out_f).t()


def _fractional_rtn(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    qweight, zeros, scales = w4a16.quantize_rtn(weight, group_size)
    assert zeros.dtype == torch.float16 and torch.equal(zeros, w4a16.round_zeros(zeros))
    return w4a16.dequantize_awq(qweight, zeros, scales, group_size).float().t()


def test_fractional_zero_rtn_beats_integer_zero_rtn():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * 0.02                         # [out, in]
    frac = (_fractional_rtn(w, G) - w).pow(2).mean()
    integer = (_integer_zero_rtn(w, G) - w).pow(2).mean()
    assert frac < 0.95 * integer, (float(frac), float(integer))
    # a Q4_1 layer (per 32-block fp16 d and fp16 min m, w = d q + m, codes 0 and 15 in each block as Q4_1's
    # min / max give them; ranges across 0): the fractional zero holds -m / d to 1/32 of a step, the integer
    # zero leaves up to half a step of offset in each whole block
    d = (torch.rand(64, 256 // G, 1, generator=gen) * 0.01 + 0.002).half().float()
    m = (-(torch.rand(64, 256 // G, 1, generator=gen) * 0.6 + 0.2) * 15 * d).half().float()
    codes = torch.randint(0, 16, (64, 256 // G, G), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15
    q41 = (d * codes + m).reshape(64, 256)
    frac = (_fractional_rtn(q41, G) - q41).pow(2).mean()
    integer = (_integer_zero_rtn(q41, G) - q41).pow(2).mean()
    assert frac < 0.05 * integer, (float(frac), float(integer))


# -- loading: AutoAWQ (packed qzeros) and ours (fp16 zeros) -------------------------------------------------------
def _engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", session_len=64,
                                  max_batch_size=2, cache_max_entry_count=16, cache_block_seq_len=8))


def _greedy(engine: LLMEngine):
    engine.add_request(0, [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    return out


def _to_autoawq(src, dst):
    """Our HF AWQ checkpoint -> AutoAWQ's layout: integer zeros packed into int32 `qzeros`, zero_point true."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".zeros")]:
        z = tensors.pop(name).float().round().to(torch.int32)                # [in/g, out]
        tensors[name[:-len("zeros")] + "qzeros"] = w4a16.pack_awq(z)
    save_file(tensors, str(dst / "model.safetensors"))
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"]["zero_point"] = True
    (dst / "config.json").write_text(json.dumps(hf))
    return tensors


@pytest.fixture(scope="module")
def awq_dirs(tmp_path_factory):
    from tools.awq import quantize_model
    root = tmp_path_factory.mktemp("w4a16_format")
    make_hf("llama", root / "hf", seed=3)
    ours = quantize_model(root / "hf", root / "ours", 4, G, None, "rtn", progress=False)
    return ours, root


def test_our_checkpoint_stores_fp16_zeros_and_says_so(awq_dirs):
    ours, _ = awq_dirs
    qc = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert qc["zero_point"] == "fp16" and json.loads((ours / "quant_config.json").read_text())["zero_point"] == "fp16"
    with safe_open(str(ours / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        z = f.get_tensor("model.layers.0.mlp.down_proj.zeros")
    assert not any(n.endswith("qzeros") for n in names)
    assert z.dtype == torch.float16 and tuple(z.shape) == (160 // G, 64)
    assert bool((z != z.round()).any())                                      # fractional, as RTN found them


def test_autoawq_checkpoint_loads_and_converts_to_fp16_zeros(awq_dirs):
    from backend.model.config import ModelConfig
    from tools.convert import write_weights
    ours, root = awq_dirs
    tensors = _to_autoawq(ours, root / "autoawq")
    eng = _engine(root / "autoawq")
    lin = eng.runner.model.layers[0].qkv
    assert lin.zeros.dtype == torch.float16 and lin.zeros.shape == (64 // G, 64 + 2 * 32)
    pre = "model.layers.0.self_attn."                                        # the engine computes in float32
    want = torch.cat([w4a16.dequantize_awq(tensors[pre + p + "_proj.qweight"],
                                           w4a16.zeros_from_qzeros(tensors[pre + p + "_proj.qzeros"]),
                                           tensors[pre + p + "_proj.scales"].float(), G)
                      for p in "qkv"], 1)                                    # [in, out]
    torch.testing.assert_close(lin.dense_weight(), want.t(), rtol=0, atol=0)
    tokens = _greedy(eng)
    # convert writes the engine workspace with fp16 zeros; it serves the same tokens
    cfg = ModelConfig.load(root / "autoawq")
    write_weights(root / "autoawq", root / "ws", cfg, "float32")
    with safe_open(str(next((root / "ws").glob("*.safetensors"))), framework="pt") as f:
        assert "layers.0.qkv.zeros" in f.keys() and "layers.0.qkv.qzeros" not in f.keys()
        assert f.get_tensor("layers.0.qkv.zeros").dtype == torch.float16           # not cast to --dtype
    assert _greedy(_engine(root / "ws")) == tokens


def test_unknown_zero_point_is_refused(awq_dirs):
    from backend.model.config import ModelConfig
    ours, root = awq_dirs
    d = root / "bad_zero"
    d.mkdir()
    hf = json.loads((ours / "config.json").read_text())
    hf["quantization_config"]["zero_point"] = "int8"
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"quantization_config.zero_point must be true .* or 'fp16' .*got 'int8'"):
        ModelConfig.load(d)

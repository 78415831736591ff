"""scripts/roofline.py over a profile measured on the H200 (session 4): the floors and budgets follow from the JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import roofline

PROFILE = Path(__file__).parent.parent / "docs/benchmarks/session4_h200/profile_w4a16_kvint8_pdl0.json"


@pytest.fixture(scope="module")
def res():
    return json.loads(PROFILE.read_text())


def test_llama2_7b_linear_parameters():
    # 32 x (q, k, v, o: 4 x 4096^2; gate, up, down: 3 x 4096 x 11008) = 6.48e9, without embedding and lm_head
    assert roofline.layer_linear_params(roofline.shape_of("llama2-7b-awq")) == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)


def test_batch_64_budget(res):
    a = roofline.analyse(res, batch=64, context=129, target=0.6)
    bw = res["copy_bw_GBps"] * 1e9
    kv = res["kv_bytes_per_token"] * 64 * 129
    weights = res["weight_bytes_per_step"] - 2 * 32000 * 4096 - 2 * 4096
    assert a["memory_floor_ms"] == pytest.approx(1e3 * (weights + kv) / bw)
    assert a["target_step_ms"] == pytest.approx(a["memory_floor_ms"] / 0.6)
    # every kernel with GPU time is in one class, and the classes add up to the step
    assert a["measured_ms"] == pytest.approx(sum(k["ms"] for k in res["profile_bs64"] if k["ms"] > 0))
    classes = {k["kernel"][:12]: k["class"] for k in a["kernels"]}
    # 4 GEMMs + 4 split-K finishes + 4 workspace fills a layer; attention once; 2 norms, rotary, SiLU (+ final norm)
    assert a["launches"]["linear"] == 32 * 12 and a["launches"]["attention"] == 32
    assert classes["w4a16_gemm"] == "linear" and classes["w4a16_splitk"] == "linear"
    assert classes["paged_decode"] == "attention" and classes["rms_norm"] == "other"
    assert a["linear_budget_ms"] == pytest.approx(a["target_step_ms"] - a["attention_ms"] - a["other_ms"])
    assert a["linear_budget_attn_at_bw_ms"] == pytest.approx(a["target_step_ms"] - 1e3 * kv / bw - a["other_ms"])
    flops = 2 * 64 * roofline.layer_linear_params(roofline.shape_of("llama2-7b"))
    budget_s = a["linear_budget_attn_at_bw_ms"] / 1e3
    assert a["linear_tflops_needed_attn_at_bw"] == pytest.approx(flops / budget_s / 1e12)
    # what the measured profile says: more than the measured fp16 matmul rate is needed unless attention speeds up
    assert (a["linear_tflops_needed"] > a["matmul_tflops"] > a["linear_tflops_needed_attn_at_bw"]
            > a["linear_tflops_measured"])


def test_cli_and_unknown_batch(res, tmp_path, capsys):
    assert roofline.main([str(PROFILE), "--batch", "1", "--target", "0.7", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "batch 1 x context 129" in out and "70% of the limit" in out
    assert json.loads((tmp_path / "r.json").read_text())[0]["batch"] == 1
    with pytest.raises(SystemExit, match="no profile_bs8"):
        roofline.analyse(res, batch=8, context=129, target=0.6)


@pytest.mark.parametrize("argv,message", [(["--target", "0"], "--target is a fraction of the limit in (0, 1], got 0"),
                                          (["--target", "60"], "got 60.0"),
                                          (["--batch", "8"], "no profile at batch 8"),
                                          (["--context", "0"], "--context and --batch must be >= 1")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        roofline.main([str(PROFILE)] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        roofline.main([str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert "cannot read" in err and "missing.json" in err


def test_a_profile_taken_with_pdl_on_is_flagged(res, capsys):
    """Session 7's profiles ran with PDL on (a kernel queued behind a long one counts its wait): the report says so;
    session 4's (PDL off) and any marked profile_pdl=False do not."""
    h100 = Path(__file__).parent.parent / "docs/benchmarks/session7_h100/awq_kvint8.json"
    assert roofline.main([str(h100), "--batch", "1"]) == 0
    assert "profiled with PDL on" in capsys.readouterr().out
    assert roofline.main([str(PROFILE), "--batch", "1"]) == 0
    assert "profiled with PDL on" not in capsys.readouterr().out
    marked = dict(json.loads(h100.read_text()), profile_pdl=False)
    assert not roofline.analyse(marked, batch=1, context=129, target=0.7)["profiled_with_pdl"]

"""Benchmarks: the CPU smoke runs of `lmtriton bench` (real demo model, real HF peer) and the pieces they trust."""
import csv
import json
import numpy as np
import pytest
import torch

from scripts import bench_common, bench_generation, bench_hf, bench_report, bench_workload, plots
from tools import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _engine(*flags):
    import argparse
    p = argparse.ArgumentParser()
    bench_common.add_model_args(p)
    return bench_common.build(p.parse_args(["--model", "tiny", "--device", "cpu", *flags]), session_len=64,
                              max_batch_size=2, cpu_blocks=8)


def test_percentiles_match_numpy():
    vals = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    got = bench_report.percentiles(vals)
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(np.percentile(vals, q))
    assert bench_report.percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_workload_is_seeded_and_clipped():
    a = bench_workload.load_lengths(50, seed=3)
    assert a == bench_workload.load_lengths(50, seed=3) and a != bench_workload.load_lengths(50, seed=4)
    s = bench_workload.summary(bench_workload.load_lengths(1000))
    assert 150 < s["mean_input"] < 300 and 150 < s["mean_output"] < 300      # ShareGPT-like means
    clipped = bench_workload.load_lengths(200, max_input=32, max_output=8)
    assert max(i for i, _ in clipped) == 32 and max(o for _, o in clipped) == 8
    with pytest.raises(ValueError, match="num_prompts"):
        bench_workload.load_lengths(0)


def test_unknown_benchmark_is_named(capsys):
    assert cli.main(["bench", "latency"]) == 2
    assert "unknown benchmark 'latency'" in capsys.readouterr().err


def test_bench_decode_refuses_a_bad_batch_new(capsys):
    from scripts import bench_decode                  # refused before any GPU work
    with pytest.raises(SystemExit) as e:
        bench_decode.main(["--batch-new", "0"])
    assert e.value.code == 2 and "--batch-new must be >= 1, got 0" in capsys.readouterr().err


def test_lengths_argument_names_the_bad_item():
    assert bench_generation.parse_lengths("1:128,2048:16") == [(1, 128), (2048, 16)]
    with pytest.raises(ValueError, match="'128-512'"):
        bench_generation.parse_lengths("1:2,128-512")


def test_hf_peer_shares_weights_and_generates_the_same_tokens():
    mut = _engine()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    ours = bench_generation.run_case(mut.engine, prompts, 5, "t")["_outputs"]
    hf = bench_hf.shared_weight_model(mut.engine)
    assert hf.model.embed_tokens.weight.data_ptr() == mut.engine.runner.model.embed.data_ptr()
    seq = hf.generate(input_ids=torch.tensor(prompts), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                      pad_token_id=0)
    assert seq[:, 6:].tolist() == ours


def test_random_awq_model_runs_with_int8_kv():
    mut = _engine("--quant", "awq", "--kv", "int8")
    d = mut.describe()
    assert (d["quant"], d["kv_cache_dtype"]) == ("awq", "int8")
    r = bench_generation.run_case(mut.engine, [[5, 6, 7], [8, 9, 10, 11]], 4, "q")
    assert [len(o) for o in r["_outputs"]] == [4, 4]
    assert r["ttft_s"]["max"] <= r["elapsed_s"] and r["token_latency_ms"]["p50"] > 0
    with pytest.raises(ValueError, match="HF peer needs dense weights"):
        bench_hf.shared_weight_model(mut.engine)


def test_generation_smoke(tmp_path):
    assert cli.main(["bench", "generation", "--smoke", "--out-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "generation_demo.json").read_text())
    assert doc["meta"]["command"].startswith("lmtriton bench generation --smoke")
    rows = doc["results"]
    assert [(r["batch"], r["input"], r["output"]) for r in rows] == [(1, 8, 3), (2, 8, 3)]
    for r in rows:
        assert r["output_tok_s"] == pytest.approx(r["batch"] * 3 / r["elapsed_s"])
        assert 0 < r["ttft_s"]["min"] <= r["ttft_s"]["max"] < r["elapsed_s"]
        assert r["hf"]["output_tok_s"] > 0 and r["hf"]["words_s"] > 0
    assert "| batch | prompt | output | out tok/s |" in (tmp_path / "generation_demo.md").read_text()
    assert (tmp_path / "generation_demo.png").read_bytes()[:8] == PNG_MAGIC


def test_throughput_smoke(tmp_path):
    assert cli.main(["bench", "throughput", "--smoke", "--out-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "throughput_demo.json").read_text())
    (row,) = doc["results"]
    lengths = bench_workload.load_lengths(2, 0, 16, 3)
    assert row["num_prompts"] == 2 and row["concurrency"] == 2
    assert row["req_s"] == pytest.approx(2 / row["elapsed_s"])
    assert row["output_tok_s"] * row["elapsed_s"] == pytest.approx(sum(o for _, o in lengths))
    assert row["input_tok_s"] * row["elapsed_s"] == pytest.approx(sum(i for i, _ in lengths))
    assert row["ttft_ms"]["p50"] > 0 and row["tpot_ms"]["p50"] > 0
    cmp = doc["hf_comparison"]
    assert cmp["ours"]["output_tok_s"] > 0 and cmp["hf"]["output_tok_s"] > 0
    assert "HF generate (static batches)" in (tmp_path / "throughput_demo.md").read_text()
    # a serving file shares the concurrency figure with an in-process one
    serving = dict(doc, meta=dict(doc["meta"], bench="serving"),
                   results=[dict(row, inprocess=row, overhead_pct=0.0)])
    (tmp_path / "serving.json").write_text(json.dumps(serving))
    out = tmp_path / "both.png"
    plots.main([str(tmp_path / "throughput_demo.json"), str(tmp_path / "serving.json"), "--out", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC
    gen = tmp_path / "generation.json"
    gen.write_text(json.dumps(dict(doc, meta=dict(doc["meta"], bench="generation"))))
    with pytest.raises(ValueError, match="cannot share a figure"):
        plots.main([str(tmp_path / "throughput_demo.json"), str(gen)])


@pytest.fixture(scope="module")
def random_workspace(tmp_path_factory, demo_model_dir):
    from scripts import bench_random_workspace
    ws = tmp_path_factory.mktemp("ws")
    bench_random_workspace.write("tiny", str(demo_model_dir), ws, quant="awq", kv="int8", dtype="float32",
                                 params={"session_len": "512", "cpu_kv_blocks": "64", "cache_block_seq_len": "16"})
    return ws


@pytest.mark.slow
@pytest.mark.server
def test_serving_and_perf_analyzer_against_tritonserver(random_workspace, tmp_path):
    """A random tiny AWQ model served by the real tritonserver: bench serving (with its in-process baseline) and
    one perf_analyzer level, both against the same server."""
    from scripts import bench_serving, perf_analyzer_run
    from scripts.launch_triton_server import TritonServer
    env = perf_analyzer_run.environment()
    binary = perf_analyzer_run.find_perf_analyzer()
    if perf_analyzer_run.missing_libraries(binary, env):
        pytest.skip("perf_analyzer needs Debian libb64-0d (make perf installs it)")
    repo = random_workspace / "model_repository"
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "server.log") as server:
        assert bench_serving.main(["--smoke", "--workspace", str(random_workspace), "--url", server.grpc_url,
                                   "--out-dir", str(tmp_path), "--tag", "t"]) == 0
        assert perf_analyzer_run.main(["--smoke", "--concurrency", "1", "--workspace", str(random_workspace),
                                       "--url", server.grpc_url, "--out-dir", str(tmp_path / "perf")]) == 0
    doc = json.loads((tmp_path / "serving_t.json").read_text())
    assert doc["model"]["quant"] == "awq" and doc["model"]["kv_cache_dtype"] == "int8"
    assert [r["concurrency"] for r in doc["results"]] == [1, 3]
    for r in doc["results"]:
        assert r["errors"] == 0 and r["num_prompts"] == 3
        assert r["output_tok_s"] * r["elapsed_s"] == pytest.approx(sum(o for _, o in
                                                                       bench_workload.load_lengths(3, 0, 24, 4)))
        assert r["inprocess"]["output_tok_s"] > 0 and "overhead_pct" in r
    with open(tmp_path / "perf" / "perf.csv") as f:
        row = next(csv.DictReader(f))
    assert row["Concurrency"] == "1" and float(row["Inferences/Second"]) > 0
    assert "request latency ms p50" in (tmp_path / "perf" / "perf.md").read_text()

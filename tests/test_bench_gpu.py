"""The GPU serving benchmark's CPU-side pieces: prompts per concurrency level, and turning the device call's
tarball (scripts/bench_gpu.sh) into docs (scripts/bench_gpu_docs.py)."""
import shutil
import tarfile
from pathlib import Path

from scripts import bench_gpu_docs, bench_report, bench_serving, bench_throughput

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_level_size_keeps_low_concurrency_short():
    assert [bench_throughput.level_size(256, c, 4) for c in (1, 4, 16, 64)] == [16, 16, 64, 256]
    assert bench_throughput.level_size(100, 64, 4) == 100       # never more than the workload has
    assert bench_throughput.level_size(10, 1, 0) == 10          # 0: every level runs all prompts


def _serving_result(tag: str, quant: str, kv: str, scale: float) -> dict:
    rows = []
    for c in (1, 16, 64):
        tok_s = 100.0 * c * scale
        lat = {"mean": 10.0 * c, "p50": 10.0 * c, "p90": 12.0 * c, "p99": 15.0 * c}
        rows.append({"concurrency": c, "num_prompts": max(16, 4 * c), "req_s": c / 2, "input_tok_s": 2 * tok_s,
                     "output_tok_s": tok_s, "ttft_ms": lat, "tpot_ms": lat, "itl_ms": lat, "latency_s": lat,
                     "errors": 0, "overhead_pct": 5.0,
                     "inprocess": {"output_tok_s": tok_s * 1.05, "ttft_ms": lat}})
    machine = {"host_cpu": "x86_64", "cpu_count": 16, "python": "3.12", "torch": "2.11.0+cu130",
               "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "cuda": "13.0"}
    return {"meta": {"bench": "serving", "command": f"lmtriton bench serving --tag {tag}",
                     "date_utc": "2026-11-22 06:00 UTC", "machine": machine},
            "model": {"model": tag, "quant": quant, "dtype": "torch.float16", "kv_cache_dtype": kv,
                      "kv_blocks": 1000, "block_size": 64, "cuda_graph": True, "served_as": "llm"},
            "results": rows}


def _tarball(tmp_path: Path) -> Path:
    res = tmp_path / "res"
    for tag, quant, kv, scale in (("llama2-7b_fp16", "none", "auto", 1.0),
                                  ("llama2-7b_awq_kvint8", "awq", "int8", 0.8)):
        doc = _serving_result(tag, quant, kv, scale)
        bench_report.write(res, f"serving_{tag}", doc, bench_report.markdown_table(doc["results"],
                                                                                  bench_serving.COLUMNS))
    (res / "perf").mkdir()
    (res / "perf" / "perf.csv").write_text("Concurrency,Inferences/Second,p50 latency\n1,1.5,40000\n")
    (res / "perf" / "perf.md").write_text("`python -m scripts.perf_analyzer_run ...` — NVIDIA H200.\n\n"
                                          "| concurrency | requests/s |\n|---|---|\n| 1 | 1.5 |\n")
    (res / "serving_fp16.log").write_text("a step log\n")
    tgz = tmp_path / "bench_gpu.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(res, arcname=".")
    return tgz


def test_docs_from_the_device_tarball(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs / "benchmarks.md")
    tgz = _tarball(tmp_path)
    assert bench_gpu_docs.main([str(tgz), "--docs", str(docs)]) == 0
    out = docs / "benchmarks"
    assert (out / "serving_llama2-7b.png").read_bytes()[:8] == PNG_MAGIC
    for name in ("serving_llama2-7b_fp16.json", "serving_llama2-7b_awq_kvint8.md", "perf_llama2-7b_fp16.csv"):
        assert (out / name).exists(), name
    text = (docs / "benchmarks.md").read_text()
    assert text.count(bench_gpu_docs.BEGIN) == 1 and bench_gpu_docs.OLD_START not in text
    assert "NVIDIA H200, 2026-11-22 06:00 UTC" in text and "W4A16 (AWQ int4, group 128) weights" in text
    assert "| 64 | 256 |" in text and "| 1 | 1.5 |" in text            # both serving tables and perf's
    assert text.index("fp16`") < text.index("awq_kvint8`")               # fp16 first
    # a second run (results brought back again) replaces the section instead of adding one
    assert bench_gpu_docs.main([str(tgz), "--docs", str(docs)]) == 0
    again = (docs / "benchmarks.md").read_text()
    assert again.count(bench_gpu_docs.BEGIN) == 1 and again == text

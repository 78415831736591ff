"""`make perf`: Triton's perf_analyzer against the served model, gRPC streaming, a concurrency sweep.

perf_analyzer comes from the tritonclient[all]==2.51.0 wheel (installed as <venv>/bin/perf_analyzer; the
environment variable PERF_ANALYZER names another copy, as scripts/bench_gpu.sh does on the GPU machine). It links
libb64.so.0d (Debian libb64-0d; `make perf` installs it when missing) and libcudart.so.12 (PyPI
nvidia-cuda-runtime-cu12, put on LD_LIBRARY_PATH here). The requests are the ShareGPT-like workload as
perf_analyzer input data (text_input, max_tokens, stream, ignore_eos, temperature). Each concurrency level keeps
its `-f` CSV and its log under the results directory; perf.csv merges them and perf.md is a table of them.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

from . import bench_report, bench_workload

log = logging.getLogger(__name__)


def find_perf_analyzer() -> Path:
    if os.environ.get("PERF_ANALYZER"):      # e.g. the carried, unpacked binary on the GPU machine
        return Path(os.environ["PERF_ANALYZER"])
    candidates = [Path(sys.executable).parent / "perf_analyzer", Path(sysconfig.get_path("scripts")) / "perf_analyzer"]
    try:
        import tritonclient
        candidates.append(Path(tritonclient.__file__).parent / "bin" / "perf_analyzer")
    except ImportError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit("perf_analyzer not found: install tritonclient[all]==2.51.0 (make install)")


def environment() -> dict:
    """os.environ plus the directory of libcudart.so.12 from nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime
        lib = str(Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [lib, env.get("LD_LIBRARY_PATH")]))
    except ImportError:
        log.warning("nvidia-cuda-runtime-cu12 is not installed: perf_analyzer may miss libcudart.so.12")
    return env


def missing_libraries(binary: Path, env: dict) -> List[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def write_input_data(path: Path, texts: List[str], lengths) -> None:
    """perf_analyzer --input-data JSON: one entry per request, each tensor with its content and shape."""
    def t(v):
        return {"content": [v], "shape": [1]}
    data = [{"text_input": t(text), "max_tokens": t(out), "stream": t(True), "ignore_eos": t(True),
             "temperature": t(0.0)} for text, (_, out) in zip(texts, lengths)]
    path.write_text(json.dumps({"data": data}))


def run_level(binary: Path, env: dict, url: str, model: str, data: Path, c: int, out_dir: Path,
              requests: int, stability: float, timeout: float) -> Optional[Path]:
    csv_path, log_path = out_dir / f"perf_c{c}.csv", out_dir / f"perf_c{c}.log"
    cmd = [str(binary), "-m", model, "-i", "grpc", "-u", url, "--streaming", "--input-data", str(data),
           "--concurrency-range", f"{c}:{c}", "--measurement-mode", "count_windows",
           "--measurement-request-count", str(max(requests, c)), "--stability-percentage", str(stability),
           "--max-trials", "3", "-f", str(csv_path)]
    log.info("perf_analyzer concurrency %d: %s", c, " ".join(cmd))
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0 or not csv_path.exists():
        log.error("perf_analyzer failed at concurrency %d (exit %d); see %s", c, rc, log_path)
        return None
    return csv_path


def merge(csvs: List[Path], out_dir: Path) -> List[dict]:
    rows = []
    for p in csvs:
        with open(p) as f:
            rows += list(csv.DictReader(f))
    if rows:
        with open(out_dir / "perf.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


SUMMARY = [("concurrency", "concurrency"), ("req_s", "requests/s"), ("responses_s", "responses/s"),
           ("p50_ms", "request latency ms p50"), ("p90_ms", "p90"), ("p99_ms", "p99")]


def summarize(row: dict) -> dict:
    """A perf_analyzer CSV row -> the table's units (latencies in ms)."""
    def ms(key):
        return float(row[key]) / 1e3 if row.get(key) else None
    return {"concurrency": int(row["Concurrency"]), "req_s": float(row["Inferences/Second"]),
            "responses_s": float(row["Response Throughput"]) if row.get("Response Throughput") else None,
            "p50_ms": ms("p50 latency"), "p90_ms": ms("p90 latency"), "p99_ms": ms("p99 latency")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.perf_analyzer_run", description=__doc__.split("\n")[0])
    p.add_argument("--workspace", default="workspace", help="converted workspace whose model_repository is served")
    p.add_argument("--url", default=None, help="gRPC host:port of a running tritonserver (skips the launch)")
    p.add_argument("--model-name", default="llm")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--num-prompts", type=int, default=100, help="distinct requests in the input data")
    p.add_argument("--max-input-len", type=int, default=0)
    p.add_argument("--max-output-len", type=int, default=0)
    p.add_argument("--requests", type=int, default=16, help="requests per measurement window")
    p.add_argument("--stability", type=float, default=20.0,
                   help="perf_analyzer -s: allowed %% variation between measurement windows")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for one perf_analyzer run")
    p.add_argument("--out-dir", default="workspace/perf")
    p.add_argument("--smoke", action="store_true", help="CPU: 4 short prompts, concurrency 1 and 2")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.concurrency, args.num_prompts, args.max_input_len, args.max_output_len, args.requests = \
            "1,2", 4, 24, 4, 2
        args.stability = 1000.0          # a loaded CPU never looks stable; CI only checks that it runs
    binary, env = find_perf_analyzer(), environment()
    missing = missing_libraries(binary, env)
    if missing:
        raise SystemExit(f"perf_analyzer misses {missing}: apt-get install -y libb64-0d (make perf does it); "
                         f"libcudart.so.12 comes from pip nvidia-cuda-runtime-cu12")
    repo = Path(args.workspace) / "model_repository"
    from backend.llm import load_tokenizer
    from .bench_serving import served_params
    tokenizer = load_tokenizer(served_params(repo, args.model_name)["tokenizer_dir"])
    lengths = bench_workload.load_lengths(args.num_prompts, 0, args.max_input_len, args.max_output_len)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "input_data.json"
    write_input_data(data, bench_workload.text_prompts(tokenizer, lengths), lengths)
    levels = [int(c) for c in args.concurrency.split(",")]

    def sweep(url: str) -> List[Path]:
        done = []
        for c in levels:
            path = run_level(binary, env, url, args.model_name, data, c, out, args.requests, args.stability,
                             args.timeout)
            if path is not None:
                done.append(path)
        return done

    if args.url:
        csvs = sweep(args.url)
    else:
        from .launch_triton_server import TritonServer
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=out / "server.log") as server:
            csvs = sweep(server.grpc_url)
    rows = merge(csvs, out)
    m = bench_report.meta("perf", argv)
    head = f"`python -m scripts.perf_analyzer_run {' '.join(argv)}` (`make perf`) — " \
           f"{m['machine'].get('gpu', m['machine']['host_cpu'])}, {m['date_utc']}. perf_analyzer 2.51 prints " \
           f"'using the first response for measuring latency' for our decoupled model, but its latency matched the " \
           f"whole request's (GPU run of docs/benchmarks.md): read it as request latency; TTFT and ITL come " \
           f"from `lmtriton bench serving`.\n\n"
    (out / "perf.md").write_text(head + bench_report.markdown_table([summarize(r) for r in rows], SUMMARY) + "\n")
    log.info("perf_analyzer: %d of %d levels measured; results in %s", len(csvs), len(levels), out)
    return 0 if len(csvs) == len(levels) else 1


if __name__ == "__main__":
    sys.exit(main())

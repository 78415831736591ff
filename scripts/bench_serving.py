"""`lmtriton bench serving`: the ShareGPT-like workload through tritonserver (gRPC streaming) at several
concurrency levels — TTFT, time per output token, inter-response gaps, throughput — and, in the same run, the
in-process engine with the served model's own engine parameters on the same prompts, so the table shows what
Triton (frontend, IPC, per-response sends) costs.

With --workspace (default) it starts tritonserver on free loopback ports (scripts/launch_triton_server.py) after
the in-process baseline has run and freed its memory; with --url it uses a server that is already running.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import re
from pathlib import Path

import torch
from tqdm import tqdm

from backend.config import EngineConfig
from backend.engine.core import build_engine
from backend.llm import load_tokenizer

from . import bench_common, bench_report, bench_throughput, bench_workload, serving_load

log = logging.getLogger(__name__)

COLUMNS = bench_throughput.COLUMNS + [("inprocess.output_tok_s", "in-process out tok/s"),
                                      ("inprocess.ttft_ms.p50", "in-process TTFT p50"),
                                      ("overhead_pct", "throughput cost %"), ("errors", "errors")]
_PARAM = re.compile(r'key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"')


def served_params(repo: Path, model_name: str) -> dict:
    """config.pbtxt string parameters of the served model, with weights_dir/tokenizer_dir made absolute."""
    model_dir = repo / model_name
    params = dict(_PARAM.findall((model_dir / "config.pbtxt").read_text()))
    for key in ("weights_dir", "tokenizer_dir"):
        params[key] = os.path.normpath(model_dir / params[key])
    return params


def served_engine_config(params: dict) -> dict:
    """The EngineConfig fields (+ tokenizer_dir) the served engine runs with, typed as the frontend types them."""
    defaults = EngineConfig()
    out = {"model": params["weights_dir"], "tokenizer_dir": params["tokenizer_dir"]}
    for f in dataclasses.fields(EngineConfig):
        raw, default = params.get(f.name, ""), getattr(defaults, f.name)
        if f.name == "model" or raw == "":
            continue
        out[f.name] = (raw.lower() in ("true", "1") if isinstance(default, bool) else
                       int(raw) if default is None else type(default)(raw))
    return out


def inprocess_baseline(params: dict, lengths, concurrency, seed: int, warmup: bool = True,
                       per_concurrency: int = 0) -> tuple:
    """Rows per concurrency of the served model's engine run in this process, its description, its tokenizer."""
    engine = build_engine(served_engine_config(params))
    tokenizer = load_tokenizer(params["tokenizer_dir"])
    mut = bench_common.ModelUnderTest(engine, Path(params["weights_dir"]).parent.name, tokenizer,
                                      params["weights_dir"])
    texts = bench_workload.text_prompts(tokenizer, lengths, seed)
    prompts = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
    outs = [b for _, b in lengths]
    if warmup:
        bench_throughput.run_workload(engine, prompts[:4], [min(4, o) for o in outs[:4]], 4, "warmup")
    rows = {}
    for c in concurrency:
        n = bench_throughput.level_size(len(prompts), c, per_concurrency)
        with tqdm(total=n, desc=f"in-process c={c}", unit="req") as bar:
            row = bench_throughput.run_workload(engine, prompts[:n], outs[:n], c, ("base", c), bar)
        row.pop("_outputs")
        rows[c] = row
    desc = mut.describe()
    engine.close()           # tp > 1: the workers leave their GPUs before tritonserver's engine needs them
    mut.close()
    del engine, mut
    gc.collect()
    if torch.cuda.is_available():    # the served engine sizes its KV pool from the GPU memory left free
        torch.cuda.empty_cache()
        log.info("in-process engine closed: this process keeps %.2f GiB of GPU memory reserved",
                 torch.cuda.memory_reserved() / 2**30)
    return rows, desc, tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmtriton bench serving", description=__doc__.split("\n")[0])
    bench_throughput.add_workload_args(p)
    p.add_argument("--workspace", default="workspace",
                   help="converted workspace (`make convert`): its model_repository is served, and its engine "
                        "parameters and weights make the in-process baseline")
    p.add_argument("--url", default=None, help="gRPC host:port of a running tritonserver (skips the launch)")
    p.add_argument("--model-name", default="llm")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process baseline")
    p.add_argument("--server-log", default=None, help="file for tritonserver's log")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU CI run: 3 short prompts at concurrency 1 and 3")
    argv = list(argv or [])
    args = p.parse_args(argv)
    if args.smoke:
        args.num_prompts, args.concurrency, args.max_input_len, args.max_output_len = 3, "1,3", 24, 4
    conc = [int(c) for c in args.concurrency.split(",")]
    lengths = bench_workload.load_lengths(args.num_prompts, args.seed, args.max_input_len, args.max_output_len)
    repo = Path(args.workspace) / "model_repository"
    if not (repo / args.model_name / "config.pbtxt").exists():
        raise SystemExit(f"{repo / args.model_name / 'config.pbtxt'} not found: run `make convert` first")
    params = served_params(repo, args.model_name)
    base, desc = {}, {"model": Path(params["weights_dir"]).parent.name}
    if not args.no_inprocess:
        base, desc, tokenizer = inprocess_baseline(params, lengths, conc, args.seed, warmup=not args.smoke,
                                                   per_concurrency=args.prompts_per_concurrency)
    else:
        tokenizer = load_tokenizer(params["tokenizer_dir"])
    texts = bench_workload.text_prompts(tokenizer, lengths, args.seed)
    if args.url:
        rows = served_rows(args.url, args.model_name, texts, lengths, conc, base, args.timeout,
                           args.prompts_per_concurrency)
    else:
        from scripts.launch_triton_server import TritonServer
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=args.server_log) as server:
            rows = served_rows(server.grpc_url, args.model_name, texts, lengths, conc, base, args.timeout,
                               args.prompts_per_concurrency)
    result = {"meta": bench_report.meta("serving", argv), "model": {**desc, "served_as": args.model_name},
              "workload": bench_workload.summary(lengths), "results": rows}
    tag = args.tag or Path(args.workspace).resolve().name
    path = bench_report.write(args.out_dir, f"serving_{tag}", result, bench_report.markdown_table(rows, COLUMNS))
    bench_report.plot(path)
    return 0


def served_rows(url, model_name, texts, lengths, conc, base: dict, timeout: float, per_concurrency: int = 0) -> list:
    build = serving_load.InputBuilder(url, model_name)
    requests = [build({"text_input": t, "max_tokens": out, "stream": True, "ignore_eos": True, "temperature": 0.0})
                for t, (_, out) in zip(texts, lengths)]
    serving_load.run_load(url, model_name, requests[:1], 1, timeout)                  # warm-up
    rows = []
    for c in conc:
        n = bench_throughput.level_size(len(requests), c, per_concurrency)
        with tqdm(total=n, desc=f"served c={c}", unit="req") as bar:
            rec = serving_load.run_load(url, model_name, requests[:n], c, timeout, bar)
        if len(rec["errors"]) == n:
            raise RuntimeError(f"every request failed; first error: {next(iter(rec['errors'].values()))}")
        ok = [i for i in range(n) if i not in rec["errors"]]
        for i in ok:     # a frontend that does not report completion_tokens: ignore_eos makes it max_tokens
            rec["tokens"][i] = rec["tokens"][i] or lengths[i][1]
        row = {"concurrency": c, **bench_throughput.latency_stats(
            [rec["starts"][i] for i in ok], [rec["arrivals"][i] for i in ok], [rec["ends"][i] for i in ok],
            rec["elapsed_s"], sum(rec["prompt_tokens"][i] for i in ok), sum(rec["tokens"][i] for i in ok),
            [rec["tokens"][i] for i in ok]), "errors": len(rec["errors"])}
        if rec["errors"]:
            log.warning("%d requests failed at concurrency %d, e.g. %s", len(rec["errors"]), c,
                        next(iter(rec["errors"].values())))
        if c in base:
            row["inprocess"] = base[c]
            row["overhead_pct"] = 100.0 * (1 - row["output_tok_s"] / base[c]["output_tok_s"])
        rows.append(row)
    return rows

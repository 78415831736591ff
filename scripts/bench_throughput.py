"""`lmtriton bench throughput`: request throughput of the in-process engine on the ShareGPT-like workload.

Closed loop, as LMDeploy's profile_throughput: at most C requests are in flight; a new one joins as soon as one
finishes (continuous batching does the rest). Reported per concurrency: requests/s, input and output tokens/s,
time to first token, time per output token and inter-token gaps. The HF peer runs a slice of the same prompts
as static batches in the same run, next to our engine on exactly that slice.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from typing import List, Optional

import torch
from tqdm import tqdm

from backend.config import SamplingParams

from . import bench_common, bench_hf, bench_report, bench_workload

log = logging.getLogger(__name__)

COLUMNS = [("concurrency", "concurrency"), ("num_prompts", "prompts"), ("req_s", "req/s"),
           ("input_tok_s", "in tok/s"), ("output_tok_s", "out tok/s"), ("ttft_ms.p50", "TTFT ms p50"),
           ("ttft_ms.p99", "TTFT p99"), ("tpot_ms.p50", "TPOT ms p50"), ("itl_ms.p99", "ITL ms p99"),
           ("latency_s.p50", "latency s p50")]


def latency_stats(starts, arrivals, ends, elapsed, num_in, num_out, tokens=None) -> dict:
    """Shared by the in-process and the served runs: per-request start, arrival and end times -> metrics.

    arrivals[i] are the times request i received something (a token in-process, a response when served, where
    one response may carry several tokens); tokens[i] is its output length (default: one per arrival)."""
    tokens = tokens or [len(arr) for arr in arrivals]
    ttft = [(arr[0] - s) * 1e3 for s, arr in zip(starts, arrivals) if arr]
    tpot = [(arr[-1] - arr[0]) * 1e3 / (n - 1) for arr, n in zip(arrivals, tokens) if arr and n > 1]
    itl = [(b - a) * 1e3 for arr in arrivals for a, b in zip(arr, arr[1:])]
    lat = [e - s for s, e in zip(starts, ends)]
    n = len(starts)
    return {"num_prompts": n, "elapsed_s": elapsed, "req_s": n / elapsed, "input_tok_s": num_in / elapsed,
            "output_tok_s": num_out / elapsed, "ttft_ms": {"mean": bench_report.mean(ttft),
                                                            **bench_report.percentiles(ttft)},
            "tpot_ms": {"mean": bench_report.mean(tpot), **bench_report.percentiles(tpot)},
            "itl_ms": {"mean": bench_report.mean(itl), **bench_report.percentiles(itl)},
            "latency_s": {"mean": bench_report.mean(lat), **bench_report.percentiles(lat)}}


def run_workload(engine, prompts: List[List[int]], outs: List[int], concurrency: int, tag,
                 bar: Optional[tqdm] = None) -> dict:
    """Closed-loop run of all prompts with at most `concurrency` in flight; returns latency_stats + outputs."""
    queue = deque(range(len(prompts)))
    starts, ends = [0.0] * len(prompts), [0.0] * len(prompts)
    arrivals: List[List[float]] = [[] for _ in prompts]
    outputs: List[List[int]] = [[] for _ in prompts]
    in_flight = 0
    t0 = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < concurrency:
            i = queue.popleft()
            engine.add_request((tag, i), prompts[i], SamplingParams(max_tokens=outs[i], ignore_eos=True,
                                                                    temperature=0.0))
            starts[i] = time.perf_counter()
            in_flight += 1
        for i, now in bench_common.step_and_record(engine, arrivals, outputs)[0]:
            ends[i] = now
            in_flight -= 1
            if bar is not None:
                bar.update(1)
    elapsed = time.perf_counter() - t0
    row = latency_stats(starts, arrivals, ends, elapsed, sum(map(len, prompts)), sum(map(len, outputs)))
    row["_outputs"] = outputs
    return row


def hf_comparison(mut, hf, prompts, outs, batch: int, ours: Optional[dict] = None) -> dict:
    """Our engine (concurrency = batch; `ours` when the main run already did exactly that) and HF generate
    (static batches of `batch`) on the same prompts."""
    if ours is None:
        ours = run_workload(mut.engine, prompts, outs, batch, "hf-slice")
        ours["words_s"] = bench_hf.words_per_second(mut.tokenizer, ours.pop("_outputs"), ours["elapsed_s"])
    try:
        theirs = bench_hf.generate(hf, prompts, outs, batch, mut.tokenizer)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        theirs = {"error": "out of memory"}
    return {"num_prompts": len(prompts), "batch": batch, "ours": ours, "hf": theirs}


def level_size(num_prompts: int, concurrency: int, per_concurrency: int) -> int:
    """How many of the workload's prompts one concurrency level runs (--prompts-per-concurrency)."""
    if per_concurrency <= 0:
        return num_prompts
    return min(num_prompts, max(16, per_concurrency * concurrency))


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated in-flight request limits")
    p.add_argument("--max-input-len", type=int, default=0, help="clip prompt lengths (0 = as sampled)")
    p.add_argument("--max-output-len", type=int, default=0, help="clip output lengths (0 = as sampled)")
    p.add_argument("--prompts-per-concurrency", type=int, default=0, metavar="K",
                   help="level C runs the first min(num_prompts, max(16, K*C)) prompts, so that low concurrency "
                        "levels stay short (0 = every level runs all prompts)")
    p.add_argument("--out-dir", default="workspace/bench")
    p.add_argument("--tag", default=None, help="file name suffix (default: model, quant and KV dtype)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmtriton bench throughput", description=__doc__.split("\n")[0])
    bench_common.add_model_args(p)
    add_workload_args(p)
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--hf-num-prompts", type=int, default=32, help="prompts of the HF comparison slice")
    p.add_argument("--hf-batch", type=int, default=8, help="HF static batch size (and our concurrency there)")
    p.add_argument("--smoke", action="store_true", help="CPU CI run: demo model, 2 short prompts")
    argv = list(argv or [])
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.num_prompts, args.concurrency = "cpu", 2, "2"
        args.max_input_len, args.max_output_len, args.hf_num_prompts, args.hf_batch = 16, 3, 2, 2
    conc = [int(c) for c in args.concurrency.split(",")]
    lengths = bench_workload.load_lengths(args.num_prompts, args.seed, args.max_input_len, args.max_output_len)
    session_len = max(a + b for a, b in lengths) + 1
    mut = bench_common.build(args, session_len=max(session_len, 64), max_batch_size=max(conc + [args.hf_batch]),
                             cpu_blocks=max(conc + [args.hf_batch]) * -(-session_len // 64))
    prompts = bench_workload.token_prompts(lengths, mut.engine.model_cfg.vocab_size, args.seed)
    outs = [b for _, b in lengths]
    if not args.smoke:
        run_workload(mut.engine, prompts[:4], [min(4, o) for o in outs[:4]], 4, "warmup")
    rows = []
    for c in conc:
        n = level_size(len(prompts), c, args.prompts_per_concurrency)
        with tqdm(total=n, desc=f"throughput c={c}", unit="req") as bar:
            row = {"concurrency": c, **run_workload(mut.engine, prompts[:n], outs[:n], c, ("tp", c), bar)}
        row["words_s"] = bench_hf.words_per_second(mut.tokenizer, row.pop("_outputs"), row["elapsed_s"])
        rows.append(row)
        log.info("concurrency %d: %.2f req/s, %.1f output tok/s", c, row["req_s"], row["output_tok_s"])
    result = {"meta": bench_report.meta("throughput", argv), "model": mut.describe(),
              "workload": bench_workload.summary(lengths), "results": rows}
    table = bench_report.markdown_table(rows, COLUMNS)
    if not args.no_hf:
        k = min(args.hf_num_prompts, len(prompts))
        same = [r for r in rows if r["concurrency"] == args.hf_batch] if k == len(prompts) else []
        cmp = hf_comparison(mut, bench_hf.load(mut), prompts[:k], outs[:k], args.hf_batch,
                            ours=same[0] if same else None)
        result["hf_comparison"] = cmp
        table += "\n\n" + hf_table(cmp)
    path = bench_report.write(args.out_dir, f"throughput_{args.tag or bench_common.default_tag(mut)}", result,
                              table)
    bench_report.plot(path)
    mut.close()
    return 0


def hf_table(cmp: dict) -> str:
    """The same prompts through both: tokens/s and words/s."""
    rows = [{"who": "lmtriton (continuous batching)", **cmp["ours"]}, {"who": "HF generate (static batches)",
                                                                      **cmp["hf"]}]
    title = f"Same {cmp['num_prompts']} prompts, batch/concurrency {cmp['batch']}:\n\n"
    return title + bench_report.markdown_table(rows, [("who", "engine"), ("output_tok_s", "out tok/s"),
                                                      ("words_s", "words/s"), ("elapsed_s", "seconds")])

"""`lmtriton bench generation`: static batches through the in-process engine, as TurboMind's profile_generation.

For each batch size x (prompt, output) length pair, all requests start together and run to exactly `output`
tokens (ignore_eos). Each step's outputs are timed as they come back from LLMEngine.step(): first-token latency
per request, per-token latency (gaps between a request's consecutive tokens), output tokens/s of the batch and
the peak GPU memory. The HF transformers peer generates the same prompts in the same run.
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from typing import List, Optional

import torch
from tqdm import tqdm

from backend.config import SamplingParams

from . import bench_common, bench_hf, bench_report

log = logging.getLogger(__name__)

COLUMNS = [("batch", "batch"), ("input", "prompt"), ("output", "output"), ("output_tok_s", "out tok/s"),
           ("ttft_s.mean", "1st token s (mean)"), ("ttft_s.max", "1st token s (max)"),
           ("token_latency_ms.p50", "tok ms p50"), ("token_latency_ms.p90", "p90"),
           ("token_latency_ms.p99", "p99"), ("peak_mem_gib", "peak GiB"), ("hf.output_tok_s", "HF tok/s"),
           ("words_s", "words/s"), ("hf.words_s", "HF words/s"), ("skipped", "note")]


def parse_lengths(text: str) -> List[tuple]:
    pairs = []
    for item in text.split(","):
        try:
            a, b = item.split(":")
            pairs.append((int(a), int(b)))
        except ValueError:
            raise ValueError(f"--lengths: expected prompt:output pairs like 128:512, got {item!r}") from None
        if pairs[-1][0] < 1 or pairs[-1][1] < 1:
            raise ValueError(f"--lengths: lengths must be >= 1, got {item!r}")
    return pairs


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> List[List[int]]:
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def run_case(engine, prompts: List[List[int]], n_out: int, tag: str, bar: Optional[tqdm] = None) -> dict:
    """One static batch; returns timings and the generated ids."""
    params = SamplingParams(max_tokens=n_out, ignore_eos=True, temperature=0.0)
    arrivals = {i: [] for i in range(len(prompts))}
    outputs = {i: [] for i in range(len(prompts))}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request((tag, i), p, params)
    while engine.has_unfinished():
        _, num_new = bench_common.step_and_record(engine, arrivals, outputs)
        if bar is not None:
            bar.update(num_new)
    elapsed = time.perf_counter() - t0
    ttft = [a[0] - t0 for a in arrivals.values()]
    gaps = [(b - a) * 1e3 for arr in arrivals.values() for a, b in zip(arr, arr[1:])]
    assert all(len(o) == n_out for o in outputs.values()), "ignore_eos requests must produce exactly max_tokens"
    return {"elapsed_s": elapsed, "output_tok_s": len(prompts) * n_out / elapsed,
            "ttft_s": {"mean": bench_report.mean(ttft), "min": min(ttft), "max": max(ttft)},
            "token_latency_ms": {"mean": bench_report.mean(gaps), **bench_report.percentiles(gaps)},
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "_outputs": [outputs[i] for i in range(len(prompts))]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmtriton bench generation", description=__doc__.split("\n")[0])
    bench_common.add_model_args(p)
    p.add_argument("--batch-sizes", default="1,16,32,64")
    p.add_argument("--lengths", default="1:128,128:512,2048:128,2048:2048", help="prompt:output pairs")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per batch size (CUDA graphs, caches)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--hf-max-batch", type=int, default=16, help="run the HF peer only up to this batch size")
    p.add_argument("--out-dir", default="workspace/bench")
    p.add_argument("--tag", default=None, help="file name suffix (default: model, quant and KV dtype)")
    p.add_argument("--smoke", action="store_true", help="CPU CI run: demo model, batches 1,2, prompt 8, output 3")
    argv = list(argv or [])
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.lengths, args.warmup, args.device = "1,2", "8:3", 0, "cpu"
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    lengths = parse_lengths(args.lengths)
    session_len = max(a + b for a, b in lengths) + 1
    mut = bench_common.build(args, session_len=max(session_len, 64), max_batch_size=max(sizes),
                             cpu_blocks=max(sizes) * -(-session_len // 64))
    engine = mut.engine
    hf = None if args.no_hf else bench_hf.load(mut)
    rng = random.Random(args.seed)
    vocab = engine.model_cfg.vocab_size
    bm = engine.block_manager
    rows = []
    for _ in range(args.warmup):     # every decode batch size, and a prefill of every prompt length (kernels, cuBLAS)
        for bs in sizes:
            run_case(engine, random_prompts(rng, bs, 16, vocab), 4, ("warmup", bs))
        for n_in in sorted({a for a, _ in lengths}):
            run_case(engine, random_prompts(rng, 1, n_in, vocab), 2, ("warmup-prefill", n_in))
    cases = [(bs, a, b) for bs in sizes for a, b in lengths]
    bar = tqdm(total=sum(bs * b for bs, _, b in cases), desc="generation", unit="tok")
    for bs, n_in, n_out in cases:
        row = {"batch": bs, "input": n_in, "output": n_out}
        rows.append(row)
        need = bs * bm.blocks_for(n_in + n_out)
        if need > bm.num_blocks:
            row["skipped"] = f"needs {need} KV blocks, cache has {bm.num_blocks}"
            bar.update(bs * n_out)
            continue
        prompts = random_prompts(rng, bs, n_in, vocab)
        row.update(run_case(engine, prompts, n_out, ("gen", bs, n_in, n_out), bar))
        row["words_s"] = bench_hf.words_per_second(mut.tokenizer, row.pop("_outputs"), row["elapsed_s"])
        if hf is not None and bs <= args.hf_max_batch:
            try:
                row["hf"] = bench_hf.generate(hf, prompts, [n_out] * bs, bs, mut.tokenizer)
            except torch.cuda.OutOfMemoryError:
                row["hf"] = {"error": "out of memory"}
                torch.cuda.empty_cache()
        bar.set_postfix(bs=bs, tok_s=f"{row['output_tok_s']:.0f}")
    bar.close()
    tag = args.tag or bench_common.default_tag(mut)
    result = {"meta": bench_report.meta("generation", argv), "model": mut.describe(), "results": rows}
    path = bench_report.write(args.out_dir, f"generation_{tag}", result,
                              bench_report.markdown_table(rows, COLUMNS))
    bench_report.plot(path)
    mut.close()
    return 0

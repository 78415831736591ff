"""Decode speed against the memory-bandwidth limit, with the HF transformers peers, in ONE process on the GPU.

  PYTHONPATH=. python3 scripts/bench_decode.py --model llama2-7b --out $OUT/decode_llama2-7b.json
  (--model llama3-8b, --kv int8|int4, --quant awq, --hf none|eager|static|both)
Measures: device copy bandwidth (clone of 4 GiB, read + write); our bs=1 decode tok/s (128-token prompt, 256 new
tokens); batch-64 decode tok/s; TTFT of a 2048-token prompt; HF eager and HF static cache (generate with
cache_implementation="static", warmed up with the same max_new_tokens) over the same weights.
The limit of a decode step is (bytes of weights read + bytes of KV read) / copy bandwidth; every tok/s figure is
also given as a fraction of the limit at its batch size and mean context. TTFT is compared with the matmul limit
(2 * parameters * tokens + causal attention FLOPs at the measured fp16 matmul rate).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import List

import torch

from backend.config import SamplingParams
from backend.kernels import _cupy
from scripts.bench_attention import copy_bandwidth, time_ms
from scripts.bench_common import add_model_args, build, default_tag

log = logging.getLogger("bench_decode")


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.float16, device="cuda")
    b = torch.randn(n, n, dtype=torch.float16, device="cuda")
    ms = time_ms(lambda: a @ b, iters=10)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def weight_bytes_per_step(model) -> int:
    """Bytes a decode step reads from weights: every linear, the norms and lm_head (not the embedding table)."""
    total = model.lm_head.numel() * model.lm_head.element_size() + model.norm.numel() * model.norm.element_size()
    for layer in model.layers:
        total += 2 * layer.input_norm.numel() * layer.input_norm.element_size()
        for lin in layer.linears():
            for t in (lin.weight, lin.bias, lin.qweight, lin.zeros, lin.scales):
                if t is not None:
                    total += t.numel() * t.element_size()
    return total


def _prompt(n: int, seed: int, vocab: int) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run_requests(engine, prompts, new_tokens: int):
    """All prompts at once; -> (seconds to the step where every request has its first token, seconds to the end)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params)
    started, t0, t_first = set(), time.perf_counter(), None
    while engine.has_unfinished():
        for o in engine.step():
            if o.error:
                raise RuntimeError(o.error)
            if o.new_token_ids:
                started.add(o.request_id)
        if t_first is None and len(started) == len(prompts):
            t_first = time.perf_counter()
    return t_first - t0, time.perf_counter() - t0


def decode_speed(engine, batch: int, prompt_len: int, new: int, vocab: int, bw: float, wbytes: int) -> dict:
    prompts = [_prompt(prompt_len, s, vocab) for s in range(batch)]
    run_requests(engine, prompts, 8)                                   # warm-up
    t_first, t_end = run_requests(engine, prompts, new)
    tok_s = batch * (new - 1) / (t_end - t_first)
    kv = engine.runner.kv_bytes_per_token * batch * (prompt_len + new / 2)    # mean KV read per step
    limit = batch * bw / (wbytes + kv)
    res = {"batch": batch, "prompt": prompt_len, "new": new, "tok_s": tok_s, "step_ms": 1e3 * batch / tok_s,
           "limit_tok_s": limit, "frac_of_limit": tok_s / limit, "kv_bytes_per_step": kv}
    graphs = engine.runner.graphs
    if graphs is not None and graphs.enabled and batch in graphs.graphs:   # GPU time of the step alone
        res["graph_replay_ms"] = time_ms(graphs.graphs[batch].replay, iters=20)
    return res


def ttft(engine, prompt_len: int, vocab: int, params_count: int, cfg, tflops: float) -> dict:
    prompt = _prompt(prompt_len, 99, vocab)
    run_requests(engine, [prompt], 1)                                  # warm-up
    times = sorted(run_requests(engine, [prompt], 1)[0] for _ in range(3))
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * prompt_len ** 2 / 2
    flops = 2 * params_count * prompt_len + attn
    limit = flops / (tflops * 1e12)
    return {"prompt": prompt_len, "ttft_ms": 1e3 * times[1], "compute_limit_ms": 1e3 * limit,
            "x_of_limit": times[1] / limit}


@torch.inference_mode()
def hf_decode(model, prompt_len: int, new: int, vocab: int, static: bool) -> dict:
    ids = torch.tensor([_prompt(prompt_len, 0, vocab)], device="cuda")
    kw = dict(do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    gen(new)                                  # warm-up (static: compiles for this cache size)
    total = gen(new)
    first = gen(1)                            # static: the cache size differs, so time a second warm call
    if static:
        first = gen(1)
    return {"mode": "static" if static else "eager", "tok_s": (new - 1) / (total - first), "total_s": total}


@torch.inference_mode()
def profile_step(engine, prompt_len: int, vocab: int, batch: int = 1, top: int = 16) -> list:
    """GPU time per kernel of one eager decode step of `batch` sequences (no graph, no PDL), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    names = [f"p{i}" for i in range(batch)]
    for i, name in enumerate(names):
        engine.add_request(name, _prompt(prompt_len, 7 + i, vocab), params)
    while any(not engine.requests[n].output_ids for n in names):      # prefill, first tokens
        engine.step()
    seqs = [engine.requests[n] for n in names]
    for seq in seqs:
        engine.block_manager.allocate(seq, len(seq))
    ids, meta, _ = engine.runner.prepare([(seq, 1) for seq in seqs])
    with _cupy.pdl_mode("0"):   # with PDL a kernel queued behind a long one would count its wait as its own time
        for _ in range(2):
            engine.runner.model.forward(ids, meta, engine.runner.kv_cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.runner.model.forward(ids, meta, engine.runner.kv_cache)
            torch.cuda.synchronize()
    for name in names:
        engine.abort(name)
    while engine.has_unfinished():
        engine.step()
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    log.info("profile of one eager decode step, batch %d: %.3f ms of kernels", batch, sum(r[1] for r in rows))
    for name, ms, n in rows[:top]:
        log.info("%8.3f ms %5d x  %s", ms, n, name[:90])
    return [{"kernel": k[:120], "ms": ms, "count": n} for k, ms, n in rows[:top]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batch-new", type=int, default=None,
                    help="new tokens a sequence at --batch (default: --new; issue 4's batch-64 target: 512)")
    ap.add_argument("--ttft-prompt", type=int, default=2048)
    ap.add_argument("--hf", default="both", choices=["none", "eager", "static", "both"])
    ap.add_argument("--profile", action="store_true", help="also: GPU time per kernel of one eager decode step")
    ap.add_argument("--profile-batch", type=int, nargs="*", default=[1], help="batch sizes --profile measures")
    ap.add_argument("--profile-only", action="store_true", help="--profile, then exit (no speed runs)")
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args(argv)
    if args.batch_new is not None and args.batch_new < 1:
        ap.error(f"--batch-new must be >= 1, got {args.batch_new}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model == "demo":
        args.model = "llama2-7b"
    bw, tflops = copy_bandwidth(), matmul_tflops()
    log.info("copy bandwidth %.0f GB/s, fp16 matmul %.0f TFLOP/s", bw / 1e9, tflops)
    batch_new = args.batch_new or args.new
    mut = build(args, session_len=max(args.ttft_prompt, args.prompt + max(args.new, batch_new)) + 64,
                max_batch_size=args.batch)
    eng, cfg = mut.engine, mut.engine.model_cfg
    model = eng.runner.model
    wbytes = weight_bytes_per_step(model)
    params_count = sum(lin.out_features * (lin.qweight.shape[0] if lin.is_quantized else lin.weight.shape[1])
                       for layer in model.layers for lin in layer.linears()) + model.lm_head.numel()
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "engine": mut.describe(), "copy_bw_GBps": bw / 1e9, "matmul_tflops": tflops,
           "weight_bytes_per_step": wbytes, "kv_bytes_per_token": eng.runner.kv_bytes_per_token,
           "gpu_mem_allocated_GiB": torch.cuda.memory_allocated() / 2**30,
           "pdl": _cupy.pdl_enabled(torch.cuda.current_device())}
    if args.profile or args.profile_only:
        for b in args.profile_batch:
            res[f"profile_bs{b}"] = profile_step(eng, args.prompt, cfg.vocab_size, batch=b)
        res["profile_pdl"] = False                  # profile_step runs its step without PDL
    if args.profile_only:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(res, tag=default_tag(mut)), f, indent=1)
        return 0
    res["bs1"] = decode_speed(eng, 1, args.prompt, args.new, cfg.vocab_size, bw, wbytes)
    log.info("bs=1: %.1f tok/s = %.1f%% of the limit", res["bs1"]["tok_s"], 100 * res["bs1"]["frac_of_limit"])
    res[f"bs{args.batch}"] = decode_speed(eng, args.batch, args.prompt, batch_new, cfg.vocab_size, bw, wbytes)
    log.info("bs=%d: %.0f tok/s = %.1f%% of the limit", args.batch, res[f"bs{args.batch}"]["tok_s"],
             100 * res[f"bs{args.batch}"]["frac_of_limit"])
    res["ttft"] = ttft(eng, args.ttft_prompt, cfg.vocab_size, params_count, cfg, tflops)
    log.info("TTFT(%d) %.1f ms = %.2fx the compute limit", args.ttft_prompt, res["ttft"]["ttft_ms"],
             res["ttft"]["x_of_limit"])
    if args.hf != "none" and not cfg.quant:
        from scripts.bench_hf import shared_weight_model
        eng.runner.graphs = None                  # free graphs and KV before HF allocates its caches
        eng.runner.kv_cache = None
        torch.cuda.empty_cache()
        hf = shared_weight_model(eng)
        limit1 = res["bs1"]["limit_tok_s"]
        for static in {"eager": [False], "static": [True], "both": [False, True]}[args.hf]:
            r = hf_decode(hf, args.prompt, args.new, cfg.vocab_size, static)
            r["frac_of_limit"] = r["tok_s"] / limit1
            res[f"hf_{r['mode']}"] = r
            log.info("HF %s: %.1f tok/s = %.1f%% of the limit", r["mode"], r["tok_s"], 100 * r["frac_of_limit"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(res, tag=default_tag(mut)), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Host time of a decode step without the model: what the CPU spends per step besides the GPU work (issue 4).

  PYTHONPATH=. python3 scripts/bench_host_step.py [--batch 1 64] [--steps 200]
Runs the engine (scheduler, block manager, outputs) over a tiny random Llama on CPU with the model runner replaced
by a stub that returns a token per row at once, and times, per decode step: engine.step() without the runner;
ModelRunner.prepare() (the metadata of the eager / old graph path, CPU tensors, no copy); DecodeGraphs.load_decode
(the one-copy layout of decode_step_in_graph, host side only). Prompt 128 tokens, block size 64, session_len 2112
(the shape of scripts/bench_decode.py's defaults).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from backend.config import EngineConfig, SamplingParams
from backend.engine.cuda_graph import DecodeGraphs, batch_buckets
from backend.engine.engine import LLMEngine
from backend.engine.model_runner import ModelRunner

log = logging.getLogger("bench_host_step")


def _per_call_us(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def measure(model_dir: Path, batch: int, steps: int, session_len: int = 2112, block: int = 64) -> dict:
    eng = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", session_len=session_len,
                                 max_batch_size=max(batch, 1), cache_block_seq_len=block,
                                 cache_max_entry_count=batch * (-(-session_len // block)) + 1))
    for i in range(batch):
        eng.add_request(i, list(range(1, 129)), SamplingParams(max_tokens=10 * steps, temperature=0.0,
                                                               ignore_eos=True))
    eng.step()                                                           # prefill through the real model
    runner, last = eng.runner, []
    eng.runner = SimpleNamespace(run=lambda b: (last.append(b), [(5, None)] * len(b))[1])
    for _ in range(10):
        eng.step()
    step_us = _per_call_us(eng.step, steps)
    b = last[-1]
    prepare_us = _per_call_us(lambda: ModelRunner.prepare(runner, b), steps)
    g = DecodeGraphs.__new__(DecodeGraphs)                               # buffers and layout only, no capture
    g.runner = SimpleNamespace(config=EngineConfig(device="cpu", decode_step_in_graph=True), block_size=block,
                               device=torch.device("cpu"))
    g.session_len, g.max_bs, g.max_blocks = session_len, batch, -(-session_len // block)
    g.buckets, g.in_graph, g.enabled = batch_buckets(batch), True, True
    g._static_buffers()
    load_us = _per_call_us(lambda: g.load_decode(b), steps)
    return {"batch": batch, "engine_step_us": step_us, "prepare_us": prepare_us, "load_decode_us": load_us}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tests.tiny_models import make_hf
    with tempfile.TemporaryDirectory() as d:
        make_hf("llama", Path(d), max_position_embeddings=4096)
        res = [measure(Path(d), b, args.steps) for b in args.batch]
    for r in res:
        log.info("bs=%d: engine step without the runner %.0f us, prepare() %.0f us, load_decode %.0f us",
                 r["batch"], r["engine_step_us"], r["prepare_us"], r["load_decode_us"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

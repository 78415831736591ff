"""Tensor parallelism numbers: decode tok/s at tp=1 vs tp=2, the all-reduce cost of a step, the step hand-off.

  PYTHONPATH=. python3 scripts/bench_tp.py --out $OUT/tp.json            (GPU machine with >= 2 GPUs)
  .venv/bin/python -m scripts.bench_tp --ipc-only --out tp_ipc.json     (CPU: pipe vs gloo broadcast only)
Decode: random-weight models of real shapes (llama2-7b fp16; --awq-shape llama2-70b adds a W4A16 model), a
128-token prompt per sequence, bs=1 and bs=64, tok/s over the steps after every sequence has its first token.
All-reduce: 2 x num_layers NCCL all-reduces of [bs, hidden] fp16 (one decode step's worth), captured in a CUDA
graph and replayed, per rank pair. Hand-off: rank 0 -> worker per-step batch description for bs=64 decode,
over a multiprocessing pipe (what the engine uses) vs a gloo broadcast of a packed int64 tensor.
"""
from __future__ import annotations

import argparse
import gc
import dataclasses
import functools
import json
import logging
import os
import pickle
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backend.config import EngineConfig
from backend.engine.engine import LLMEngine
from backend.engine.tp import NO_MULTICAST_ENV, RankWeights, _free_port
from backend.model.config import ModelConfig
from backend.model.random_model import random_shard
from backend.model.weights import random_weights
from scripts.bench_common import AWQ_GROUP_SIZE, SHAPES
from scripts.bench_decode import _prompt, run_requests

log = logging.getLogger("bench_tp")

MODELS = SHAPES
TINY_AWQ = SHAPES["tiny-awq"]


def decode_tok_s(engine: LLMEngine, batch: int, prompt_len: int, new: int, vocab: int) -> Dict[str, float]:
    prompts = [_prompt(prompt_len, s, vocab) for s in range(batch)]
    run_requests(engine, prompts, 4)                                   # warm-up
    t_first, t_end = run_requests(engine, prompts, new)
    tok_s = batch * (new - 1) / (t_end - t_first)
    return {"batch": batch, "tok_s": tok_s, "step_ms": 1e3 * batch / tok_s}


def bench_model(name: str, cfg: ModelConfig, awq: bool, tps: List[int], batches: List[int], new: int,
                device: str = "cuda", graphs: bool = True, rows: Optional[List[dict]] = None,
                on_row: Callable[[], None] = lambda: None) -> List[dict]:
    """Decode rows appended to `rows` (a new list by default); on_row() after each, e.g. to save a partial run."""
    cfg = dataclasses.replace(cfg, quant={"method": "awq", "bits": 4, "group_size": AWQ_GROUP_SIZE} if awq else None)
    rows = [] if rows is None else rows
    for tp in tps:
        dtype = torch.float16 if device == "cuda" else torch.float32
        config = EngineConfig(device=device, dtype=str(dtype).split(".")[1], tp=tp, session_len=512,
                              max_batch_size=max(batches), cache_max_entry_count=0.5, use_cuda_graph=graphs)
        t0 = time.perf_counter()
        if awq:                       # each rank makes its own shard in the kernels' layout
            factory = RankWeights(functools.partial(random_shard, cfg, dtype, device, 0))
            weights = factory.make(0, 1) if tp == 1 else factory
        else:
            factory = functools.partial(random_weights, cfg, dtype, device, 0)
            weights = factory() if tp == 1 else factory
        engine = LLMEngine(config, model_cfg=cfg, weights=weights)
        del weights
        load_s = time.perf_counter() - t0
        try:
            for bs in batches:
                r = decode_tok_s(engine, bs, 128, new, cfg.vocab_size)
                rows.append({"model": name + ("-awq" if awq else ""), "tp": tp, "load_s": load_s, **r,
                             "cuda_graph": engine.runner.graphs is not None, "kv_blocks": engine.runner.num_blocks,
                             "decode_step_in_graph": config.decode_step_in_graph, "fuse_rope_kv": config.fuse_rope_kv,
                             "rank0_gpu_gb": torch.cuda.memory_allocated() / 1e9 if device == "cuda" else 0.0})
                log.info("%s", rows[-1])
                on_row()
        finally:
            engine.close()
            del engine
            gc.collect()              # the runner and its CUDA graphs reference each other
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _allreduce_rank(rank: int, tp: int, port: int, hidden: int, layers: int, batches: List[int], queue) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp,
                            timeout=timedelta(seconds=120))
    out = {}
    for bs in batches:
        x = torch.randn(bs, hidden, dtype=torch.float16, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(2 * layers):
                dist.all_reduce(x)
        ms = []
        for _ in range(20):
            dist.barrier()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        out[bs] = sorted(ms)[len(ms) // 2]
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def allreduce_per_step(tp: int, cfg: ModelConfig, batches: List[int]) -> List[dict]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, tp, port, cfg.hidden_size, cfg.num_layers, batches, queue),
                         daemon=True) for r in range(tp)]
    for p in procs:
        p.start()
    out = queue.get(timeout=120)
    for p in procs:
        p.join(30)
        if p.is_alive():             # stuck in NCCL teardown: the numbers are in, do not wait on it at exit
            log.warning("all-reduce rank pid %d did not exit; terminating it", p.pid)
            p.terminate()
    return [{"tp": tp, "batch": bs, "hidden": cfg.hidden_size, "allreduces": 2 * cfg.num_layers, "ms_per_step": ms}
            for bs, ms in out.items()]


def _decode_desc(batch: int, ctx_len: int, block: int = 64):
    """A bs-`batch` decode step's description, as TPRunner sends it: (token ids, start, block table) per sequence."""
    return [([1234], ctx_len - 1, list(range(i * 40, i * 40 + -(-ctx_len // block)))) for i in range(batch)]


def _ipc_worker(conn, port: int, n: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    for _ in range(n):                    # pipe: receive the pickled lists
        conn.recv()
        conn.send(0)
    for _ in range(n):                    # gloo: length, then the packed int64 payload
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0)
        buf = torch.empty(int(size), dtype=torch.int64)
        dist.broadcast(buf, 0)
        buf.tolist()
        conn.send(0)
    for _ in range(n):                    # the acknowledgement alone (subtracted from both)
        conn.recv()
        conn.send(0)
    dist.destroy_process_group()


def ipc_cost(batch: int = 64, ctx_len: int = 512, n: int = 300) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port = _free_port()
    p = ctx.Process(target=_ipc_worker, args=(child, port, n))
    p.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    desc = _decode_desc(batch, ctx_len)
    times = {}
    t = time.perf_counter()
    for _ in range(n):
        parent.send(("step", desc))
        parent.recv()
    times["pipe"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        flat = [len(desc)] + [x for ids, start, table in desc for x in (len(ids), start, len(table), *ids, *table)]
        buf = torch.tensor(flat, dtype=torch.int64)
        dist.broadcast(torch.tensor([buf.numel()]), 0)
        dist.broadcast(buf, 0)
        parent.recv()
    times["gloo_broadcast"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        parent.send(0)
        parent.recv()
    ack = time.perf_counter() - t
    p.join(30)
    dist.destroy_process_group()
    return {"batch": batch, "context": ctx_len, "bytes_pickled": len(pickle.dumps(("step", desc))),
            **{f"{k}_us": 1e6 * (v - ack) / n for k, v in times.items()}, "ack_round_trip_us": 1e6 * ack / n}


def markdown(doc: dict) -> str:
    lines = [f"Machine: {doc['device']}. Command: `{doc['command']}`.", ""]
    if doc.get("decode"):
        lines += ["| model | tp | batch | decode tok/s | step ms | CUDA graphs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['tp']} | {r['batch']} | {r['tok_s']:.0f} | {r['step_ms']:.2f} | "
                  f"{r['cuda_graph']} |" for r in doc["decode"]]
        lines.append("")
    if doc.get("allreduce"):
        lines += ["| tp | batch | hidden | all-reduces per step | all-reduce ms per step (CUDA graph) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['tp']} | {r['batch']} | {r['hidden']} | {r['allreduces']} | {r['ms_per_step']:.3f} |"
                  for r in doc["allreduce"]]
        lines.append("")
    if doc.get("ipc"):
        r = doc["ipc"]
        lines += [f"Step hand-off, bs={r['batch']} decode at context {r['context']} ({r['bytes_pickled']} bytes "
                  f"pickled): pipe {r['pipe_us']:.0f} us, gloo broadcast of a packed tensor "
                  f"{r['gloo_broadcast_us']:.0f} us per step (ack round trip {r['ack_round_trip_us']:.0f} us "
                  f"subtracted).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tp.json")
    ap.add_argument("--models", default="llama2-7b", help=f"comma list of {', '.join(MODELS)} (fp16)")
    ap.add_argument("--awq-shape", default="", help="also a W4A16 model of this shape, e.g. llama2-70b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--new", type=int, default=64, help="decode steps timed per batch")
    ap.add_argument("--ipc-only", action="store_true")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="CPU smoke run (gloo, no all-reduce timing): --models tiny")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    batches = [int(b) for b in args.batches.split(",")]
    doc = {"command": "scripts/bench_tp.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
           "device": torch.cuda.get_device_name() + f" x{torch.cuda.device_count()}" if torch.cuda.is_available()
           else "CPU", "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "decode": [], "allreduce": []}
    doc["ipc"] = ipc_cost()
    save(doc, args.out)
    if not args.ipc_only:
        device = "cpu" if args.cpu else "cuda"
        tps = [1, 2] if args.cpu or torch.cuda.device_count() >= 2 else [1]
        runs = [(name, False) for name in filter(None, args.models.split(","))]
        runs += [(args.awq_shape, True)] if args.awq_shape else []
        for name, awq in runs:          # saved after each part: a run cut short still reports what it measured
            if 2 in tps and device == "cuda":
                doc["allreduce"] += allreduce_per_step(2, MODELS[name], batches)
                save(doc, args.out)
            bench_model(name, MODELS[name], awq, tps, batches, args.new, device, not args.no_cuda_graph,
                        rows=doc["decode"], on_row=lambda: save(doc, args.out))
    log.info("\n%s", markdown(doc))
    return 0


def save(doc: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(doc) + "\n")

if __name__ == "__main__":
    raise SystemExit(main())

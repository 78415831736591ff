"""The GPU columns of the quantization report: engine memory at a fixed number of sessions and bs=1 decode tok/s,
per configuration, on a random-weight model of a real shape (the SmolLM2 weights do not travel to the GPU).

    PYTHONPATH=. python3 -m tools.quant_report --gpu-shape llama2-7b --out $OUT/quant_gpu.json     # on the GPU
    python -m tools.quant_report --merge-gpu quant_gpu.json --doc docs/quantization.md             # here

Rows: fp16 | KV int8 | KV int8 + rotation | KV int4 (rotated: kv_rotation auto) | KV int4 unrotated | W4A16 |
W4A16 + KV int8 | W4A16 + KV int4. Each row builds its engine with a KV cache of exactly SESSIONS x session_len
tokens (cache_max_entry_count = that many blocks), so the memory column compares like with like:
  engine_mib   torch's allocated bytes after the engine is built and has decoded (weights + KV cache + CUDA-graph
               buffers), minus what was allocated before;
  peak_mib     the peak allocated during build and decode, minus the same base;
  bs1 tok/s    one request, 128-token prompt, 128 new tokens, CUDA graphs on (scripts/bench_decode.decode_speed).
Speed depends on shapes, dtypes and kernels, not on weight values (random weights: scripts/bench_common.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import time
from pathlib import Path
from typing import List

import torch

log = logging.getLogger(__name__)

SESSIONS, SESSION_LEN, BLOCK = 8, 4096, 64
ROWS = [  # label, --quant, kv_cache_dtype, kv_rotation
    ("fp16", None, "auto", "auto"),
    ("KV int8", None, "int8", "auto"),
    ("KV int8 + rotation", None, "int8", "hadamard"),
    ("KV int4 (rotated)", None, "int4", "auto"),
    ("KV int4 unrotated", None, "int4", "off"),
    ("W4A16", "awq", "auto", "auto"),
    ("W4A16 + KV int8", "awq", "int8", "auto"),
    ("W4A16 + KV int4 (rotated)", "awq", "int4", "auto"),
]
MARK_BEGIN, MARK_END = "<!-- quant-gpu-table -->", "<!-- /quant-gpu-table -->"


def _build(shape: str, quant, kv: str, rotation: str):
    from dataclasses import replace

    from backend.config import EngineConfig
    from backend.engine.engine import LLMEngine
    from backend.model.weights import random_weights
    from scripts.bench_common import AWQ_GROUP_SIZE, SHAPES, random_awq_weights
    cfg = replace(SHAPES[shape], quant={"method": "awq", "bits": 4, "group_size": AWQ_GROUP_SIZE} if quant else None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"        # cpu: the smoke test of tests/test_quant_gpu.py
    config = EngineConfig(device=dev, dtype="float16" if dev == "cuda" else "float32", kv_cache_dtype=kv,
                          kv_rotation=rotation, session_len=SESSION_LEN, max_batch_size=SESSIONS,
                          cache_block_seq_len=BLOCK, cache_max_entry_count=SESSIONS * SESSION_LEN // BLOCK,
                          max_prefill_token_num=8192)
    make = random_awq_weights if quant else random_weights
    weights = make(cfg, torch.float16 if dev == "cuda" else torch.float32, dev, 0)
    engine = LLMEngine(config, model_cfg=cfg, weights=weights)
    del weights
    return engine


def measure_row(shape: str, label: str, quant, kv: str, rotation: str, bw: float, new: int) -> dict:
    from scripts.bench_decode import decode_speed, weight_bytes_per_step
    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.time()
    engine = _build(shape, quant, kv, rotation)
    model = engine.runner.model
    wbytes = weight_bytes_per_step(model)
    speed = decode_speed(engine, 1, 128, new, engine.model_cfg.vocab_size, bw, wbytes)
    mib = (lambda b: round((b - base) / 2**20)) if cuda else (lambda b: None)
    if cuda:
        torch.cuda.synchronize()
    row = {"label": label, "quant": quant or "none", "kv_cache_dtype": kv, "kv_rotation": rotation,
           "rotated": model.rot is not None, "kv_blocks": engine.runner.num_blocks,
           "fused_rope_kv": bool(model.fuse_rope_kv and model.rot is None and model.kv_qparams is None),
           "decode_step_in_graph": engine.config.decode_step_in_graph,
           "kv_bytes_per_token": engine.runner.kv_bytes_per_token, "weight_bytes": wbytes,
           "engine_mib": mib(torch.cuda.memory_allocated() if cuda else 0),
           "peak_mib": mib(torch.cuda.max_memory_allocated() if cuda else 0),
           "bs1_tok_s": round(speed["tok_s"], 1), "bs1_frac_of_limit": round(speed["frac_of_limit"], 3),
           "graph_replay_ms": speed.get("graph_replay_ms"), "seconds": round(time.time() - t0, 1)}
    log.info("%s: %s", label, row)
    del engine, model
    return row


def run_gpu(shape: str, out: str, new: int = 128, only: List[str] = ()) -> dict:
    from scripts.bench_attention import copy_bandwidth
    cuda = torch.cuda.is_available()
    bw = copy_bandwidth() if cuda else 1e10
    res = {"shape": shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "copy_bw_GBps": round(bw / 1e9),
           "sessions": SESSIONS, "session_len": SESSION_LEN, "block": BLOCK, "new_tokens": new, "rows": []}
    for label, quant, kv, rot in ROWS:
        if only and label not in only:
            continue
        try:
            res["rows"].append(measure_row(shape, label, quant, kv, rot, bw, new))
        except Exception as e:         # one failing row must not lose the others: recorded, reported
            log.exception("%s failed", label)
            res["rows"].append({"label": label, "error": f"{type(e).__name__}: {e}"})
        Path(out).write_text(json.dumps(res, indent=1))
    return res


def gpu_markdown(res: dict, command: str) -> str:
    lines = [f"GPU columns, {res['shape']} shape with random weights (fp16 activations, CUDA graphs): engine memory "
             f"with a KV cache of {res['sessions']} sessions x {res['session_len']} tokens; bs=1 decode of "
             f"{res['new_tokens']} tokens after a 128-token prompt. Command: `{command}`. Machine: "
             f"{res['device']}, torch {res['torch']}. Date: {res['date']}. Engine defaults otherwise (decode fast "
             f"paths on; rotated rows transform q / k / v inside the fused rotary + KV-write kernel; the peak of a "
             f"rotated row includes folding the rotation into fp16 weights at load).", "",
             "| configuration | KV bytes / token | weights read / step (MiB) | engine memory (MiB) | peak (MiB) | "
             "bs=1 decode tok/s | of the bandwidth limit |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['kv_bytes_per_token']} | {r['weight_bytes'] / 2**20:.0f} | "
                     f"{r['engine_mib']} | {r['peak_mib']} | {r['bs1_tok_s']:.1f} | "
                     f"{100 * r['bs1_frac_of_limit']:.0f}% |")
    return "\n".join(lines)


def merge_into_doc(json_path: str, doc: str, command: str) -> None:
    """Replace the text between MARK_BEGIN and MARK_END in doc with the table of json_path."""
    res = json.loads(Path(json_path).read_text())
    text = Path(doc).read_text()
    pat = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
    if not pat.search(text):
        raise ValueError(f"{doc} has no {MARK_BEGIN} ... {MARK_END} block to fill")
    block = f"{MARK_BEGIN}\n{gpu_markdown(res, command)}\n{MARK_END}"
    Path(doc).write_text(pat.sub(lambda _: block, text))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gpu-shape", default=None, help="measure the GPU columns on this random-weight shape "
                    "(scripts/bench_common.SHAPES, e.g. llama2-7b); writes --out")
    ap.add_argument("--out", default="quant_gpu.json", help="--gpu-shape: the JSON written")
    ap.add_argument("--gpu-new", type=int, default=128, help="--gpu-shape: new tokens of the bs=1 decode")
    ap.add_argument("--merge-gpu", default=None, help="a --gpu-shape JSON to render into --doc")
    ap.add_argument("--doc", default="docs/quantization.md")
    ap.add_argument("--gpu-command", default="PYTHONPATH=. python3 -m tools.quant_report --gpu-shape llama2-7b "
                    "--out $OUT/quant_gpu.json", help="--merge-gpu: the command quoted beside the table")

"""`lmtriton eval ppl`: perplexity on held-out wiki text, computed by the engine itself.

The held-out part of the text (tools/wiki_text.py, never used for calibration) is cut into fixed windows of
seqlen tokens (fixed seed). Each batch of windows is prefilled through the engine's ModelRunner over its paged
KV cache (blocks from its BlockManager), so K/V go through the cache write (quantized for --kv int8 / int4, with
static parameters for --kv-qparams) and attention reads them back from the cache, exactly as in serving. The
logits of every position come from the model's lm_head; ppl = exp(mean NLL of tokens 2..seqlen of each window).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.engine.sequence import Sequence
from backend.kernels.kv_cache import KVCache
from backend.llm import load_tokenizer, resolve_model_dirs

from .wiki_text import token_windows

log = logging.getLogger(__name__)


def checkpoint_weight_bytes(weights_dir) -> int:
    """Bytes of the weights as served on a GPU: integer tensors as stored, floating tensors at 2 bytes
    (fp16/bf16), a tied lm_head once."""
    from safetensors import safe_open
    total = 0
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                numel = math.prod(sl.get_shape())
                dt = sl.get_dtype()
                total += numel * (2 if dt in ("F32", "F16", "BF16", "F64") else {"I32": 4, "I64": 8}.get(dt, 1))
    return total


def _window_nll(engine: LLMEngine, windows: List[List[int]]) -> float:
    """Summed NLL of tokens 1.. of each window, all windows in one prefill batch through the paged cache."""
    runner, bm = engine.runner, engine.block_manager
    seqs = [Sequence(f"ppl-{i}", w, SamplingParams(max_tokens=1)) for i, w in enumerate(windows)]
    try:
        for s in seqs:
            bm.allocate(s, len(s))
        input_ids, meta, _ = runner.prepare([(s, len(s)) for s in seqs])
        hidden = runner.model.forward(input_ids, meta, runner.kv_cache)               # [T, H]
        total, start = 0.0, 0
        for w in windows:
            h = hidden[start:start + len(w) - 1]                                        # predicts tokens 1..
            logits = runner.model.logits(h)                                             # [S-1, V] float32
            target = torch.tensor(w[1:], device=logits.device)
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            start += len(w)
        return total
    finally:
        for s in seqs:
            bm.free(s)


@torch.inference_mode()
def eval_ppl(model, kv: str = "auto", windows: int = 32, seqlen: int = 512, seed: int = 0, text: str = "wiki",
             kv_qparams: Optional[str] = None, dtype: str = "float32", device: str = "cpu",
             batch: int = 4, progress: bool = False, kv_rotation: str = "auto") -> dict:
    weights_dir, tok_dir = resolve_model_dirs(model)
    wins = token_windows(load_tokenizer(tok_dir), text, "eval", windows, seqlen, seed)
    block = 64
    blocks = batch * -(-seqlen // block)
    extra = {"kv_qparams": kv_qparams} if kv_qparams else {}
    config = EngineConfig(model=str(weights_dir), dtype=dtype, device=device, kv_cache_dtype=kv,
                          session_len=max(seqlen + 1, 16), max_batch_size=batch, cache_block_seq_len=block,
                          cache_max_entry_count=blocks + 1, max_prefill_token_num=max(16, batch * seqlen),
                          kv_rotation=kv_rotation, **extra)
    t0 = time.time()
    engine = LLMEngine(config)
    t_load = time.time() - t0
    nll = 0.0
    for i in range(0, len(wins), batch):
        nll += _window_nll(engine, wins[i:i + batch])
        if progress:
            log.info("ppl: %d/%d windows", min(i + batch, len(wins)), len(wins))
    tokens = len(wins) * (seqlen - 1)
    mc = engine.model_cfg
    return {"model": str(model), "kv": kv, "kv_qparams": kv_qparams, "kv_rotation": kv_rotation,
            "rotated": engine.runner.model.rot is not None, "ppl": math.exp(nll / tokens),
            "nll": nll / tokens, "tokens": tokens, "windows": len(wins), "seqlen": seqlen, "seed": seed,
            "text": text, "dtype": str(engine.runner.dtype).replace("torch.", ""), "device": str(engine.runner.device),
            "kv_bytes_per_token": KVCache.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, kv,
                                                          torch.float16),   # as served (fp16 / quantized)
            "weight_bytes": checkpoint_weight_bytes(weights_dir),
            "load_seconds": round(t_load, 1), "eval_seconds": round(time.time() - t0 - t_load, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lmtriton eval", description="evaluate a model through the engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="perplexity on held-out wiki text")
    p.add_argument("--model", required=True, help="HF / AWQ directory, converted workspace, or 'demo'")
    p.add_argument("--kv", default="auto", choices=["auto", "int8", "int4"], help="KV cache dtype")
    p.add_argument("--kv-qparams", default=None, help="static KV parameters from `lmtriton lite kv_qparams`")
    p.add_argument("--kv-rotation", default="auto", choices=["auto", "hadamard", "off"],
                   help="Hadamard rotation of K/V heads (auto: on for int4 KV without --kv-qparams)")
    p.add_argument("--windows", type=int, default=32, help="number of held-out windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default="wiki", help="'wiki' or a text file (its held-out part is used)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=4, help="windows per engine step")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = eval_ppl(args.model, args.kv, args.windows, args.seqlen, args.seed, args.text, args.kv_qparams,
                   args.dtype, args.device, args.batch, progress=True, kv_rotation=args.kv_rotation)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    sys.stdout.write(f"ppl {res['ppl']:.4f} over {res['tokens']} tokens ({res['windows']} x {res['seqlen']}, "
                     f"seed {res['seed']}, kv {res['kv']}{', rotated' if res['rotated'] else ''}) "
                     f"in {res['eval_seconds']}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark shares: the model under test (a real directory or a random-weight model of a real shape),
the engine built around it, and the command-line options that choose them.

Random-weight models let the GPU benchmarks run the 7B/8B shapes without shipping weights: speed depends on the
shapes, the dtypes and the kernels, not on the values. Outputs of such a model are noise, so every benchmark
request sets ignore_eos and generates exactly the tokens it asked for.
"""
from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

from backend.config import EngineConfig
from backend.engine.engine import LLMEngine
from backend.model.config import ModelConfig
from backend.model.weights import random_weights

log = logging.getLogger(__name__)

_LLAMA = dict(arch="LlamaForCausalLM", rms_norm_eps=1e-5, torch_dtype="float16", bos_token_id=1)
# real shapes (from the models' config.json); weights are random
SHAPES: Dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                             eos_token_ids=[2], **_LLAMA),
    "llama3-8b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                             max_position_embeddings=8192, eos_token_ids=[128001], **_LLAMA),
    # tensor-parallel benchmarks (W4A16: 35 GB of int4, made per rank on its GPU: backend/model/random_model.py)
    "llama2-70b": ModelConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                              intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
                              eos_token_ids=[2], **_LLAMA),
    # CPU tests of the random-weight path: a few layers of a small Llama
    "tiny": ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=256, vocab_size=512, eos_token_ids=[2], **_LLAMA),
}
# W4A16 at tp=2 on CPU: every split a multiple of the group size 128
SHAPES["tiny-awq"] = replace(SHAPES["tiny"], hidden_size=256, head_dim=64, intermediate_size=512)
AWQ_GROUP_SIZE = 128


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default="demo",
                   help=f"'demo', a model directory (HF or workspace), or a random-weight shape: {', '.join(SHAPES)}")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--kv", default="auto", choices=["auto", "int8", "int4"], help="KV cache dtype")
    g.add_argument("--quant", default=None, choices=["awq"],
                   help="random-weight shapes only: int4 AWQ weights (W4A16), group size 128")
    g.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="KV cache: fraction of free GPU memory (<= 1) or a block count (> 1)")
    g.add_argument("--max-batch-size", type=int, default=None)
    g.add_argument("--no-cuda-graph", action="store_true")
    g.add_argument("--decode-step-in-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="decode inputs in one copy; lm_head + greedy argmax inside the CUDA graph (default on)")
    g.add_argument("--fuse-rope-kv", action=argparse.BooleanOptionalAction, default=True,
                   help="one kernel for rotary + KV write (+ quantization) (default on)")
    g.add_argument("--seed", type=int, default=0)


def random_awq_weights(cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """random_weights with every linear replaced by int4 AWQ tensors of the same shape (zero point 8).

    Random int32 words are valid packed nibbles; the scale keeps the dequantized std near the dense 0.02."""
    dense = random_weights(replace(cfg, num_layers=0), dtype, device, seed)   # embeddings and final norm only
    g = torch.Generator(device=device).manual_seed(seed + 1)
    gs, h, inter = AWQ_GROUP_SIZE, cfg.hidden_size, cfg.intermediate_size
    shapes = {"qkv": (h, cfg.q_size + 2 * cfg.kv_size), "o": (cfg.q_size, h),
              "gate_up": (h, 2 * inter), "down": (inter, h)}                  # (in, out) of each linear
    for name, (n_in, n_out) in shapes.items():
        if n_in % gs or n_out % 8:
            raise ValueError(f"{name}: in={n_in} must be a multiple of group size {gs}, out={n_out} of 8")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        dense[p + "input_norm.weight"] = torch.ones(h, dtype=dtype, device=device)
        dense[p + "post_attn_norm.weight"] = torch.ones(h, dtype=dtype, device=device)
        for name, (n_in, n_out) in shapes.items():
            dense[p + name + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (n_in, n_out // 8), generator=g,
                                                         device=device, dtype=torch.int32)
            dense[p + name + ".zeros"] = torch.full((n_in // gs, n_out), 8.0, dtype=torch.float16,
                                                    device=device)
            dense[p + name + ".scales"] = torch.full((n_in // gs, n_out), 0.02 / 4.6, dtype=dtype, device=device)
    return dense


@dataclass
class ModelUnderTest:
    """The engine plus what a report needs to say about it; tokenizer is None for random-weight shapes."""
    engine: LLMEngine
    name: str
    tokenizer: Optional[object]
    model_dir: Optional[str]

    def describe(self) -> dict:
        r = self.engine.runner
        c = self.engine.config
        return {"model": self.name, "weights": "random" if self.model_dir is None else self.model_dir,
                "quant": (self.engine.model_cfg.quant or {}).get("method", "none"), "dtype": str(r.dtype),
                "device": str(r.device), "kv_cache_dtype": c.kv_cache_dtype, "kv_blocks": r.num_blocks,
                "block_size": c.cache_block_seq_len, "max_batch_size": c.max_batch_size,
                "session_len": c.session_len, "cuda_graph": r.graphs is not None,
                "decode_step_in_graph": c.decode_step_in_graph, "fuse_rope_kv": c.fuse_rope_kv}

    def close(self) -> None:
        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build(args, session_len: int, max_batch_size: int, cpu_blocks: int = 0) -> ModelUnderTest:
    """The engine for args.model; cpu_blocks sizes the KV cache on CPU when --cache-max-entry-count is not given."""
    kw = dict(dtype=args.dtype, device=args.device, kv_cache_dtype=args.kv, session_len=session_len,
              max_batch_size=args.max_batch_size or max_batch_size, use_cuda_graph=not args.no_cuda_graph,
              seed=args.seed, max_prefill_token_num=max(8192, session_len),
              decode_step_in_graph=args.decode_step_in_graph, fuse_rope_kv=args.fuse_rope_kv)
    if args.cache_max_entry_count is not None:
        kw["cache_max_entry_count"] = args.cache_max_entry_count
    if args.model in SHAPES:
        cfg = replace(SHAPES[args.model], quant={"method": "awq", "bits": 4, "group_size": AWQ_GROUP_SIZE}
                      if args.quant == "awq" else None)
        config = EngineConfig(**kw)
        if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
            config.cpu_kv_blocks = cpu_blocks
        device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            args.dtype, torch.float16 if device == "cuda" else torch.float32)
        make = random_awq_weights if args.quant == "awq" else random_weights
        log.info("building random %s weights for %s on %s", args.quant or "dense", args.model, device)
        weights = make(cfg, dtype, device, args.seed)
        engine = LLMEngine(config, model_cfg=cfg, weights=weights)
        del weights
        return ModelUnderTest(engine, args.model + ("-awq" if args.quant else ""), None, None)
    if args.quant:
        raise ValueError("--quant applies to random-weight shapes; a model directory brings its own quantization")
    from backend.llm import load_tokenizer, resolve_model_dirs, stop_token_ids
    weights_dir, tok_dir = resolve_model_dirs(args.model)
    config = EngineConfig(model=str(weights_dir), cpu_kv_blocks=cpu_blocks, **kw)
    engine = LLMEngine(config)
    tokenizer = load_tokenizer(tok_dir)
    engine.runner.eos_ids = stop_token_ids(tokenizer, engine.runner.eos_ids)
    return ModelUnderTest(engine, args.model if args.model == "demo" else str(weights_dir.name), tokenizer,
                          str(weights_dir))


def default_tag(mut: ModelUnderTest) -> str:
    """File-name tag of a run: model, weight format, KV dtype, e.g. llama2-7b-awq_kvint8."""
    kv = mut.engine.config.kv_cache_dtype
    return mut.name.replace("/", "_") + ("" if kv == "auto" else f"_kv{kv}")


def step_and_record(engine, arrivals, outputs) -> Tuple[List[Tuple[int, float]], int]:
    """One engine step; each request id is (tag, index): appends each new token and its arrival time. Returns
    ([(index, time) of requests that finished], number of new tokens). A failed request aborts the benchmark."""
    step = engine.step()
    now = time.perf_counter()
    finished, num_new = [], 0
    for o in step:
        if o.error:
            raise RuntimeError(f"request {o.request_id} failed: {o.error}")
        i = o.request_id[1]
        arrivals[i].extend([now] * len(o.new_token_ids))
        outputs[i].extend(o.new_token_ids)
        num_new += len(o.new_token_ids)
        if o.finished:
            finished.append((i, now))
    return finished, num_new

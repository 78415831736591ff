"""A servable workspace for a random-weight model of a real shape, written on the machine that will serve it.

The serving benchmark needs tritonserver to load a model like any converted one, but 7B weights never travel:
this writes workspace/weights (engine layout, safetensors shards + lmtriton_model.json) from the same random
weights the in-process benchmarks use, a tokenizer copied from a given directory, and the model repository
through tools/convert.py's writer, so config.pbtxt is exactly what `lmtriton convert` would produce.

The vocabulary grows to the tokenizer's size when that is larger (text prompts then never hold ids the model
cannot embed); for Llama-2-7B with the demo tokenizer that is 49,152 rows instead of 32,000 (+0.26 GB fp16).

    python -m scripts.bench_random_workspace --shape llama2-7b --tokenizer DIR --workspace W [--quant awq] [--kv int8]
With --random-at-load no weights are written: the engine makes each rank's shard on its GPU when it loads
(backend/model/random_model.py; a 70B shape in seconds instead of 35 GB written and read back).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from . import bench_common

log = logging.getLogger(__name__)
SHARD_BYTES = 2 << 30


def write(shape: str, tokenizer_dir: str, workspace, quant=None, kv=None, dtype: str = "float16",
          params=None, name: str = "llm", seed: int = 0, at_load: bool = False) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from tools.convert import ENGINE_DEFAULTS, FRONTEND_DEFAULTS, TRITON_DEFAULTS, write_repository, write_tokenizer
    workspace = Path(workspace).resolve()
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = bench_common.SHAPES[shape]
    cfg = replace(cfg, vocab_size=max(cfg.vocab_size, vocab), eos_token_ids=[],
                  quant={"method": "awq", "bits": 4, "group_size": bench_common.AWQ_GROUP_SIZE} if quant else None)
    out = workspace / "weights"
    index = 0
    if at_load:                  # no weight files: each engine rank makes its shard on its GPU when it loads
        from backend.model.random_model import write_random
        write_random(out, replace(cfg, torch_dtype=dtype), seed)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        make = bench_common.random_awq_weights if quant else bench_common.random_weights
        weights = make(cfg, getattr(torch, dtype), device, seed)
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("*.safetensors")) + list(out.glob("random_weights.json")):
            old.unlink()
        shard, size = {}, 0
        for key in sorted(weights):
            t = weights.pop(key).cpu().contiguous()
            shard[key] = t
            size += t.numel() * t.element_size()
            if size >= SHARD_BYTES or not weights:
                save_file(shard, str(out / f"model-{index:05d}.safetensors"))
                shard, size, index = {}, 0, index + 1
        replace(cfg, torch_dtype=dtype).save(out)
    write_tokenizer(Path(tokenizer_dir), workspace / "tokenizer")
    engine = {**ENGINE_DEFAULTS, "kv_cache_dtype": kv or "auto", "dtype": dtype}
    frontend, triton = dict(FRONTEND_DEFAULTS), dict(TRITON_DEFAULTS)
    for k, v in (params or {}).items():
        target = next((d for d in (engine, frontend, triton) if k in d), None)
        if target is None:
            raise ValueError(f"--param {k}: unknown; known: {sorted({**engine, **frontend, **triton})}")
        target[k] = v.lower() in ("1", "true") if isinstance(target[k], bool) else type(target[k])(v)
    repo = write_repository(workspace, name, engine, frontend, triton)
    log.info("wrote %s: random %s%s weights %s", workspace, shape, " AWQ" if quant else "",
             "made at load time" if at_load else f"in {index} shards")
    return repo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_random_workspace", description=__doc__.split("\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(bench_common.SHAPES))
    p.add_argument("--tokenizer", required=True, help="directory with the tokenizer to serve with")
    p.add_argument("--workspace", required=True)
    p.add_argument("--quant", choices=["awq"], default=None)
    p.add_argument("--kv", choices=["int8", "int4"], default=None)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any config.pbtxt parameter")
    p.add_argument("--random-at-load", action="store_true",
                   help="write no weights: the engine makes them on its GPUs at load (backend/model/random_model.py)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = dict(kv.split("=", 1) for kv in args.param)
    write(args.shape, args.tokenizer, args.workspace, args.quant, args.kv, args.dtype, params,
          at_load=args.random_at_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())

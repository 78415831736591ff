"""`lmtriton convert` / `make convert`: HF checkpoint (or the bundled demo model) -> a servable workspace.

    workspace/weights/           safetensors in the engine's fused layout + lmtriton_model.json
    workspace/tokenizer/         the tokenizer (and chat template)
    workspace/model_repository/  <name>/ (stateless, decoupled) and <name>_session/ (sequence batching),
                                 filled from model_repository/ templates; engine parameters live in
                                 <name>/config.pbtxt and may be edited after conversion, like LMDeploy's config.ini
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from backend.config import EngineConfig
from backend.model.config import ModelConfig
from backend.model.tp import check_tp
from backend.model.weights import iter_hf_weights
from tools.fill_template import fill_file

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "model_repository"
SHARD_BYTES = 2 << 30
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# config.pbtxt parameters of the stateless model: engine (EngineConfig names) + frontend; defaults for serving
ENGINE_DEFAULTS = {
    "engine_python": "", "engine_start_timeout": 600, "dtype": "auto", "device": "auto", "session_len": 4096,
    "max_batch_size": 64, "cache_max_entry_count": 0.8, "cache_block_seq_len": 64, "max_prefill_token_num": 8192,
    "enable_prefix_caching": True, "kv_cache_dtype": "auto", "rope_scaling_factor": 0.0, "use_logn_attn": False,
    "tp": 1, "use_cuda_graph": True, "session_ttl": 3600.0, "cpu_kv_blocks": 0, "kv_qparams": "",
    "kv_rotation": "auto",
}
KV_QPARAMS_FILE = "kv_qparams.json"     # copied into the workspace; config.pbtxt names it relative to the model
FRONTEND_DEFAULTS = {"default_max_tokens": 256, "cancel_check_interval": 0.1}
TRITON_DEFAULTS = {"triton_max_batch_size": 256, "instance_count": 1, "max_candidate_sequences": 1024}


def _pbtxt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def write_weights(src: Path, dst: Path, cfg: ModelConfig, dtype: Optional[str]) -> None:
    """Stream the checkpoint through iter_hf_weights into ~2 GiB safetensors shards."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("*.safetensors"):
        old.unlink()
    shard: Dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            save_file(shard, str(dst / f"model-{index:05d}.safetensors"))
            shard, size, index = {}, 0, index + 1

    per_layer = 7   # qkv, o, gate_up, down, 2 norms (+ bias): a rough total for the bar
    for name, t in tqdm(iter_hf_weights(src, cfg), total=3 + per_layer * cfg.num_layers, unit="tensor",
                        desc="convert weights"):
        if dtype and t.is_floating_point() and not name.endswith(("scales", "zeros")):
            t = t.to(_DTYPES[dtype])
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    if dtype:
        cfg.torch_dtype = dtype
    cfg.save(dst)


def write_tokenizer(src: Path, dst: Path) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(src))
    dst.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(dst))
    gen = src / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, dst / gen.name)


def write_repository(workspace: Path, name: str, engine: dict, frontend: dict, triton: dict) -> Path:
    repo = workspace / "model_repository"
    model_dir = repo / name
    common = {**{k: _pbtxt(v) for k, v in frontend.items()}, "tokenizer_dir": "../../tokenizer",
              "triton_max_batch_size": triton["triton_max_batch_size"]}
    fill_file(TEMPLATES / "llm" / "config.pbtxt",
              {**common, **{k: _pbtxt(v) for k, v in engine.items()}, "name": name,
               "weights_dir": "../../weights", "instance_count": triton["instance_count"]},
              model_dir / "config.pbtxt")
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATES / "llm" / "1" / "model.py", model_dir / "1" / "model.py")
    ttl_us = int(float(engine["session_ttl"]) * 1e6)
    fill_file(TEMPLATES / "llm_session" / "config.pbtxt",
              {**common, "name": f"{name}_session", "engine_model": name, "max_sequence_idle_microseconds": ttl_us,
               "max_candidate_sequences": triton["max_candidate_sequences"]},
              repo / f"{name}_session" / "config.pbtxt")
    (repo / f"{name}_session" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATES / "llm_session" / "1" / "model.py", repo / f"{name}_session" / "1" / "model.py")
    return repo


def copy_kv_qparams(path: Path, workspace: Path, cfg: ModelConfig, kv_dtype: str, tp: int) -> str:
    """Validate static KV parameters against the model and copy them into the workspace -> the config.pbtxt value.
    Under tp > 1 the file keeps every head: each rank loads its heads' share (backend/engine/tp.py)."""
    from backend.kernels.kv_static import load_kv_qparams
    try:
        load_kv_qparams(path, cfg.num_layers, cfg.num_kv_heads // tp, kv_dtype, 0, tp)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"kv_qparams: {e}") from None
    shutil.copy(path, workspace / KV_QPARAMS_FILE)
    return f"../../{KV_QPARAMS_FILE}"


def quantize_awq(src: Path, workspace: Path) -> Path:
    try:
        from tools import awq
    except ImportError as e:
        raise SystemExit(f"QUANT=awq needs tools/awq.py (the AWQ quantizer), which is not available: {e}")
    out = workspace / "awq_hf"
    log.info("AWQ-quantizing %s into %s", src, out)
    return Path(awq.quantize(str(src), str(out)))


def convert(model: str, workspace, name: str = "llm", dtype: Optional[str] = None, kv: Optional[str] = None,
            quant: Optional[str] = None, tp: int = 1, params: Optional[dict] = None,
            kv_qparams: Optional[str] = None) -> Path:
    """Write weights/, tokenizer/ and model_repository/ under `workspace`; returns the repository path."""
    if str(model) == "demo":
        from tools.gguf import ensure_demo_model
        model = ensure_demo_model()
    src, workspace = Path(model), Path(workspace).resolve()
    if not src.is_dir():
        raise SystemExit(f"--model {src}: no such directory (give an HF checkpoint directory or 'demo')")
    if dtype and dtype not in _DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if quant not in (None, "", "awq"):
        raise SystemExit(f"--quant must be awq, got {quant!r}")
    engine = {**ENGINE_DEFAULTS, "tp": tp, "kv_cache_dtype": kv or "auto", "dtype": dtype or "auto"}
    frontend, triton = dict(FRONTEND_DEFAULTS), dict(TRITON_DEFAULTS)
    for k, v in (params or {}).items():
        target = next((d for d in (engine, frontend, triton) if k in d), None)
        if target is None:
            raise SystemExit(f"--param {k}: unknown; known: {sorted({**engine, **frontend, **triton})}")
        try:
            target[k] = (str(v).lower() in ("1", "true", "yes")) if isinstance(target[k], bool) else type(target[k])(v)
        except ValueError:
            raise SystemExit(f"--param {k}={v!r}: expected a {type(target[k]).__name__}") from None
    if kv_qparams:
        engine["kv_qparams"] = str(kv_qparams)
    kvq = Path(engine["kv_qparams"]) if engine["kv_qparams"] else None
    if kvq is not None and not kvq.is_file():
        raise SystemExit(f"kv_qparams {kvq}: no such file (write it with `lmtriton lite kv_qparams`)")
    try:
        EngineConfig.from_dict({k: v for k, v in engine.items()     # validate now, not when the server loads
                                if k not in ("engine_python", "engine_start_timeout")})
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if quant == "awq":      # after every argument is validated: quantizing takes minutes
        src = quantize_awq(src, workspace)
    cfg = ModelConfig.load(src)
    check_tp(cfg, tp)      # heads, and AWQ packing / group alignment of every rank's slice
    if kvq is not None:    # before the weights: a mismatched file fails in a second, not after the conversion
        workspace.mkdir(parents=True, exist_ok=True)
        engine["kv_qparams"] = copy_kv_qparams(kvq, workspace, cfg, engine["kv_cache_dtype"], tp)
    write_weights(src, workspace / "weights", cfg, dtype)
    write_tokenizer(src, workspace / "tokenizer")
    repo = write_repository(workspace, name, engine, frontend, triton)
    log.info("wrote %s (models %s, %s_session)", repo, name, name)
    return repo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lmtriton convert", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="HF checkpoint directory, or 'demo' (SmolLM2-135M-Instruct)")
    ap.add_argument("--name", default="llm", help="Triton model name (the session model is <name>_session)")
    ap.add_argument("--workspace", default="workspace")
    ap.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: keep the checkpoint's)")
    ap.add_argument("--kv", default=None, choices=["int8", "int4"], help="quantized KV cache")
    ap.add_argument("--quant", default=None, help="awq: 4-bit weights via tools/awq.py")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--kv-qparams", default=None, help="static KV parameters (`lmtriton lite kv_qparams`), copied "
                    "into the workspace; needs --kv int8 | int4")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="any config.pbtxt parameter, e.g. session_len=8192 instance_count=2")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = {}
    for p in args.param:
        if "=" not in p:
            raise SystemExit(f"--param expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        params[k] = v
    repo = convert(args.model, args.workspace, args.name, args.dtype, args.kv, args.quant, args.tp, params,
                   args.kv_qparams)
    print(f"model repository: {repo}\nserve it with: make serve WORKSPACE={Path(args.workspace)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

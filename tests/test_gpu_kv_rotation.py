"""GPU: the Hadamard KV rotation (backend/model/rotation.py) on the CUDA path, CUDA-graph decode included.

Model: a random Llama (GQA 16:4, head_dim 64, 8 layers) whose keys have outlier channels (four channel pairs
(j, j + 32) of every k head x 8, so RoPE keeps them), like real models' keys. Logits are teacher-forced over
a 96-token prompt and 32 decode steps (tests/test_kv_rotation.forced_logits), compared by mean KL:
- fp16 KV: rotation on vs off differ only by fp16 rounding (folded weights): KL < 1e-4, max |dlogit| < 0.1;
- int4 KV + rotation on the GPU vs the same on CPU float32 (the reference semantics): KL below half the int4
  error itself (fp16 inputs move a few codes across a rounding boundary, nothing more);
- int4 KV error vs fp16 KV: rotated < 0.75 x unrotated.
Set GPU_REPORT=<file.json> to keep the numbers.
"""
import json
import os

import pytest
import torch

from tests.test_kv_rotation import _engine, forced_logits, mean_kl

pytestmark = pytest.mark.gpu
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
PROMPT, NEW = 96, 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("llama_outlier_keys")
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, **SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("k_proj.weight"):
                for head in range(SHAPE["num_key_value_heads"]):
                    for j in (3, 10, 17, 25):
                        p[head * 64 + j].mul_(8.0)
                        p[head * 64 + j + 32].mul_(8.0)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, 32000, (PROMPT + NEW,), generator=g).tolist()


def _gpu(model_dir, kv, rotation):
    return _engine(model_dir, kv, rotation, device="cuda", dtype="float16", max_batch_size=4)


def test_gpu_rotation_matches_reference_and_cuts_int4_error(model_dir, ids):
    rep = {}
    fp = forced_logits(_gpu(model_dir, "auto", "off"), ids, PROMPT)
    eng = _gpu(model_dir, "auto", "hadamard")
    assert eng.runner.model.rot is not None and eng.runner.graphs is not None
    fp_rot = forced_logits(eng, ids, PROMPT)
    rep["fp16_kv_rot_vs_off_kl"] = mean_kl(fp, fp_rot)
    rep["fp16_kv_rot_vs_off_max_abs"] = (fp - fp_rot).abs().max().item()
    gpu_rot = forced_logits(_gpu(model_dir, "int4", "auto"), ids, PROMPT)
    gpu_off = forced_logits(_gpu(model_dir, "int4", "off"), ids, PROMPT)
    rep["int4_rot_kl_vs_fp16"] = mean_kl(fp, gpu_rot)
    rep["int4_off_kl_vs_fp16"] = mean_kl(fp, gpu_off)
    cpu_fp = forced_logits(_engine(model_dir, session_len=256, max_batch_size=1), ids, PROMPT)
    cpu_rot = forced_logits(_engine(model_dir, "int4", "auto", session_len=256, max_batch_size=1), ids, PROMPT)
    rep["cpu_int4_rot_kl_vs_cpu_fp32"] = mean_kl(cpu_fp, cpu_rot)
    rep["gpu_vs_cpu_int4_rot_kl"] = mean_kl(cpu_rot, gpu_rot)
    if os.environ.get("GPU_REPORT"):
        with open(os.environ["GPU_REPORT"], "w") as f:
            json.dump(rep, f, indent=1)
    assert rep["fp16_kv_rot_vs_off_kl"] < 1e-4 and rep["fp16_kv_rot_vs_off_max_abs"] < 0.1, rep
    assert rep["gpu_vs_cpu_int4_rot_kl"] < 0.5 * rep["cpu_int4_rot_kl_vs_cpu_fp32"], rep
    assert rep["int4_rot_kl_vs_fp16"] < 0.75 * rep["int4_off_kl_vs_fp16"], rep

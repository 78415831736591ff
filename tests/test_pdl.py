"""Programmatic dependent launch (backend/kernels/_cupy.py): every kernel waits for the previous grid before it
reads a result or writes anything, the launch attribute really lets a grid start early (eagerly and inside a CUDA
graph), and the engine's tokens are the same with PDL on and off.
"""
import glob
import os
import re

import numpy as np
import pytest
import torch

from backend.kernels import _cupy

KERNEL_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "backend", "kernels", "*.py")))


def _kernels(path):
    """(name, body up to the next kernel) of every kernel in a file's sources."""
    text = open(path).read()
    parts = re.split(r'extern "C" __global__', text)[1:]
    heads = [re.search(r"void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", p) for p in parts]
    return [(m.group(1), p[m.end() - 1:]) for m, p in zip(heads, parts)]


def test_every_kernel_starts_with_the_pdl_wait():
    """A kernel launched with the attribute but without griddepcontrol.wait could read the previous kernel's
    output before it is written: each one calls PDL_BEGIN, and before it only loads (no stores)."""
    found = 0
    for path in KERNEL_FILES:
        for name, body in _kernels(path):
            found += 1
            assert "PDL_BEGIN();" in body, f"{path}: kernel {name} never calls PDL_BEGIN()"
            signature, head = body[:body.index("{")], body[body.index("{"):body.index("PDL_BEGIN();")]
            outputs = [m.group(1) for m in re.finditer(r"(?<!const )\b\w+\s*\*\s*(?:__restrict__\s*)?(\w+)\s*[,)]",
                                                        signature)]
            stores = [r"atomic", r"st\.global", r"reinterpret_cast<[^>]*>\([^;]*\)\s*=[^=]"]
            stores += [rf"\b{o}\s*\[[^;]*\]\s*=[^=]|\*\s*{o}\s*=[^=]" for o in outputs]
            assert not any(re.search(r, head) for r in stores), f"{path}: {name} writes before PDL_BEGIN"
    assert found >= 13


def test_pdl_mode_is_validated(monkeypatch):
    monkeypatch.setattr(_cupy, "PDL_MODE", "yes")
    with pytest.raises(ValueError, match="LMTRITON_PDL must be one of auto, 0, 1, got 'yes'"):
        _cupy.pdl_enabled(0)
    monkeypatch.setattr(_cupy, "PDL_MODE", "0")
    assert _cupy.pdl_enabled(0) is False
    monkeypatch.setattr(_cupy, "PDL_MODE", "1")              # forced where the GPU or driver cannot: an error
    monkeypatch.setattr(_cupy, "_pdl_supported", lambda device: False)
    with pytest.raises(RuntimeError, match="LMTRITON_PDL=1 needs a compute capability 9.0"):
        _cupy.pdl_enabled(0)
    monkeypatch.setattr(_cupy, "PDL_MODE", "auto")           # auto falls back to cupy's own launch
    assert _cupy.pdl_enabled(0) is False


def test_pdl_mode_switches_for_a_block_and_restores(monkeypatch):
    """What bench_decode's profile uses: launches inside pdl_mode("0") go without PDL, the mode comes back after,
    also when the block fails; an unknown mode is refused."""
    monkeypatch.setattr(_cupy, "PDL_MODE", "1")
    monkeypatch.setattr(_cupy, "_pdl_supported", lambda device: True)
    with _cupy.pdl_mode("0"):
        assert _cupy.pdl_enabled(0) is False
    assert _cupy.PDL_MODE == "1" and _cupy.pdl_enabled(0) is True
    with pytest.raises(KeyError):
        with _cupy.pdl_mode("0"):
            raise KeyError("a failed step")
    assert _cupy.PDL_MODE == "1"
    with pytest.raises(ValueError, match="PDL mode must be one of auto, 0, 1, got 'off'"):
        with _cupy.pdl_mode("off"):
            pass


_PROBE = _cupy.PDL_MACROS + r"""
// the first grid lets the next one launch at once, then spends `ns` before it writes the flag
extern "C" __global__ void spin_then_write(int* flag, long long ns) {
    PDL_TRIGGER();
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < (unsigned long long)ns);
    *(volatile int*)flag = 1;
}
extern "C" __global__ void read_flag(const int* flag, int* out, int wait) {
    if (wait) PDL_WAIT();
    *out = *(volatile const int*)flag;
}
"""


def _probe(wait: bool, graph: bool) -> int:
    """What the second grid read: 0 = it ran while the first still spun (the launch overlapped)."""
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.full((1,), -1, dtype=torch.int32, device="cuda")
    spin = _cupy.get_kernel(_PROBE, "spin_then_write")
    read = _cupy.get_kernel(_PROBE, "read_flag")

    def run():
        _cupy.launch(spin, (1,), (32,), (flag, np.int64(2_000_000)))      # 2 ms
        _cupy.launch(read, (1,), (32,), (flag, out, np.int32(int(wait))))

    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        flag.zero_()
        g.replay()
    else:
        run()
    torch.cuda.synchronize()
    return int(out.item())


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_the_next_grid_starts_early_and_waits_where_told(monkeypatch, graph):
    if not _cupy._pdl_supported(torch.cuda.current_device()):
        pytest.skip("PDL needs compute capability 9.0+")
    monkeypatch.setattr(_cupy, "PDL_MODE", "1")
    assert _probe(wait=False, graph=graph) == 0, "the second grid did not overlap the first: PDL is not in effect"
    assert _probe(wait=True, graph=graph) == 1
    monkeypatch.setattr(_cupy, "PDL_MODE", "0")
    assert _probe(wait=False, graph=graph) == 1      # plain stream order
    monkeypatch.setattr(_cupy, "PDL_MODE", "auto")   # the default
    assert _probe(wait=False, graph=graph) == 0


SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A random GQA Llama in fp16 and its RTN W4A16 (group 128) workspace."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tools.awq import quantize_model
    d = tmp_path_factory.mktemp("pdl_llama")
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, **SHAPE)).eval().save_pretrained(d)
    q = tmp_path_factory.mktemp("pdl_llama_w4a16")
    quantize_model(str(d), str(q), group_size=128, method="rtn")
    return {"fp16": d, "w4a16": q}


def _generate(model_dir, kv):
    from backend.config import EngineConfig, SamplingParams
    from backend.engine.engine import LLMEngine
    eng = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype="float16", session_len=512,
                                 max_batch_size=4, cache_block_seq_len=16, cache_max_entry_count=128,
                                 kv_cache_dtype=kv))
    g = torch.Generator().manual_seed(0)
    # 4 + 9 + 15 prompt tokens: no step reaches the split-K GEMM, whose fp32 atomics would add in any order
    prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (4, 9, 15)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, logprobs=True)
    out = {i: ([], []) for i in range(3)}
    step = 0
    while step < 7 or eng.has_unfinished():
        if step % 3 == 0 and step // 3 < 3:                                  # staggered joins
            eng.add_request(step // 3, prompts[step // 3], params)
        for o in eng.step():
            assert o.error is None, o.error
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(o.new_logprobs)
        step += 1
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("weights,kv", [("fp16", "auto"), ("w4a16", "int8"), ("w4a16", "int4")])
def test_engine_tokens_equal_with_pdl_on_and_off(monkeypatch, model_dirs, weights, kv):
    """CUDA graphs, continuous batching, every decode kernel: bit-identical logprobs either way."""
    if not _cupy._pdl_supported(torch.cuda.current_device()):
        pytest.skip("PDL needs compute capability 9.0+")
    monkeypatch.setattr(_cupy, "PDL_MODE", "1")
    on = _generate(model_dirs[weights], kv)
    monkeypatch.setattr(_cupy, "PDL_MODE", "0")
    off = _generate(model_dirs[weights], kv)
    assert on == off
    assert all(len(t) == 48 for t, _ in on.values())

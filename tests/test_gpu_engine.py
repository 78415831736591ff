"""End to end on the GPU: greedy tokens of a random-weight Llama (GQA 16:4, hidden 1024, 8 layers, vocab 32000).

Random weights give flat logits: the top two often lie within fp16 noise of each other, so two correct fp16
programs may pick different tokens at such a near-tie and then continue differently. Every comparison therefore
finds the first divergence and asks a float32 judge (HF transformers in fp32 on the same GPU, over the common
prefix) for the logit gap between the two candidates there: a real bug shows up as a divergence at a clear gap.
TIE = 0.05 logits (the logits' std is ~0.7). Set GPU_REPORT=<file.json> to keep the numbers.
"""
import json
import os

import pytest
import torch

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.engine.sequence import Sequence

pytestmark = pytest.mark.gpu
TIE = 0.05
NEW = 64
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
REPORT = {}


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """HF's own initialization (std 0.02) with non-trivial norms. Not tests/tiny_models.make_hf: its q/k x12
    peaks attention so much that fp16 rounding alone (HF's too) changes tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("llama_gqa")
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, **SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def judge(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    if os.environ.get("GPU_REPORT"):
        with open(os.environ["GPU_REPORT"], "w") as f:
            json.dump(REPORT, f, indent=1)


def generate(model_dir, prompts, max_tokens=NEW, stagger=0, **cfg):
    """Greedy tokens of each prompt; with stagger > 0, request i joins after i * stagger steps."""
    base = dict(model=str(model_dir), device="cuda", dtype="float16", session_len=1024, max_batch_size=8,
                cache_block_seq_len=16, cache_max_entry_count=512)
    eng = LLMEngine(EngineConfig(**dict(base, **cfg)))
    out = {i: [] for i in range(len(prompts))}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    added, step = 0, 0
    while added < len(prompts) or eng.has_unfinished():
        while added < len(prompts) and step >= added * stagger:
            eng.add_request(added, prompts[added], params)
            added += 1
        for o in eng.step():
            assert o.error is None, o.error
            out[o.request_id].extend(o.new_token_ids)
        step += 1
    return [out[i] for i in range(len(prompts))]


def gap_at(judge, prefix, a, b) -> float:
    """|logit_a - logit_b| of the fp32 judge after `prefix`."""
    with torch.no_grad():
        logits = judge(torch.tensor([prefix], device="cuda")).logits[0, -1].float()
    return abs(logits[a] - logits[b]).item()


def check_same(judge, prompt, ours, theirs, what):
    """Equal, or the first divergence is a near-tie. Returns the divergence index (None if equal)."""
    assert len(ours) == len(theirs)
    j = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
    gap = None if j is None else gap_at(judge, prompt + ours[:j], ours[j], theirs[j])
    REPORT[what] = {"first_divergence": j, "gap_there": gap, "tokens": len(ours)}
    assert j is None or gap < TIE, f"{what}: tokens differ at {j} where the fp32 logit gap is {gap:.4f}"
    return j


def engine_logits(model_dir, token_ids, chunk, **cfg):
    """Logits of every prompt position through the paged cache, `chunk` tokens a step (1 = the decode kernel)."""
    eng = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype="float16", cache_block_seq_len=16,
                                 cache_max_entry_count=64, session_len=512, use_cuda_graph=False, **cfg))
    seq = Sequence("x", token_ids, SamplingParams(max_tokens=1))
    runner, out = eng.runner, []
    with torch.inference_mode():
        while seq.num_computed_tokens < len(seq):
            n = min(chunk, len(seq) - seq.num_computed_tokens)
            eng.block_manager.allocate(seq, seq.num_computed_tokens + n)
            ids, meta, _ = runner.prepare([(seq, n)])
            out.append(runner.model.logits(runner.model.forward(ids, meta, runner.kv_cache)))
            seq.num_computed_tokens += n
    return torch.cat(out)


@pytest.mark.parametrize("chunk,kv,max_err", [(200, "auto", 1e-2), (48, "auto", 1e-2), (1, "auto", 1e-2),
                                              (1, "int8", 5e-2), (48, "int4", 2e-1)])
def test_logits_close_to_fp32_hf(model_dir, judge, chunk, kv, max_err):
    """Prefill, chunked prefill over cached blocks and decode: relative L2 error of all logits."""
    prompt = _prompt(200, 3)
    ours = engine_logits(model_dir, prompt, chunk, kv_cache_dtype=kv)
    with torch.no_grad():
        ref = judge(torch.tensor([prompt], device="cuda")).logits[0].float()
    err = ((ours - ref).norm() / ref.norm()).item()
    REPORT[f"logits_rel_err_chunk{chunk}_{kv}"] = err
    assert err < max_err


def test_greedy_matches_hf_fp16(model_dir, judge):
    from transformers import AutoModelForCausalLM
    prompt = _prompt(40, 0)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW, do_sample=False,
                          min_new_tokens=NEW)[0, len(prompt):].tolist()
    del hf
    ours = generate(model_dir, [prompt])[0]
    check_same(judge, prompt, ours, ref, "ours_vs_hf_fp16")
    # every token we chose is the fp32 judge's argmax or within TIE of it (teacher forcing on our sequence)
    with torch.no_grad():
        logits = judge(torch.tensor([prompt + ours], device="cuda")).logits[0, len(prompt) - 1:-1].float()
    short = (logits.max(-1).values - logits[torch.arange(NEW), torch.tensor(ours)]).tolist()
    REPORT["ours_fp16_teacher_forced_max_shortfall"] = max(short)
    assert max(short) < TIE


def test_cuda_graphs_on_equals_off(model_dir):
    prompt = _prompt(100, 1)
    on = generate(model_dir, [prompt], use_cuda_graph=True)[0]
    off = generate(model_dir, [prompt], use_cuda_graph=False)[0]
    assert on == off


def test_continuous_batching_equals_single_runs(model_dir, judge):
    prompts = [_prompt(n, 10 + n) for n in (3, 17, 40, 90, 150)]
    batched = generate(model_dir, prompts, stagger=5)
    for i, p in enumerate(prompts):
        single = generate(model_dir, [p])[0]
        check_same(judge, p, batched[i], single, f"batched_vs_single_{i}")


# int4 keys are coarse for this model's peaked attention (q, k weights x12): its bar is low and the number is
# reported; the int4 kernels themselves are exact against dequantize-then-reference in test_kernels.py
@pytest.mark.parametrize("kv,min_agree", [("int8", 0.9), ("int4", 0.1)])
def test_quantized_kv_close_to_fp16(model_dir, judge, kv, min_agree):
    prompt = _prompt(60, 2)
    ours = generate(model_dir, [prompt], kv_cache_dtype=kv)[0]
    with torch.no_grad():
        logits = judge(torch.tensor([prompt + ours], device="cuda")).logits[0, len(prompt) - 1:-1].float()
    short = logits.max(-1).values - logits[torch.arange(NEW), torch.tensor(ours)]
    agree = (short < TIE).float().mean().item()
    REPORT[f"kv_{kv}_agreement_with_fp32_argmax"] = agree
    assert agree >= min_agree


# decode fast paths (issue 4): the graph's own lm_head + argmax and one input copy; rotary fused with the KV write
@pytest.mark.parametrize("switches,kv", [(dict(fuse_rope_kv=True), "auto"), (dict(fuse_rope_kv=True), "int8"),
                                         (dict(decode_step_in_graph=True), "auto"),
                                         (dict(decode_step_in_graph=True, fuse_rope_kv=True), "int8")])
def test_decode_fast_paths_equal_off(model_dir, judge, switches, kv):
    prompts = [_prompt(n, 30 + n) for n in (5, 70, 130)]          # staggered: batches of 1..3 in graphs of 1, 2, 4
    off = generate(model_dir, prompts, stagger=5, kv_cache_dtype=kv)
    on = generate(model_dir, prompts, stagger=5, kv_cache_dtype=kv, **switches)
    for i, p in enumerate(prompts):
        check_same(judge, p, on[i], off[i], f"fast_paths_{'+'.join(switches)}_{kv}_{i}")


def test_decode_step_in_graph_samples_like_eager(model_dir):
    """Non-greedy rows sample from the graph's logits: seeded draws, logprobs, penalties as before."""
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.0, logprobs=True, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.7, top_k=20, repetition_penalty=1.3, seed=11,
                             min_tokens=4, ignore_eos=True)]
    prompts = [_prompt(n, 50 + n) for n in (9, 33, 64, 100)]

    def run(**cfg):
        eng = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype="float16", session_len=1024,
                                     max_batch_size=8, cache_block_seq_len=16, cache_max_entry_count=512, **cfg))
        for i, (p, sp) in enumerate(zip(prompts, params)):
            eng.add_request(i, p, sp)
        toks, lps = {i: [] for i in range(4)}, {i: [] for i in range(4)}
        while eng.has_unfinished():
            for o in eng.step():
                assert o.error is None, o.error
                toks[o.request_id] += o.new_token_ids
                lps[o.request_id] += o.new_logprobs
        assert eng.block_manager.num_used_blocks == 0
        return toks, lps

    off, on = run(), run(decode_step_in_graph=True)
    assert on[0] == off[0]                              # 4 rows = a graph bucket: the same lm_head shapes
    torch.testing.assert_close(torch.tensor(on[1][2]), torch.tensor(off[1][2]), atol=1e-3, rtol=0)

"""Tensor parallelism: tp=2 over gloo on CPU equals tp=1 (tokens and logits), AWQ split math, errors, shutdown.

The 2-GPU test (NCCL, CUDA graphs, a random Llama-3-8B-shape model) is marked gpu and needs two GPUs.
"""
import dataclasses
import functools
import gc
import multiprocessing
import os
import signal
import time

import pytest
import torch
from safetensors.torch import save_file

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine
from backend.kernels.w4a16 import pack_awq, quantize_rtn
from backend.model.config import ModelConfig
from backend.model.tp import check_tp, shard_config, shard_weights
from backend.model.weights import load_weights
from tests.tiny_models import make_hf

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
AWQ_GROUP = 32


def _generate(engine: LLMEngine, max_tokens: int = 10):
    """Greedy tokens per prompt, and every logits row rank 0 computed (recorded around the real model)."""
    logits, model = [], engine.runner.model
    compute = model.logits
    model.logits = lambda h: logits.append(compute(h)) or logits[-1]
    try:
        for i, p in enumerate(PROMPTS):
            engine.add_request(i, p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        out = {i: [] for i in range(len(PROMPTS))}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
    finally:
        model.logits = compute
    return out, torch.cat(logits)


def _engine(model_dir, tp: int, kv: str = "auto") -> LLMEngine:
    # block size 8: prompts span several blocks, so block tables travel to the workers
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", tp=tp, session_len=128,
                                  max_batch_size=4, cache_max_entry_count=32, cache_block_seq_len=8,
                                  kv_cache_dtype=kv))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    # biases on q/k/v (column-parallel: sliced) and on o/down (row-parallel: added once, by rank 0)
    d = tmp_path_factory.mktemp("tp_dense")
    make_hf("llama", d, attention_bias=True, mlp_bias=True)
    return d


def _write_awq(d, src, zeros_format: str):
    """The engine layout of a W4A16 model (RTN int4, group 32) whose AWQ splits are aligned at tp=2; zeros_format
    "qzeros": integer zeros packed as AutoAWQ and workspaces written before fp16 zeros store them."""
    cfg = ModelConfig.load(src)
    w = load_weights(src, cfg)
    for name in [n for n in w if n.endswith(("qkv.weight", "o.weight", "gate_up.weight", "down.weight"))]:
        qweight, zeros, scales = quantize_rtn(w.pop(name), AWQ_GROUP)
        base = name[:-len("weight")]
        w.update({base + "qweight": qweight, base + "scales": scales})
        if zeros_format == "qzeros":
            w[base + "qzeros"] = pack_awq(zeros.round().to(torch.int32))
        else:
            w[base + "zeros"] = zeros
    save_file({k: v.contiguous() for k, v in w.items()}, str(d / "model.safetensors"))
    dataclasses.replace(cfg, quant={"method": "awq", "bits": 4, "group_size": AWQ_GROUP}).save(d)
    return d


@pytest.fixture(scope="module", params=["zeros", "qzeros"])
def awq_dir(request, tmp_path_factory, dense_dir):
    src = tmp_path_factory.mktemp("tp_awq_src")
    make_hf("llama", src, seed=1, intermediate_size=256)
    return _write_awq(tmp_path_factory.mktemp(f"tp_awq_{request.param}"), src, request.param)


def _no_workers_left() -> bool:
    return not any(p.name.startswith("lmtriton-tp") for p in multiprocessing.active_children())


def test_tp2_equals_tp1_tokens_and_logits_and_close_stops_workers(dense_dir):
    ref_tokens, ref_logits = _generate(_engine(dense_dir, 1))
    engine = _engine(dense_dir, 2)
    (worker,) = engine.runner.procs
    try:
        tokens, logits = _generate(engine)
    finally:
        engine.close()
    assert tokens == ref_tokens
    assert logits.shape == ref_logits.shape and logits.shape[1] == 320
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert worker.exitcode == 0 and _no_workers_left()


def test_awq_with_int8_kv_tp2_equals_tp1(awq_dir):
    """W4A16 slices and a quantized KV cache (per-head scales: each rank quantizes its own heads, same codes); fp16
    zeros split like the scales, packed qzeros of older workspaces like qweight."""
    ref_tokens, ref_logits = _generate(_engine(awq_dir, 1, "int8"), max_tokens=6)
    engine = _engine(awq_dir, 2, "int8")
    try:
        assert engine.runner.model.layers[0].qkv.qweight.shape == (64, (32 + 16 + 16) // 8)   # [in, out/8]
        assert engine.runner.model.layers[0].down.scales.shape == (128 // AWQ_GROUP, 64)      # [in/g, out]
        assert engine.runner.model.layers[0].down.zeros.shape == (128 // AWQ_GROUP, 64)       # [in/g, out]
        assert engine.runner.model.layers[0].down.zeros.dtype == torch.float16
        tokens, logits = _generate(engine, max_tokens=6)
    finally:
        engine.close()
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_shards_sum_to_the_full_projection(dense_dir):
    """Row-parallel o: the ranks' partial products (+ bias once) add up to the unsplit layer's output."""
    cfg = ModelConfig.load(dense_dir)
    full = load_weights(dense_dir, cfg)
    shards = [shard_weights(full, cfg, r, 2) for r in range(2)]
    x = torch.randn(3, cfg.q_size)
    want = torch.nn.functional.linear(x, full["layers.0.o.weight"], full["layers.0.o.bias"])
    xs = x.view(3, 2, -1)                                   # [T, tp, Hq/tp * D]: rank r owns the r-th run of q heads
    got = sum(torch.nn.functional.linear(xs[:, r].reshape(3, -1), s["layers.0.o.weight"], s.get("layers.0.o.bias"))
              for r, s in enumerate(shards))
    torch.testing.assert_close(got, want)
    assert "layers.0.o.bias" not in shards[1] and torch.equal(shards[1]["embed.weight"], full["embed.weight"])


def test_tp_must_divide_heads(dense_dir):
    with pytest.raises(ValueError, match=r"tp=3 must divide num_heads=4 and num_kv_heads=2"):
        _engine(dense_dir, 3)
    with pytest.raises(ValueError, match=r"tp=4 must divide num_heads=4 and num_kv_heads=2"):
        shard_config(ModelConfig.load(dense_dir), 0, 4)
    assert _no_workers_left()


def test_awq_split_must_align(dense_dir):
    cfg = dataclasses.replace(ModelConfig.load(dense_dir), quant={"method": "awq", "bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match=r"AWQ row split: down_proj in \(intermediate_size\)=160 / tp=2 = 80 is "
                                         r"not a multiple of group_size=32"):
        check_tp(cfg, 2)
    aligned = dataclasses.replace(cfg, intermediate_size=256)
    check_tp(aligned, 2)
    with pytest.raises(ValueError, match=r"AWQ column split: kv heads x head_dim=16 / tp=4 = 4 is not a multiple of 8"):
        check_tp(dataclasses.replace(aligned, num_heads=8, num_kv_heads=4, head_dim=4), 4)


def test_tp_needs_a_weight_source_workers_can_reach(dense_dir):
    cfg = ModelConfig.load(dense_dir)
    with pytest.raises(ValueError, match="not a dict"):
        LLMEngine(EngineConfig(device="cpu", tp=2), model_cfg=cfg, weights=load_weights(dense_dir, cfg))


def test_worker_crash_is_a_clear_error_and_close_leaves_no_process(dense_dir):
    engine = _engine(dense_dir, 2)
    (worker,) = engine.runner.procs
    try:
        os.kill(worker.pid, signal.SIGKILL)
        engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0.0))
        with pytest.raises(RuntimeError, match=r"tp worker .*exited with code -9"):
            for _ in range(3):
                engine.step()
    finally:
        engine.close()
    engine.close()                    # twice is fine
    assert worker.exitcode == -9 and _no_workers_left()


def _weights_broken_on_workers(cfg):
    """A weights factory whose read fails on every rank but 0 (called inside each rank)."""
    import torch.distributed as dist
    if dist.get_rank() > 0:
        raise OSError("shard file unreadable (test)")
    from backend.model.weights import random_weights
    return random_weights(cfg, torch.float32, "cpu")


def test_worker_error_at_load_is_raised_on_rank0(dense_dir):
    cfg = ModelConfig.load(dense_dir)
    with pytest.raises(RuntimeError, match=r"(?s)tp worker rank 1 failed during loading its shard:.*OSError: shard "
                                           r"file unreadable \(test\)"):
        LLMEngine(EngineConfig(device="cpu", tp=2, cache_max_entry_count=16), model_cfg=cfg,
                  weights=functools.partial(_weights_broken_on_workers, cfg))
    assert _no_workers_left()
    assert not torch.distributed.is_initialized()     # released: the next tp engine can start


@pytest.mark.gpu
@pytest.mark.parametrize("in_graph", [False, True], ids=["lm_head-eager", "lm_head-in-graph"])
def test_gpu_tp2_equals_tp1_llama3_8b_shape(in_graph):
    """NCCL, CUDA graphs with the all-reduces inside. Eager lm_head: every logits row is recorded, so a divergence
    is judged by its margin. lm_head in the graph (the default decode step): decode logits stay in the graph, so a
    decode divergence is judged on the logits of a tp=1 eager-lm_head run that made the same tokens up to it."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from backend.model.weights import random_weights
    from scripts.bench_common import SHAPES
    cfg = dataclasses.replace(SHAPES["llama3-8b"], num_layers=int(os.environ.get("TP_TEST_LAYERS", "8")))
    factory = functools.partial(random_weights, cfg, torch.float16, "cuda", 0)
    kw = dict(device="cuda", dtype="float16", session_len=256, max_batch_size=8, cache_max_entry_count=64,
              cache_block_seq_len=64, decode_step_in_graph=in_graph)
    mode = "lm_head in graph" if in_graph else "eager lm_head"
    outs, logits = {}, {}
    for tp in (1, 2):                 # progress lines: a run cut short by its time limit shows where it stopped
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(tp=tp, **kw), model_cfg=cfg, weights=factory() if tp == 1 else factory)
        print(f"{mode}, tp={tp}: engine built in {time.perf_counter() - t0:.1f} s", flush=True)
        outs[tp], logits[tp] = _generate(engine, max_tokens=16)
        t0 = time.perf_counter()
        engine.close()
        print(f"{mode}, tp={tp}: generated; closed in {time.perf_counter() - t0:.1f} s", flush=True)
        del engine
        gc.collect()                  # the runner and its CUDA graphs reference each other
        torch.cuda.empty_cache()
    assert logits[1].shape == logits[2].shape
    if outs[2] != outs[1]:            # fp16 sums in another order may flip a near-tie: then it must be one
        i, j = next((i, j) for i in outs[1] for j, (a, b) in enumerate(zip(outs[1][i], outs[2][i])) if a != b)
        ref_outs, ref_logits = outs[1], logits[1]
        if in_graph and j > 0:            # the graph kept its decode logits: recompute tp=1's with lm_head eager
            engine = LLMEngine(EngineConfig(tp=1, **dict(kw, decode_step_in_graph=False)), model_cfg=cfg,
                               weights=factory())
            ref_outs, ref_logits = _generate(engine, max_tokens=16)
            engine.close()
            assert ref_outs[i][:j + 1] == outs[1][i][:j + 1], "tp=1 eager lm_head made other tokens than in-graph"
        row = _logits_row(ref_logits, ref_outs, i, j)
        margin = float(row[outs[1][i][j]] - row[outs[2][i][j]])
        print(f"{mode}: first divergence: prompt {i} token {j}, tp=1 margin {margin:.4f}")
        assert margin < 0.02, f"tp=2 diverges from tp=1 at prompt {i} token {j} by a margin of {margin}"
    else:
        diff = (logits[2] - logits[1]).abs().max().item()
        print(f"{mode}: tp=2 == tp=1 greedy tokens ({sum(map(len, outs[1].values()))}); max |logit diff| "
              f"{diff:.4f} over {logits[1].shape[0]} rows")
        assert diff < 0.05
    with pytest.raises(ValueError, match=r"tp=\d+ exceeds the \d+ visible GPU"):
        LLMEngine(EngineConfig(tp=torch.cuda.device_count() * 2, **kw), model_cfg=cfg, weights=factory)


def _logits_row(logits, outs, i, j):
    """The logits row of prompt i's j-th token: prefill rows come in prompt order, then one row per prompt a step."""
    n = len(outs)
    return logits[i] if j == 0 else logits[n + (j - 1) * n + i]


@pytest.mark.slow
@pytest.mark.server
def test_served_tp3_through_tritonserver_equals_in_process_tp1(demo_llm, tmp_path):
    """`lmtriton convert --tp 3` (SmolLM2: 9 heads, 3 KV heads) served by the real tritonserver: the engine
    process starts two gloo workers; greedy text equals the in-process tp=1 engine."""
    from scripts.launch_triton_server import TritonServer
    from tests.serving_util import PARAMS, http_generate_stream
    from tools.convert import convert
    prompt = "The capital of France is"
    want = demo_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].text
    repo = convert("demo", tmp_path / "ws", "llm", tp=3, params=dict(PARAMS, instance_count="1"))
    assert 'key: "tp" value: { string_value: "3" }' in (repo / "llm" / "config.pbtxt").read_text()
    with TritonServer(repo, 0, 0, 0, log_file=tmp_path / "tritonserver.log") as server:
        res = http_generate_stream(server.http_url, text_input=prompt, max_tokens=12, temperature=0.0)
    assert res.error is None and res.text == want

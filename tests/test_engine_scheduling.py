"""Scheduling on a tiny random Llama: chunked prefill, preemption, prefix caching, sessions, aborts, bad input."""
import pytest

from backend.config import EngineConfig, SamplingParams
from backend.engine.engine import LLMEngine, SessionError
from tests.tiny_models import make_hf

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_hf("llama", d, max_position_embeddings=512)
    return d


def make_engine(model_dir, **kw):
    cfg = dict(model=str(model_dir), device="cpu", dtype="float32", cache_block_seq_len=4,
               cache_max_entry_count=128, session_len=256, max_batch_size=8)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def run(engine, prompts, params=GREEDY, **add_kw):
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params, **add_kw)
    outs = {i: [] for i in range(len(prompts))}
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                finals[o.request_id] = o
    return [outs[i] for i in range(len(prompts))], finals


PROMPTS = [[(7 * i + j) % 300 + 1 for j in range(n)] for i, n in enumerate([3, 9, 17, 30, 5, 41, 12, 22])]


def test_chunked_prefill_gives_the_same_tokens(model_dir):
    base, _ = run(make_engine(model_dir), PROMPTS)
    chunked, _ = run(make_engine(model_dir, max_prefill_token_num=16), PROMPTS)
    assert chunked == base


def test_preemption_by_recompute_gives_the_same_tokens(model_dir):
    base, _ = run(make_engine(model_dir), PROMPTS)
    eng = make_engine(model_dir, cache_max_entry_count=20)      # 20 blocks x 4 tokens: cannot hold all 8
    small, _ = run(eng, PROMPTS)
    assert eng.scheduler.num_preemptions > 0
    assert small == base
    assert eng.block_manager.num_used_blocks == 0


def test_prefix_cache_skips_shared_prompt_tokens(model_dir):
    shared = [(5 * j) % 300 + 1 for j in range(40)]
    a, b = shared + [11, 12, 13], shared + [21, 22]
    eng = make_engine(model_dir, enable_prefix_caching=True)
    (out_a,), fa = run(eng, [a])
    eng2 = make_engine(model_dir)
    (ref_b,), _ = run(eng2, [b])
    eng.requests.clear()
    eng.add_request("b", b, GREEDY)
    out_b, fb = [], None
    while eng.has_unfinished():
        for o in eng.step():
            out_b += o.new_token_ids
            fb = o if o.finished else fb
    assert out_b == ref_b
    assert fb.cached_tokens == 40 and fb.prefilled_tokens == len(b) - 40
    assert fa[0].cached_tokens == 0 and fa[0].prefilled_tokens == len(a)
    assert eng.block_manager.num_prefix_hits == 10


def test_abort_frees_blocks_within_a_step(model_dir):
    eng = make_engine(model_dir)
    eng.add_request("x", PROMPTS[5], SamplingParams(max_tokens=100, ignore_eos=True))
    eng.step()
    assert eng.block_manager.num_used_blocks > 0
    assert eng.abort("x")
    assert eng.block_manager.num_used_blocks == 0
    outs = eng.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("x", True, "abort")]
    assert not eng.abort("x")


def test_request_that_can_never_fit_is_refused(model_dir):
    eng = make_engine(model_dir, cache_max_entry_count=4)        # 16 tokens of KV in all
    with pytest.raises(ValueError, match="needs up to 8 KV blocks .* the whole cache has 4"):
        eng.add_request("big", list(range(1, 21)), SamplingParams(max_tokens=10))


@pytest.mark.parametrize("prompt, match", [([], "prompt is empty"),
                                           (list(range(1, 257)), "256 tokens, which does not leave room"),
                                           ([5, 999999], r"token ids must be in \[0, 320\)")])
def test_bad_prompts_are_named(model_dir, prompt, match):
    with pytest.raises(ValueError, match=match):
        make_engine(model_dir).add_request("r", prompt, GREEDY)


def test_session_turns_reuse_kv_and_match_full_history(model_dir):
    turn1, turn2, turn3 = PROMPTS[1], PROMPTS[2], PROMPTS[4]
    eng = make_engine(model_dir)
    (o1,), f1 = run(eng, [turn1], session_id=7, session_start=True)
    assert eng.block_manager.num_used_blocks > 0                    # KV kept between turns
    eng.add_request("t2", turn2, GREEDY, session_id=7)
    o2, f2 = [], None
    while eng.has_unfinished():
        for o in eng.step():
            o2 += o.new_token_ids
            f2 = o if o.finished else f2
    history = turn1 + o1 + turn2
    (ref2,), _ = run(make_engine(model_dir), [history])
    assert o2 == ref2
    assert f2.prompt_tokens == len(history)
    assert f2.cached_tokens == len(turn1) + len(o1) - 1        # only the last answer token had no KV yet
    assert f2.prefilled_tokens == len(turn2) + 1
    eng.add_request("t3", turn3, GREEDY, session_id=7, session_end=True)
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_used_blocks == 0                 # END released it
    with pytest.raises(SessionError, match=r"session 7 expired \(ended with END\)"):
        eng.add_request("t4", turn3, GREEDY, session_id=7)


def test_unknown_session_continuation_is_an_error(model_dir):
    with pytest.raises(SessionError, match="session 99 is unknown: start it again with the START flag"):
        make_engine(model_dir).add_request("r", [1, 2], GREEDY, session_id=99)


def test_idle_sessions_are_released_under_memory_pressure(model_dir):
    eng = make_engine(model_dir, cache_max_entry_count=24)
    for sid in range(3):
        run(eng, [PROMPTS[2]], params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
            session_id=sid, session_start=True)
        eng.requests.clear()
    assert len(eng.scheduler.idle) == 3
    outs, _ = run(eng, [PROMPTS[5]], params=SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    assert len(outs[0]) == 30
    assert 0 in eng.expired and "memory pressure" in eng.expired[0]     # least recently used went first
    with pytest.raises(SessionError, match="expired"):
        eng.add_request("again", [1], GREEDY, session_id=0)


def test_idle_session_ttl(model_dir):
    eng = make_engine(model_dir, session_ttl=0.01)
    run(eng, [PROMPTS[0]], session_id="s", session_start=True)
    import time
    time.sleep(0.02)
    eng.step()
    assert eng.block_manager.num_used_blocks == 0 and "session_ttl" in eng.expired["s"]


def test_stop_request_truncates_and_keeps_session_consistent(model_dir):
    eng = make_engine(model_dir)
    eng.add_request("a", PROMPTS[2], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
                    session_id=1, session_start=True)
    got = []
    while len(got) < 6:
        for o in eng.step():
            got += o.new_token_ids
    assert eng.stop_request("a", 3)
    final = [o for o in eng.step() if o.request_id == "a"]
    assert [(o.finished, o.finish_reason, o.completion_tokens) for o in final] == [(True, "stop", 3)]
    seq = eng.sessions[1]
    assert seq.token_ids == PROMPTS[2] + got[:3] and seq.num_computed_tokens <= len(seq)
    (o2,), _ = run(eng, [[9, 9]], session_id=1)
    (ref,), _ = run(make_engine(model_dir), [PROMPTS[2] + got[:3] + [9, 9]])
    assert o2 == ref

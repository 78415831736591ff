"""The real SmolLM2-135M-Instruct: the engine's greedy tokens equal HF transformers' token for token (fp32)."""
import pytest
import torch

from backend import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process by which",
           "Once upon a time, in a small village,"]
N_NEW = 32


def hf_greedy(hf_model, ids, n):
    """Plain argmax decoding with HF's forward and its own KV cache (EOS not special, as ignore_eos)."""
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), use_cache=True)
        new = []
        for _ in range(n):
            new.append(int(out.logits[0, -1].argmax()))
            out = hf_model(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return new


@pytest.fixture(scope="module")
def cases(demo_llm):
    tok = demo_llm.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    ids.append(demo_llm.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    return ids


def test_greedy_tokens_equal_hf(demo_llm, hf_demo_model, cases):
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    outs = demo_llm.generate(cases, params)
    for ids, out in zip(cases, outs):
        assert out.token_ids == hf_greedy(hf_demo_model, ids, N_NEW)
        assert out.completion_tokens == N_NEW and out.finish_reason == "length"


def test_chat_answer_is_coherent(demo_llm):
    out = demo_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(max_tokens=32, temperature=0.0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"                 # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text


def test_batch_of_eight_equals_each_alone(demo_llm, cases):
    prompts = cases + [demo_llm.encode(p) for p in ("Hi", "List three colors:", "Water boils at")]
    assert len(prompts) == 8 and len({len(p) for p in prompts}) >= 6
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = [o.token_ids for o in demo_llm.generate(prompts, params)]
    alone = [demo_llm.generate(p, params).token_ids for p in prompts]
    assert together == alone


def test_stream_yields_the_same_text(demo_llm):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    deltas = list(demo_llm.stream("The capital of France is", params))
    assert len(deltas) > 3
    assert "".join(deltas) == demo_llm.generate("The capital of France is", params).text


def test_stop_string_ends_the_text_before_it(demo_llm):
    full = demo_llm.generate("Count: one, two, three,", SamplingParams(max_tokens=24, temperature=0.0,
                                                                          ignore_eos=True)).text
    stop = full.strip().split()[2]
    out = demo_llm.generate("Count: one, two, three,", SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))
    assert out.finish_reason == "stop"
    assert stop not in out.text and full.startswith(out.text)


def test_seeded_sampling_is_reproducible(demo_llm):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = demo_llm.generate("Tell me a story:", p).token_ids
    b = demo_llm.generate(["Tell me a story:", "Something else entirely"], [p, SamplingParams(max_tokens=5)])[0]
    c = demo_llm.generate("Tell me a story:", SamplingParams(**{**p.to_dict(), "seed": 99})).token_ids
    assert a == b.token_ids           # same seed, other batch company: same tokens
    assert a != c


def test_logprobs_of_greedy_tokens(demo_llm, hf_demo_model):
    ids = demo_llm.encode("The capital of France is")
    out = demo_llm.generate(ids, SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, ignore_eos=True))
    assert len(out.logprobs) == 4
    with torch.no_grad():
        logits = hf_demo_model(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1:-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-3, rtol=1e-3)


def test_min_tokens_delays_eos(demo_llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    short = demo_llm.chat(msgs, SamplingParams(max_tokens=40, temperature=0.0))
    assert short.finish_reason == "stop"
    longer = demo_llm.chat(msgs, SamplingParams(max_tokens=40, temperature=0.0,
                                                 min_tokens=short.completion_tokens + 3))
    assert longer.completion_tokens >= short.completion_tokens + 3

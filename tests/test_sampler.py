"""Sampler math on hand-made logits."""
import torch

from backend.config import SamplingParams
from backend.model.sampler import build_sampling_batch, sample, uniform_noise


class S:
    def __init__(self, params, token_ids=(1, 2), output_ids=(), seed=0):
        self.params, self.token_ids, self.output_ids, self.seed = params, list(token_ids), list(output_ids), seed


def draw(logits, params, n=400, **kw):
    """Token counts over n different seeds for one row of logits."""
    counts = torch.zeros(logits.shape[-1], dtype=torch.long)
    for seed in range(n):
        sb = build_sampling_batch([S(params, seed=seed, **kw)], "cpu", [], logits.shape[-1])
        counts[sample(logits[None], sb)[0]] += 1
    return counts


def test_greedy_and_temperature_zero():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    sb = build_sampling_batch([S(SamplingParams(temperature=0.0))], "cpu", [], 4)
    assert sample(logits[None], sb)[0].item() == 1


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert set(draw(logits, SamplingParams(top_k=2)).nonzero().flatten().tolist()) == {0, 1}
    assert set(draw(logits, SamplingParams(top_p=0.65)).nonzero().flatten().tolist()) == {0, 1}
    assert set(draw(logits, SamplingParams(min_p=0.6)).nonzero().flatten().tolist()) == {0, 1}
    full = draw(logits, SamplingParams(), n=2000).float() / 2000
    torch.testing.assert_close(full, torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.04, rtol=0)


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([2.0, 2.1, -1.0, -1.2])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    sb = build_sampling_batch([S(p, token_ids=[1, 3])], "cpu", [], 4)
    assert sample(logits[None], sb)[0].item() == 0          # 2.1 / 2 < 2.0
    sb = build_sampling_batch([S(SamplingParams(temperature=0.0, repetition_penalty=2.0), token_ids=[0, 1])],
                              "cpu", [], 4)
    assert sample(torch.tensor([[2.0, 2.1, 1.5, -1.2]]), sb)[0].item() == 2   # 1.0, 1.05, 1.5, -1.2


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    sb = build_sampling_batch([S(p, output_ids=[7])], "cpu", [1], 4)
    assert sample(logits, sb)[0].item() == 3
    sb = build_sampling_batch([S(p, output_ids=[7, 7])], "cpu", [1], 4)
    assert sample(logits, sb)[0].item() == 1


def test_noise_is_a_pure_function_of_seed_and_step():
    a = uniform_noise(torch.tensor([5, 6]), torch.tensor([0, 3]), 1000)
    b = uniform_noise(torch.tensor([6]), torch.tensor([3]), 1000)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert 0 < a.min() and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.02

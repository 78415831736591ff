"""The ShareGPT-like workload: (prompt, output) token lengths from a seeded sample shipped as data.

scripts/data/sharegpt_lengths.json holds 1,000 (input, output) pairs drawn once (seed 0) from two independent
log-normal distributions whose parameters approximate the published summary statistics of ShareGPT_V3 as the
vLLM/LMDeploy throughput benchmarks filter it (Llama tokenizer: mean prompt ~220 tokens, mean output ~200,
long right tails, both clipped to [4, 1024]). It is a fit to summary numbers, not to the raw conversations,
and lengths are drawn independently. `python -m scripts.bench_workload --regenerate` rewrites the file.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import List, Tuple

DATA = Path(__file__).with_name("data") / "sharegpt_lengths.json"
# log-normal parameters: mean = exp(mu + sigma^2 / 2)
PARAMS = {"input": {"mu": math.log(220) - 0.5, "sigma": 1.0}, "output": {"mu": math.log(200) - 0.405, "sigma": 0.9},
          "min": 4, "max": 1024, "num_samples": 1000, "seed": 0}


def _regenerate(path: Path = DATA) -> None:
    rng = random.Random(PARAMS["seed"])

    def draw(d):
        return int(min(PARAMS["max"], max(PARAMS["min"], round(rng.lognormvariate(d["mu"], d["sigma"])))))
    pairs = [[draw(PARAMS["input"]), draw(PARAMS["output"])] for _ in range(PARAMS["num_samples"])]
    doc = {"description": __doc__.split("\n\n")[1].replace("\n", " "), "params": PARAMS, "pairs": pairs}
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


def load_lengths(num_prompts: int, seed: int = 0, max_input: int = 0, max_output: int = 0) -> List[Tuple[int, int]]:
    """num_prompts (input, output) pairs: a seeded draw from the shipped sample (with replacement past 1,000),
    each clipped to max_input / max_output when those are > 0."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    pairs = json.loads(DATA.read_text())["pairs"]
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    picked = [pairs[order[i % len(order)]] for i in range(num_prompts)]
    return [(min(a, max_input) if max_input else a, min(b, max_output) if max_output else b) for a, b in picked]


def summary(lengths: List[Tuple[int, int]]) -> dict:
    ins, outs = [a for a, _ in lengths], [b for _, b in lengths]
    return {"num_prompts": len(lengths), "mean_input": sum(ins) / len(ins), "mean_output": sum(outs) / len(outs),
            "max_input": max(ins), "max_output": max(outs)}


def token_prompts(lengths: List[Tuple[int, int]], vocab: int, seed: int = 0) -> List[List[int]]:
    """Random prompt token ids of the workload's lengths (avoiding the low ids where specials usually sit)."""
    rng = random.Random(seed + 1)
    return [[rng.randrange(10, vocab) for _ in range(a)] for a, _ in lengths]


def text_prompts(tokenizer, lengths: List[Tuple[int, int]], seed: int = 0) -> List[str]:
    """Prompts as text of about the workload's lengths in `tokenizer` tokens: random whole words from its vocabulary
    (word tokens re-tokenize to themselves, so the length is close; the server reports the exact count)."""
    rng = random.Random(seed + 2)
    vocab = tokenizer.get_vocab()
    words = sorted({tokenizer.decode([i]).strip() for i in vocab.values()
                    if tokenizer.decode([i]).startswith(" ") and tokenizer.decode([i]).strip().isalpha()})
    if len(words) < 100:
        raise ValueError("the tokenizer has too few word tokens to build text prompts")
    return [" ".join(rng.choice(words) for _ in range(a)) for a, _ in lengths]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="show or regenerate the shipped ShareGPT-like length sample")
    ap.add_argument("--regenerate", action="store_true")
    if ap.parse_args().regenerate:
        _regenerate()
    print(json.dumps(summary(load_lengths(PARAMS["num_samples"])), indent=2))

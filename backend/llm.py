"""In-process API, like lmdeploy.pipeline: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from .config import EngineConfig, SamplingParams
from .engine.detokenizer import IncrementalDetokenizer
from .engine.engine import LLMEngine


@dataclass
class GenerationOutput:
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    logprobs: List[float] = field(default_factory=list)

    @property
    def usage(self) -> Dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "cached_tokens": self.cached_tokens}


def resolve_model_dirs(model: Union[str, Path]):
    """'demo' | HF directory | workspace (weights/ + tokenizer/) -> (weights dir, tokenizer dir)."""
    if str(model) == "demo":
        from tools.gguf import ensure_demo_model
        model = ensure_demo_model()
    p = Path(model)
    if (p / "weights").is_dir():
        return p / "weights", (p / "tokenizer" if (p / "tokenizer").is_dir() else p / "weights")
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {p} does not exist")
    return p, p


def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def stop_token_ids(tokenizer, model_eos: Sequence[int]) -> List[int]:
    """The model's EOS ids, the tokenizer's EOS, and the chat turn-end tokens a template may use."""
    ids = list(model_eos)
    cand = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t)
                                       for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")
                                       if t in tokenizer.get_vocab()]
    for t in cand:
        if t is not None and t not in ids:
            ids.append(t)
    return ids


class LLM:
    def __init__(self, model: Union[str, Path] = "demo", **engine_kwargs):
        weights_dir, tok_dir = resolve_model_dirs(model)
        self.config = EngineConfig(model=str(weights_dir), **engine_kwargs)
        self.engine = LLMEngine(self.config)
        self.tokenizer = load_tokenizer(tok_dir)
        self.engine.runner.eos_ids = stop_token_ids(self.tokenizer, self.engine.runner.eos_ids)
        self._ids = itertools.count()

    def encode(self, prompt: Union[str, List[int]]) -> List[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def apply_chat_template(self, messages: List[dict]) -> List[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def _run(self, prompts: List[List[int]], params: List[SamplingParams]) -> Iterator:
        """Submit all, step until done; yields (index, delta text, RequestOutput)."""
        detoks, rids = {}, {}
        for i, (ids, p) in enumerate(zip(prompts, params)):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            detoks[rid] = IncrementalDetokenizer(self.tokenizer, ids, p.stop)
            rids[rid] = i
        try:
            while rids:
                for out in self.engine.step():
                    if out.request_id not in rids:
                        continue
                    d = detoks[out.request_id]
                    delta = d.add(out.new_token_ids)
                    if d.stopped and not out.finished:
                        self.engine.stop_request(out.request_id, d.num_tokens_at_stop)
                    if out.finished:
                        delta += d.flush()
                    yield rids[out.request_id], delta, out
                    if out.finished:
                        del rids[out.request_id]
        finally:
            for rid in rids:
                self.engine.abort(rid)

    def generate(self, prompts, params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 ) -> Union[GenerationOutput, List[GenerationOutput]]:
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        ids = [self.encode(p) for p in plist]
        ps = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(ids)
        results = [GenerationOutput("", [], None, len(i), 0) for i in ids]
        for i, delta, out in self._run(ids, ps):
            r = results[i]
            r.text += delta
            r.token_ids += out.new_token_ids
            r.logprobs += out.new_logprobs
            if out.finished:
                if out.error:
                    raise RuntimeError(out.error)
                r.token_ids = r.token_ids[:out.completion_tokens]
                r.finish_reason, r.completion_tokens = out.finish_reason, out.completion_tokens
                r.prompt_tokens, r.cached_tokens = out.prompt_tokens, out.cached_tokens
                r.prefilled_tokens = out.prefilled_tokens
        return results[0] if single else results

    def stream(self, prompt, params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yield text deltas as they are generated."""
        for _, delta, _ in self._run([self.encode(prompt)], [params or SamplingParams()]):
            if delta:
                yield delta

    def chat(self, messages: List[dict], params: Optional[SamplingParams] = None) -> GenerationOutput:
        return self.generate(self.apply_chat_template(messages), params)

"""OpenAI request validation and response objects for the gateway (client/openai_server.py).

A request body (already parsed JSON) becomes a `GenerateRequest`: the Triton sampling inputs plus what the
response needs. Every refusal is an `APIError` naming the offending parameter, returned as OpenAI's
{"error": {"message", "type", "param", "code"}} with the matching HTTP status.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from client.protocol import Generation
from client.template import content_text

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}      # OpenAI's legacy default; a chat answer's budget
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass
class GenerateRequest:
    kind: str                       # "completion" | "chat"
    model: str
    prompt: Any                     # completion: str or token ids; chat: messages list
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    sampling: Dict[str, Any] = field(default_factory=dict)   # Triton inputs: max_tokens, temperature, ...


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise bad(name, f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if v < lo or (lo_open and v == lo) or v > hi:
        raise bad(name, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return int(v) if integer else float(v)


def _flag(body: dict, name: str) -> Optional[bool]:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(name, f"{name} must be a boolean, got {v!r}")
    return v


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "stop must be a non-empty string or a list of at most 4 non-empty strings")
    return stop


def _prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                   # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return prompt
    raise bad("prompt", "prompt must be a non-empty string or a list of token ids (one prompt; batches "
                        "are not supported)")


def _messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a role and content")
        text = content_text(m.get("content"))
        if text is None:
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": text})
    return out


def parse_request(kind: str, body: Any) -> GenerateRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required (see GET /v1/models)")
    n = _number(body, "n", 1, 1, integer=True)
    if body.get("n") is not None and n != 1:
        raise bad("n", "only n=1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0):
            raise bad(name, f"{name} is not supported (use repetition_penalty)")
    if kind == "completion" and _flag(body, "echo"):
        raise bad("echo", "echo is not supported")
    limit = body.get("max_completion_tokens", body.get("max_tokens")) if kind == "chat" else body.get("max_tokens")
    max_name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({max_name: limit}, max_name, 1, 2**31 - 1, integer=True)
    sampling = {
        "max_tokens": max_tokens or DEFAULT_MAX_TOKENS[kind],
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
        "top_k": _number(body, "top_k", 0, 2**31 - 1, integer=True),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, 10.0, lo_open=True),
        "seed": _number(body, "seed", 0, 2**63 - 1, integer=True),
        "min_tokens": _number(body, "min_tokens", 0, 2**31 - 1, integer=True),
        "ignore_eos": _flag(body, "ignore_eos"),
        "stop_words": _stop(body),
    }
    if kind == "completion":
        lp = _number(body, "logprobs", 0, 5, integer=True)
        logprobs = lp is not None
    else:
        logprobs = bool(_flag(body, "logprobs"))
        _number(body, "top_logprobs", 0, 20, integer=True)
    stream = bool(_flag(body, "stream"))
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "stream_options must be an object")
    include_usage = bool(_flag(opts, "include_usage"))
    if logprobs:
        sampling["return_log_probs"] = True
    prompt = _prompt(body) if kind == "completion" else _messages(body)
    return GenerateRequest(kind, model, prompt, stream, include_usage, logprobs,
                           {k: v for k, v in sampling.items() if v is not None})


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def usage(gen: Generation) -> dict:
    completion = gen.completion_tokens or len(gen.token_ids)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion,
            "total_tokens": gen.prompt_tokens + completion}


def logprobs_object(kind: str, tokens: List[str], logprobs: List[float], offset: int = 0) -> Optional[dict]:
    """OpenAI logprobs of the sampled tokens (the engine returns no alternatives, so top lists hold only them)."""
    if kind == "completion":
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
                "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)]}
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)]}


def choice(kind: str, text: str, finish_reason: Optional[str], logprobs: Optional[dict], chunk: bool,
           first: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if chunk:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def response(kind: str, rid: str, model: str, choices: List[dict], chunk: bool,
             usage_: Optional[dict] = None, created: Optional[int] = None) -> dict:
    obj = "text_completion" if kind == "completion" else ("chat.completion.chunk" if chunk else "chat.completion")
    out = {"id": rid, "object": obj, "created": created or int(time.time()), "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        out["usage"] = usage_
    return out


def finish_reason(reason: Optional[str]) -> str:
    """The engine's finish reasons in OpenAI's words."""
    return {"length": "length", "stop": "stop", None: "stop"}.get(reason, reason or "stop")

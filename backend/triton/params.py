"""Request inputs -> a validated GenerationRequest; every error names the input and what it accepts.

Works on a `get(name) -> numpy array | None` lookup, so it is testable without Triton. Triton has already checked
each input's data type against config.pbtxt; here we check shapes, ranges and UTF-8.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from ..config import EngineConfig, SamplingParams

Getter = Callable[[str], Optional[np.ndarray]]

# input name -> (SamplingParams field, python type); min_length is tensorrtllm_backend's name (genai-perf sends it)
_SCALARS = {
    "max_tokens": ("max_tokens", int), "temperature": ("temperature", float), "top_p": ("top_p", float),
    "top_k": ("top_k", int), "min_p": ("min_p", float), "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", int), "min_length": ("min_tokens", int), "min_tokens": ("min_tokens", int),
    "ignore_eos": ("ignore_eos", bool),
    "return_log_probs": ("logprobs", bool),
}


class InputError(ValueError):
    pass


@dataclass
class GenerationRequest:
    text: Optional[str]                     # text_input, decoded
    input_ids: Optional[List[int]]          # input_ids, when given instead of text
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    session_id: Optional[int] = None
    session_start: bool = False
    session_end: bool = False
    stop: List[str] = field(default_factory=list)

    @property
    def is_continuation(self) -> bool:
        return self.session_id is not None and not self.session_start

    @property
    def is_empty(self) -> bool:
        return not self.text and not self.input_ids


def _scalar(get: Getter, name: str, kind):
    arr = get(name)
    if arr is None:
        return None
    if arr.size != 1:
        raise InputError(f"{name} must hold one value, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    if kind is bool:
        if arr.dtype != np.bool_:
            raise InputError(f"{name} must be BOOL, got {arr.dtype}")
        return bool(v)
    if kind is int:
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name} must be an integer, got {arr.dtype}")
        return int(v)
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name} must be a number, got {arr.dtype}")
    v = float(v)
    if not np.isfinite(v):
        raise InputError(f"{name} must be finite, got {v}")
    return v


def _utf8(name: str, b) -> str:
    if isinstance(b, str):
        return b
    try:
        return bytes(b).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not valid UTF-8 (byte {e.start}: {bytes(b)[e.start:e.start + 4]!r})") from None


def parse_request(get: Getter, default_max_tokens: int, session_id: Optional[int] = None,
                  session_start: bool = False, session_end: bool = False) -> GenerationRequest:
    """`session_*` come from the sequence batcher when the model has one; otherwise the session_* inputs count."""
    text_arr, ids_arr = get("text_input"), get("input_ids")
    if text_arr is not None and ids_arr is not None:
        raise InputError("give either text_input or input_ids, not both")
    text = ids = None
    if text_arr is not None:
        if text_arr.size != 1:
            raise InputError(f"text_input must hold one string, got shape {list(text_arr.shape)}; "
                             f"send one prompt per request")
        text = _utf8("text_input", text_arr.reshape(-1)[0])
    elif ids_arr is not None:
        if not np.issubdtype(ids_arr.dtype, np.integer):
            raise InputError(f"input_ids must be integers, got {ids_arr.dtype}")
        ids = [int(t) for t in ids_arr.reshape(-1)]
    if session_id is None:
        sid = _scalar(get, "session_id", int)
        if sid is not None:
            if sid == 0:
                raise InputError("session_id must be non-zero (0 means no session)")
            session_id = sid
            session_start = bool(_scalar(get, "session_start", bool))
            session_end = bool(_scalar(get, "session_end", bool))
        elif get("session_start") is not None or get("session_end") is not None:
            raise InputError("session_start / session_end need a session_id")
    if text is None and ids is None and not (session_id is not None and session_end):
        raise InputError("text_input is required (or input_ids); only a session END may come without a prompt")

    values = {}
    for name, (fname, kind) in _SCALARS.items():
        v = _scalar(get, name, kind)
        if v is not None:
            values[fname] = v
    values.setdefault("max_tokens", default_max_tokens)
    stop_arr = get("stop_words")
    stop = [] if stop_arr is None else [_utf8("stop_words", s) for s in stop_arr.reshape(-1)]
    stop = [s for s in stop if s]
    try:
        params = SamplingParams(stop=stop, **values)
    except ValueError as e:                   # names the field and its range
        raise InputError(str(e)) from None
    return GenerationRequest(
        text=text, input_ids=ids, params=params, stream=bool(_scalar(get, "stream", bool)),
        exclude_input_in_output=bool(_scalar(get, "exclude_input_in_output", bool)),
        session_id=session_id, session_start=session_start, session_end=session_end, stop=stop)


_NOT_ENGINE = {"tokenizer_dir", "default_max_tokens", "cancel_check_interval", "weights_dir", "engine_python",
               "engine_start_timeout", "engine_model"}


def engine_config_from_parameters(params: dict, model_dir: str) -> dict:
    """config.pbtxt string parameters -> EngineConfig fields of the right types (validated by EngineConfig)."""
    defaults = EngineConfig()
    if "tensor_para_size" in params:     # TurboMind's name for tp
        params = {**{k: v for k, v in params.items() if k != "tensor_para_size"}, "tp": params["tensor_para_size"]}
    out = {"model": os.path.normpath(os.path.join(model_dir, params["weights_dir"]))}
    for f in dataclasses.fields(EngineConfig):
        if f.name not in params or f.name == "model":
            continue
        raw, default = params[f.name], getattr(defaults, f.name)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[f.name] = raw.lower() in ("true", "1")
            elif default is None:
                out[f.name] = int(raw) if raw else None
            else:
                out[f.name] = type(default)(raw)
        except ValueError:
            raise ValueError(f"config.pbtxt parameter {f.name}={raw!r} is not a valid {type(default).__name__}")
    if out.get("kv_qparams"):           # a file of the workspace, named relative to the model like weights_dir
        out["kv_qparams"] = os.path.normpath(os.path.join(model_dir, out["kv_qparams"]))
    unknown = sorted(set(params) - set(out) - _NOT_ENGINE)
    if unknown:
        raise ValueError(f"config.pbtxt has unknown parameters {unknown}")
    EngineConfig.from_dict(out)
    return out

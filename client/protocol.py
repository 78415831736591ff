"""The served model's tensor interface, shared by the gRPC, HTTP and OpenAI clients.

Inputs are named as tensorrtllm_backend's ensemble (text_input, max_tokens, temperature, ...). Their data types
and shapes are not hard-coded here: `ModelInterface` reads them from the model's config on the server, so a
request is built with exactly the dtype each input declares, and an input the model lacks is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

# config.pbtxt data_type -> Triton wire datatype
_WIRE_DTYPES = {
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}
_NP_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


class TritonError(RuntimeError):
    """An error from tritonserver or the model; `status` is the gRPC/HTTP status when the transport failed."""

    def __init__(self, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.status = status

    @property
    def is_unavailable(self) -> bool:
        return self.status is not None and any(s in str(self.status) for s in ("UNAVAILABLE", "503", "DEADLINE"))


@dataclass
class InputSpec:
    name: str
    datatype: str              # Triton wire datatype: INT32, FP32, BYTES, ...
    dims: List[int]            # without the batch dimension; -1 = variable
    batched: bool              # the model has max_batch_size > 0: a leading batch dim of 1 is added
    optional: bool = False

    def to_array(self, value: Any) -> np.ndarray:
        """One request's value as an array of this input's dtype and shape ([1, ...] when batched)."""
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        if self.datatype == "BYTES":
            values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        elif self.datatype == "BOOL":
            if any(not isinstance(v, (bool, np.bool_)) for v in values):
                raise ValueError(f"input {self.name!r} must be a bool, got {value!r}")
        elif self.datatype.startswith(("INT", "UINT")):
            if any(isinstance(v, bool) or not float(v).is_integer() for v in values):
                raise ValueError(f"input {self.name!r} must be an integer, got {value!r}")
        arr = np.array(values, dtype=_NP_DTYPES[self.datatype])
        dims = self.dims or [-1]
        if dims.count(-1) > 1:
            raise ValueError(f"input {self.name!r} has dims {self.dims}: more than one variable dimension")
        fixed = int(np.prod([d for d in dims if d != -1]))
        shape = [arr.size // fixed if d == -1 else d for d in dims]
        if int(np.prod(shape)) != arr.size:
            raise ValueError(f"input {self.name!r} takes dims {self.dims}, got {arr.size} values")
        arr = arr.reshape(shape)
        return arr.reshape([1] + shape) if self.batched else arr  # [1, *dims] when batched


@dataclass
class ModelInterface:
    """The inputs one model declares, built from its config (gRPC or HTTP `get_model_config` as JSON)."""
    name: str
    inputs: Dict[str, InputSpec]
    decoupled: bool = True
    sequence_batching: bool = False

    @classmethod
    def from_config(cls, config: Mapping) -> "ModelInterface":
        config = config.get("config", config)                  # the gRPC JSON wraps it in {"config": ...}
        batched = int(config.get("max_batch_size", 0)) > 0
        inputs = {}
        for spec in config.get("input", []):
            dtype = _WIRE_DTYPES.get(spec.get("data_type", "TYPE_FP32"), spec.get("data_type"))
            dims = [int(d) for d in spec.get("dims", [])]
            inputs[spec["name"]] = InputSpec(spec["name"], dtype, dims, batched, bool(spec.get("optional")))
        policy = config.get("model_transaction_policy", {})
        return cls(name=config.get("name", ""), inputs=inputs, decoupled=bool(policy.get("decoupled", False)),
                   sequence_batching="sequence_batching" in config)

    def request_values(self, prompt, stream: bool, params: Mapping[str, Any]) -> Dict[str, Any]:
        """A prompt (text or token ids) and sampling parameters -> input values; only new text comes back."""
        values = {"input_ids" if isinstance(prompt, (list, tuple)) else "text_input": prompt, "stream": stream}
        if "exclude_input_in_output" in self.inputs:
            values["exclude_input_in_output"] = True
        values.update(params)
        return values

    def arrays(self, values: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """Request values -> named arrays; None values are left out; unknown names raise naming the input."""
        out = {}
        for name, value in values.items():
            if value is None or (isinstance(value, (list, tuple)) and not value):
                continue
            spec = self.inputs.get(name)
            if spec is None:
                raise ValueError(f"model {self.name!r} has no input {name!r}; it accepts {sorted(self.inputs)}")
            out[name] = spec.to_array(value)
        return out

    def json_values(self, values: Mapping[str, Any]) -> Dict[str, Any]:
        """Request values for Triton's HTTP /generate JSON (scalars stay scalars); checks names like arrays()."""
        return {k: values[k] for k in self.arrays(values)}


@dataclass
class Delta:
    """One response of a stream: new text (and ids, logprobs) since the previous one."""
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None     # prompt tokens whose KV the engine reused (session or prefix cache)

    @classmethod
    def from_outputs(cls, get) -> "Delta":
        """Build from `get(name) -> numpy array | None` (an InferResult's as_numpy or a JSON lookup)."""
        def scalar(name):
            arr = get(name)
            if arr is None or np.size(arr) == 0:
                return None
            return np.asarray(arr).reshape(-1)[0]

        def text(name):
            v = scalar(name)
            if v is None:
                return None
            return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)

        ids, lps = get("output_ids"), get("log_probs")
        reason = text("finish_reason")
        pt, ct, cached = scalar("prompt_tokens"), scalar("completion_tokens"), scalar("cached_tokens")
        return cls(text=text("text_output") or "",
                   token_ids=[] if ids is None else [int(i) for i in np.asarray(ids).reshape(-1)],
                   logprobs=[] if lps is None else [float(x) for x in np.asarray(lps).reshape(-1)],
                   finish_reason=reason or None,
                   prompt_tokens=None if pt is None else int(pt),
                   completion_tokens=None if ct is None else int(ct),
                   cached_tokens=None if cached is None else int(cached))


@dataclass
class Generation:
    """A whole answer, accumulated from its deltas."""
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.completion_tokens is not None:
            self.completion_tokens = delta.completion_tokens
        if delta.cached_tokens is not None:
            self.cached_tokens = delta.cached_tokens

    @classmethod
    def join(cls, deltas: Sequence[Delta]) -> "Generation":
        gen = cls()
        for d in deltas:
            gen.add(d)
        return gen

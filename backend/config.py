"""EngineConfig and SamplingParams: the one place engine and request parameters are named and validated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

KV_CACHE_DTYPES = ("auto", "int8", "int4")
# LMDeploy >= 0.4: quant_policy 0 = no KV quant, 8 = int8, 4 = int4
QUANT_POLICY_TO_KV = {0: "auto", 8: "int8", 4: "int4"}
DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_ROTATIONS = ("auto", "hadamard", "off")   # backend/model/rotation.py


def _check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False, kind=(int, float)):
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")


def _from_dict(cls, d: dict, what: str):
    """Build a parameter dataclass, refusing keys it does not have (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} parameters {unknown}; known: {sorted(names)}")
    return cls(**d)


@dataclass
class EngineConfig:
    model: str = ""                      # directory with config.json + weights (HF or converted workspace/weights)
    dtype: str = "auto"                  # auto: float32 on CPU, the checkpoint's fp16/bf16 on GPU
    device: str = "auto"                 # auto | cpu | cuda
    session_len: int = 4096              # max tokens of one sequence (prompt + output, all turns of a session)
    max_batch_size: int = 64             # max sequences in one decode step
    cache_block_seq_len: int = 64        # tokens per KV block
    cache_max_entry_count: float = 0.8   # <= 1: fraction of free memory for KV after weights; > 1: number of blocks
    max_prefill_token_num: int = 8192    # token budget of one step (chunked prefill above it)
    enable_prefix_caching: bool = False
    kv_cache_dtype: str = "auto"         # auto (= model dtype) | int8 | int4
    quant_policy: Optional[int] = None   # LMDeploy alias: 0 | 8 | 4 (overrides kv_cache_dtype when given)
    rope_scaling_factor: float = 0.0     # > 0 turns on dynamic NTK scaling by this factor
    use_logn_attn: bool = False          # scale q by log(pos)/log(train_len) past the training length
    tp: int = 1                          # tensor parallel ranks (worker processes; GPUs on CUDA): backend/engine/tp.py
    use_cuda_graph: bool = True          # GPU only: capture decode steps for batch-size buckets
    session_ttl: float = 3600.0          # seconds an idle session keeps its KV before it is released
    seed: int = 0                        # default seed for requests that give none
    cpu_kv_blocks: int = 0               # CPU device: block count when cache_max_entry_count <= 1 (0 = derive)
    kv_qparams: str = ""                 # static per-head KV scales (`lmtriton lite kv_qparams`); needs int8/int4
    kv_rotation: str = "auto"            # auto (Hadamard for online int4 KV) | hadamard | off: model/rotation.py
    # decode fast paths (GPU, issue 4); measured on an H200 (docs/benchmarks.md): Llama-2-7B bs=1 fp16 210 -> 227
    # tok/s, W4A16 + KV int8 365 -> 413 tok/s. Switch off to compare or to rule them out.
    decode_step_in_graph: bool = True    # decode inputs in one H2D copy; lm_head + greedy argmax inside the graph
    fuse_rope_kv: bool = True            # one kernel for rotary + KV write (+ quantization): kernels/rotary_kv.py

    def __post_init__(self):
        if self.quant_policy is not None:
            if self.quant_policy not in QUANT_POLICY_TO_KV:
                raise ValueError(f"quant_policy must be one of 0, 4, 8, got {self.quant_policy}")
            self.kv_cache_dtype = QUANT_POLICY_TO_KV[self.quant_policy]
        self.validate()

    def validate(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_qparams and self.kv_cache_dtype not in ("int8", "int4"):
            raise ValueError(f"kv_qparams={self.kv_qparams!r} needs kv_cache_dtype int8 or int4, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_rotation not in KV_ROTATIONS:
            raise ValueError(f"kv_rotation must be one of {KV_ROTATIONS}, got {self.kv_rotation!r}")
        if self.kv_rotation == "hadamard" and self.kv_qparams:
            raise ValueError(f"kv_rotation=hadamard cannot be combined with kv_qparams={self.kv_qparams!r}: the static "
                             f"parameters are calibrated on unrotated K/V (use kv_rotation auto or off)")
        _check_range("session_len", self.session_len, 16, kind=int)
        _check_range("max_batch_size", self.max_batch_size, 1, 4096, kind=int)
        _check_range("cache_block_seq_len", self.cache_block_seq_len, 1, 1024, kind=int)
        if self.cache_block_seq_len & (self.cache_block_seq_len - 1):
            raise ValueError(f"cache_block_seq_len must be a power of two, got {self.cache_block_seq_len}")
        _check_range("cache_max_entry_count", self.cache_max_entry_count, 0, lo_open=True)
        _check_range("max_prefill_token_num", self.max_prefill_token_num, 16, kind=int)
        _check_range("rope_scaling_factor", self.rope_scaling_factor, 0.0)
        _check_range("tp", self.tp, 1, 64, kind=int)
        _check_range("session_ttl", self.session_ttl, 0, lo_open=True)

    @property
    def quantized_kv(self) -> bool:
        return self.kv_cache_dtype in ("int8", "int4")

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        return _from_dict(cls, d, "engine")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=list)
    stop_token_ids: Sequence[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self):
        _check_range("max_tokens", self.max_tokens, 1, kind=int)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("top_k", self.top_k, 0, kind=int)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        if self.seed is not None:
            _check_range("seed", self.seed, 0, 2**63 - 1, kind=int)
        _check_range("min_tokens", self.min_tokens, 0, kind=int)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a list of non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got {t!r}")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        return _from_dict(cls, d, "sampling")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

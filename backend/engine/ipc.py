"""Messages between frontends and the engine process (backend/engine/core.py): msgpack lists over ZMQ.

Kept free of torch so the Triton stub can import it without loading the engine.
"""
from __future__ import annotations

from typing import NamedTuple

import msgpack


def pack(msg) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class OutputRow(NamedTuple):
    """One request's output of one engine step, as sent in an ["out", [row, ...]] message."""
    request_id: str
    new_token_ids: list
    new_logprobs: list
    finished: bool
    finish_reason: str
    error: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prefilled_tokens: int


def error_row(rid, message: str) -> list:
    return [rid, [], [], True, "error", message, 0, 0, 0, 0]

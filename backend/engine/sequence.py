"""A sequence: one request, or one chat session that lives across turns, and its place in the KV cache."""
from __future__ import annotations

import enum
import itertools
import time
from typing import List, Optional

from ..config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued, or preempted: prefill (re)computes what is missing from the cache
    RUNNING = "running"
    IDLE = "idle"            # a session between turns: finished its turn, keeps its KV blocks
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS / stop token / stop string
    LENGTH = "length"        # max_tokens or session_len
    ABORT = "abort"          # cancelled by the client
    ERROR = "error"


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id, token_ids: List[int], params: SamplingParams, session_id=None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.session_id = session_id
        self.token_ids: List[int] = list(token_ids)
        self.num_prompt_tokens = len(token_ids)      # of the current turn's whole prompt (history included)
        self.num_computed_tokens = 0                 # tokens whose K/V are in the cache
        self.num_cached_prompt_tokens = 0            # of this turn: found in the prefix cache / kept session KV
        self.num_prefilled_tokens = 0                # of this turn: prompt tokens the model actually computed
        self.is_turn_scheduled = False
        self.block_table: List[int] = []
        self.num_hashed_blocks = 0                   # full blocks registered in the prefix cache
        self.status = SequenceStatus.WAITING
        self.params = params
        self.output_ids: List[int] = []              # this turn's generated tokens
        self.output_logprobs: List[float] = []
        self.finish_reason: Optional[FinishReason] = None
        self.error: Optional[str] = None
        self.arrival_time = time.monotonic()
        self.last_used = self.arrival_time
        self.seed = params.seed
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        return self.num_uncomputed_tokens > 1

    def append_token(self, token_id: int, logprob: Optional[float]) -> None:
        self.token_ids.append(token_id)
        self.output_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def start_turn(self, new_token_ids: List[int], params: SamplingParams) -> None:
        """A session's next turn: the new tokens follow everything so far; KV already computed stays."""
        self.token_ids.extend(new_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_cached_prompt_tokens = 0
        self.num_prefilled_tokens = 0
        self.is_turn_scheduled = False
        self.params, self.seed = params, params.seed
        self.output_ids, self.output_logprobs = [], []
        self.finish_reason, self.error = None, None
        self.status = SequenceStatus.WAITING
        self.arrival_time = self.last_used = time.monotonic()

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep only the first n generated tokens (a stop string matched inside the text)."""
        drop = len(self.output_ids) - num_output_tokens
        if drop > 0:
            del self.token_ids[-drop:]
            del self.output_ids[-drop:]
            del self.output_logprobs[num_output_tokens:]
            self.num_computed_tokens = min(self.num_computed_tokens, len(self.token_ids))

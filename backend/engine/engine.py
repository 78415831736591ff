"""LLMEngine: token ids in, token ids out. One step = schedule, run, update.

Sessions (Triton sequence batching): a request may name a session; START opens it (dropping an old one of the
same id), later turns send only their new tokens and reuse the KV kept from earlier turns, END releases it.
Idle sessions go after session_ttl seconds, or least-recently-used first when KV blocks run out.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..config import EngineConfig, SamplingParams
from ..model.config import ModelConfig
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import FinishReason, Sequence, SequenceStatus

log = logging.getLogger(__name__)


class SessionError(ValueError):
    pass


@dataclass
class RequestOutput:
    request_id: object
    new_token_ids: List[int] = field(default_factory=list)
    new_logprobs: List[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0         # whole prompt of this turn, session history included
    completion_tokens: int = 0
    cached_tokens: int = 0         # prompt tokens whose KV was reused (prefix cache or kept session KV)
    prefilled_tokens: int = 0      # prompt tokens the model computed for this turn (recomputes included)


class LLMEngine:
    def __init__(self, config: EngineConfig, model_cfg: Optional[ModelConfig] = None, weights=None):
        self.config = config
        if config.tp > 1:
            from .tp import TPRunner     # rank 0 here, one worker process per extra rank
            self.runner = TPRunner(config, model_cfg, weights)
        else:
            self.runner = ModelRunner(config, model_cfg, weights)
        self.model_cfg = self.runner.model_cfg
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache_block_seq_len,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: Dict[object, Sequence] = {}        # in-flight request id -> sequence
        self.sessions: Dict[object, Sequence] = {}        # open session id -> sequence (idle or in a turn)
        self.end_after_turn: set = set()                  # session ids to release when their turn ends
        self.expired: Dict[object, str] = {}              # session id -> why it is gone (bounded)
        self.pending: List[RequestOutput] = []            # outputs produced outside step() (errors, aborts)
        self._rng = random.Random(config.seed)
        self.num_generated_tokens = 0
        self.num_prefill_tokens = 0

    def close(self) -> None:
        """Stop tensor-parallel worker processes (nothing to do at tp=1)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # -- requests ----------------------------------------------------------------------------------------------
    def _check_fits(self, num_tokens: int, params: SamplingParams, what: str) -> None:
        if num_tokens == 0:
            raise ValueError(f"{what} is empty: at least one token is required")
        if num_tokens >= self.config.session_len:
            raise ValueError(f"{what} has {num_tokens} tokens, which does not leave room for one new token "
                             f"within session_len={self.config.session_len}")
        need = self.block_manager.blocks_for(min(num_tokens + params.max_tokens, self.config.session_len))
        if need > self.block_manager.num_blocks:
            raise ValueError(f"{what} needs up to {need} KV blocks (prompt {num_tokens} + max_tokens "
                             f"{params.max_tokens}), but the whole cache has {self.block_manager.num_blocks}; "
                             f"lower max_tokens or raise cache_max_entry_count")

    def add_request(self, request_id, prompt_token_ids: List[int], params: SamplingParams,
                    session_id=None, session_start: bool = False, session_end: bool = False) -> None:
        """Queue a request. Raises ValueError (naming the problem) for input that can never run."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        params.validate()
        vocab = self.model_cfg.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if session_id is None:
            self._check_fits(len(prompt_token_ids), params, "prompt")
            seq = Sequence(request_id, prompt_token_ids, params)
            self._seed(seq)
            self.requests[request_id] = seq
            self.scheduler.add(seq)
            return
        if session_start:
            if session_id in self.sessions:
                self._close_session(session_id, "restarted")
            self._check_fits(len(prompt_token_ids), params, "prompt")
            seq = Sequence(request_id, prompt_token_ids, params, session_id=session_id)
            self._seed(seq)
            self.sessions[session_id] = seq
            self.expired.pop(session_id, None)
            self.scheduler.add(seq)
        else:
            seq = self.sessions.get(session_id)
            if seq is None:
                why = self.expired.get(session_id)
                raise SessionError(f"session {session_id} {'expired (' + why + ')' if why else 'is unknown'}: "
                                   f"start it again with the START flag and the full history")
            if seq.status != SequenceStatus.IDLE:
                raise SessionError(f"session {session_id} is busy with another turn")
            self._check_fits(len(seq) + len(prompt_token_ids), params, f"session {session_id} history + turn")
            seq.start_turn(prompt_token_ids, params)
            seq.request_id = request_id
            self._seed(seq)
            self.block_manager.rewind(seq, seq.num_computed_tokens)
            self.scheduler.resume(seq)
        if session_end:
            self.end_after_turn.add(session_id)
        self.requests[request_id] = seq

    def _seed(self, seq: Sequence) -> None:
        if seq.seed is None:
            seq.seed = self._rng.getrandbits(63)

    def abort(self, request_id) -> bool:
        """Cancel a request; its blocks are freed now (a session's turn is rolled back to its last full turn)."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self._finish(seq, FinishReason.ABORT)
        return True

    def stop_request(self, request_id, num_output_tokens: int) -> bool:
        """A stop string matched in the text: keep only the first n generated tokens and finish with 'stop'."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        seq.truncate_output(num_output_tokens)
        self.block_manager.rewind(seq, len(seq))
        self._finish(seq, FinishReason.STOP)
        return True

    def end_session(self, session_id) -> bool:
        seq = self.sessions.get(session_id)
        if seq is None:
            return False
        if seq.status == SequenceStatus.IDLE:
            self._close_session(session_id, "ended")
        else:
            self.end_after_turn.add(session_id)
        return True

    def _close_session(self, session_id, why: str) -> None:
        seq = self.sessions.pop(session_id)
        self.end_after_turn.discard(session_id)
        if seq.status == SequenceStatus.IDLE:
            self.scheduler.drop_idle(session_id)
        elif not seq.is_finished:
            self._finish(seq, FinishReason.ABORT, keep_session=False)
        self._remember_expired(session_id, why)

    def _remember_expired(self, session_id, why: str) -> None:
        self.expired[session_id] = why
        while len(self.expired) > 100_000:
            self.expired.pop(next(iter(self.expired)))

    def _finish(self, seq: Sequence, reason: FinishReason, error: Optional[str] = None,
                keep_session: Optional[bool] = None) -> None:
        seq.finish_reason = reason
        seq.error = error
        if keep_session is None:
            keep_session = seq.session_id is not None and seq.session_id not in self.end_after_turn \
                and reason != FinishReason.ERROR
        if seq.session_id is not None and reason == FinishReason.ABORT and keep_session:
            # an aborted turn leaves no trace: roll back to the end of the prompt of this turn
            seq.truncate_output(0)
        if seq.session_id is not None and not keep_session and self.sessions.get(seq.session_id) is seq:
            ended = seq.session_id in self.end_after_turn
            self.sessions.pop(seq.session_id)
            self.end_after_turn.discard(seq.session_id)
            self._remember_expired(seq.session_id, "ended with END" if ended else f"its turn ended: {reason.value}")
        self.scheduler.finish(seq, keep_session)
        if keep_session:
            self.block_manager.rewind(seq, seq.num_computed_tokens)
        self.requests.pop(seq.request_id, None)
        self.pending.append(self._output(seq, [], [], finished=True))

    def _output(self, seq: Sequence, new_ids, new_lps, finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_logprobs=new_lps, finished=finished,
            finish_reason=seq.finish_reason.value if finished and seq.finish_reason else None, error=seq.error,
            prompt_tokens=seq.num_prompt_tokens, completion_tokens=len(seq.output_ids),
            cached_tokens=seq.num_cached_prompt_tokens, prefilled_tokens=seq.num_prefilled_tokens)

    # -- the step ----------------------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.pending)

    def step(self) -> List[RequestOutput]:
        self._expire_idle_sessions()
        batch = self.scheduler.schedule()
        results = self.runner.run(batch)
        outputs = self.pending
        self.pending = []
        for (seq, n), res in zip(batch, results):
            self._update(seq, n, res, outputs)
        for seq in self.scheduler.released_sessions:
            self.sessions.pop(seq.session_id, None)
            self._remember_expired(seq.session_id, "released under KV cache memory pressure")
        self.scheduler.released_sessions.clear()
        return outputs

    def _update(self, seq: Sequence, n: int, res, outputs: List[RequestOutput]) -> None:
        start = seq.num_computed_tokens
        if not seq.is_turn_scheduled:       # what the cache already held when this turn first ran
            seq.num_cached_prompt_tokens = min(start, seq.num_prompt_tokens)
            seq.is_turn_scheduled = True
        prefilled = max(0, min(start + n, seq.num_prompt_tokens) - start)
        seq.num_prefilled_tokens += prefilled
        self.num_prefill_tokens += prefilled
        seq.num_computed_tokens = start + n
        seq.last_used = time.monotonic()
        self.block_manager.commit(seq)
        if res is None:
            return
        token, logprob = res
        seq.append_token(token, logprob)
        self.num_generated_tokens += 1
        reason = self._stop_reason(seq, token)
        if reason is None:
            outputs.append(self._output(seq, [token], [] if logprob is None else [logprob], finished=False))
            return
        seq.finish_reason = reason
        self._finish(seq, reason)
        out = self.pending.pop()
        out.new_token_ids, out.new_logprobs = [token], ([] if logprob is None else [logprob])
        outputs.append(out)

    def _stop_reason(self, seq: Sequence, token: int) -> Optional[FinishReason]:
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.runner.eos_ids):
                return FinishReason.STOP
        if len(seq.output_ids) >= p.max_tokens or len(seq) >= self.config.session_len:
            return FinishReason.LENGTH
        return None

    def _expire_idle_sessions(self) -> None:
        now = time.monotonic()
        for sid, seq in list(self.scheduler.idle.items()):
            if now - seq.last_used > self.config.session_ttl:
                self._close_session(sid, f"idle for more than session_ttl={self.config.session_ttl:g}s")

    # -- introspection -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                "num_idle_sessions": len(self.scheduler.idle), "kv_blocks_total": bm.num_blocks,
                "kv_blocks_used": bm.num_used_blocks, "prefix_cache_hits": bm.num_prefix_hits,
                "prefix_cache_queries": bm.num_prefix_queries, "num_preemptions": self.scheduler.num_preemptions,
                "generated_tokens": self.num_generated_tokens, "prefill_tokens": self.num_prefill_tokens}

"""Continuous batching with chunked prefill, preemption by recompute, and idle sessions that hold their KV.

Every step: running sequences first (decodes always, even past the token budget, so they never starve;
partially prefilled ones take a chunk of what budget is left), then waiting ones are admitted while budget,
batch slots and KV blocks last. When blocks run out, idle sessions are released least-recently-used first,
then the newest running sequence is preempted: its blocks are freed and it recomputes later (full blocks
may come back from the prefix cache), so its output is unchanged.
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque
from typing import Deque, List, Tuple

from ..config import EngineConfig
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

ScheduledBatch = List[Tuple[Sequence, int]]   # (sequence, number of its next uncomputed tokens to compute)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_batch_size = config.max_batch_size
        self.token_budget = config.max_prefill_token_num
        self.bm = block_manager
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.idle: "OrderedDict[object, Sequence]" = OrderedDict()   # session id -> idle session, LRU first
        self.released_sessions: List[Sequence] = []                  # drained by the engine
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- memory pressure -------------------------------------------------------------------------------------
    def release_idle_session(self) -> bool:
        if not self.idle:
            return False
        _, seq = self.idle.popitem(last=False)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.released_sessions.append(seq)
        log.info("released idle session %s under KV memory pressure", seq.session_id)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: ScheduledBatch) -> bool:
        """Free blocks until seq can cover num_tokens; False if seq itself had to be preempted."""
        while not self.bm.can_allocate(self.bm.num_blocks_needed(seq, num_tokens)):
            if self.release_idle_session():
                continue
            victim = self.running[-1]
            if victim is seq:
                self._preempt(seq)
                return False
            done = [s for s, _ in scheduled]
            assert victim not in done, "running order and scheduling order disagree"
            self._preempt(victim)
        return True

    # -- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        scheduled: ScheduledBatch = []
        budget = self.token_budget
        preemptions_before = self.num_preemptions
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:      # preempted earlier in this loop
                continue
            n = seq.num_uncomputed_tokens
            if n > 1:
                n = min(n, budget)
                if n <= 0:
                    continue
            if not self._make_room(seq, seq.num_computed_tokens + n, scheduled):
                continue
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            scheduled.append((seq, n))
            budget -= n
        preempted_now = self.num_preemptions != preemptions_before   # no admission in a step that preempted
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            fresh = not seq.block_table
            if fresh:
                self.bm.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            need = self.bm.num_blocks_needed(seq, seq.num_computed_tokens + n)
            while not self.bm.can_allocate(need) and self.release_idle_session():
                pass
            if not self.bm.can_allocate(need) or (preempted_now and self.running):
                if fresh:
                    self.bm.free(seq)                      # give matched prefix blocks back (they stay cached)
                break
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def finish(self, seq: Sequence, keep_session: bool) -> None:
        """Take a finished turn out of the running set; a session keeps its blocks and goes idle."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if keep_session:
            seq.status = SequenceStatus.IDLE
            self.idle[seq.session_id] = seq
        else:
            self.bm.free(seq)
            seq.status = SequenceStatus.FINISHED

    def drop_idle(self, session_id) -> Sequence:
        seq = self.idle.pop(session_id)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        return seq

    def resume(self, seq: Sequence) -> None:
        """An idle session's new turn: it keeps its blocks and waits for its prefill."""
        del self.idle[seq.session_id]
        self.add(seq)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

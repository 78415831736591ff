"""Incremental detokenization that keeps spaces and never emits broken UTF-8, plus stop strings.

Each delta is the text of (context tokens + new tokens) minus the text of the context tokens, so a token that
starts with a space (SentencePiece "▁x", byte-level "Ġx") keeps it, and a multi-byte character split over
tokens is held back until it is complete (decode gives U+FFFD until then). Text that could be the start of a
stop string is held back too, so a stop string never leaks into the stream.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

_CONTEXT = 5   # prompt tokens decoded before the first output token, for its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.ids: List[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_context = len(self.ids)
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.text = ""            # all decoded output text (stop string removed once matched)
        self.num_sent = 0         # characters of self.text already returned
        self.stopped = False
        self.num_tokens_at_stop: Optional[int] = None

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.ids) - self.num_context

    def add(self, new_ids: Sequence[int]) -> str:
        """Feed new token ids; returns the text that may be sent now ("" if nothing yet)."""
        if self.stopped:
            return ""
        for t in new_ids:
            self.ids.append(t)
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                old_len = len(self.text)
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                if self.stop and self._match_stop(old_len):
                    break
        return self._take(final=self.stopped)

    def _match_stop(self, old_len: int) -> bool:
        longest = max(len(s) for s in self.stop)
        start = max(0, old_len - longest + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[:min(i for i, _ in hits)]
        self.stopped = True
        self.num_tokens_at_stop = self.num_output_tokens
        return True

    def _held_back(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.num_sent:
            return ""
        out = self.text[self.num_sent:end]
        self.num_sent = end
        return out

    def flush(self) -> str:
        """At the end of the request: whatever was held back for a stop string that never came."""
        return self._take(final=True)



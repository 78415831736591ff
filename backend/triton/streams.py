"""In-flight requests of one frontend instance: engine outputs -> text deltas -> Triton responses.

Runs on the EngineClient's I/O thread. All outputs that arrived since the last wake-up are merged per request
before anything is sent, so a stream whose engine runs ahead of the sender gets one response carrying all its
new text (coalescing) instead of falling further behind; the final response goes out as soon as it is known.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from ..engine.detokenizer import IncrementalDetokenizer
from ..engine.ipc import OutputRow
from .params import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class Stream:
    rid: str
    sender: object                       # pb_utils response sender
    req: GenerationRequest
    detok: IncrementalDetokenizer
    t_arrival: float
    t_last: Optional[float] = None
    text: str = ""                       # all text so far (non-stream answers)
    ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    num_ids_sent: int = 0
    stop_sent: bool = False


class StreamSet:
    def __init__(self, pb_utils, send_to_engine: Callable[[list], None], metrics, cancel_check_interval: float):
        self.pb = pb_utils
        self.send_to_engine = send_to_engine
        self.metrics = metrics
        self.cancel_check_interval = cancel_check_interval
        self.streams: Dict[str, Stream] = {}
        self.lock = threading.Lock()
        self.last_cancel_check = 0.0
        self.last_engine_message = time.monotonic()
        self.engine_proc = None           # set when this instance started the engine process

    def add(self, stream: Stream) -> None:
        with self.lock:
            self.streams[stream.rid] = stream

    def pop(self, rid: str) -> Optional[Stream]:
        with self.lock:
            return self.streams.pop(rid, None)

    # -- engine -> responses -----------------------------------------------------------------------------------
    def on_messages(self, msgs: List[list]) -> None:
        self.last_engine_message = time.monotonic()
        rows: Dict[str, List[OutputRow]] = {}
        for m in msgs:
            if m[0] == "out":
                for r in m[1]:
                    rows.setdefault(r[0], []).append(OutputRow(*r))
            elif m[0] == "stats" and self.metrics is not None:
                self.metrics.engine_stats(m[1])
        now = time.monotonic()
        for rid, group in rows.items():
            with self.lock:
                st = self.streams.get(rid)
            if st is not None:
                self._advance(st, group, now)

    def _advance(self, st: Stream, group: List[OutputRow], now: float) -> None:
        last = group[-1]
        new_ids = [t for r in group for t in r.new_token_ids]
        new_lps = [x for r in group for x in r.new_logprobs]
        if new_ids and self.metrics is not None:
            if st.t_last is None:
                self.metrics.first_token(now - st.t_arrival)
                self.metrics.tokens_out(len(new_ids))
            else:
                self.metrics.tokens_out(len(new_ids), (now - st.t_last) / len(new_ids))
            st.t_last = now
        if last.finished and last.error:
            self.pop(st.rid)
            self.send_error(st.sender, last.error)
            return
        delta = st.detok.add(new_ids)
        if st.detok.stopped and not st.stop_sent and not last.finished:
            self.send_to_engine(["stop", st.rid, st.detok.num_tokens_at_stop])
            st.stop_sent = True
        st.ids += new_ids
        st.logprobs += new_lps
        if st.detok.stopped:                 # tokens past a stop string are not part of the answer
            del st.ids[st.detok.num_tokens_at_stop:]
            del st.logprobs[st.detok.num_tokens_at_stop:]
        if last.finished:
            delta += st.detok.flush()
            self.pop(st.rid)
        st.text += delta
        if st.req.stream:
            if delta or last.finished:
                self._send(st, delta, last, final=last.finished)
        elif last.finished:
            prefix = st.req.text if (st.req.text and not st.req.exclude_input_in_output) else ""
            self._send(st, prefix + st.text, last, final=True)

    def _send(self, st: Stream, text: str, row: OutputRow, final: bool) -> None:
        pb = self.pb
        start = st.num_ids_sent if st.req.stream else 0
        ids, lps = st.ids[start:], (st.logprobs[start:] if st.req.params.logprobs else [])
        st.num_ids_sent = len(st.ids)
        reason = (row.finish_reason or "") if final else ""
        completion = row.completion_tokens if final else len(st.ids)
        tensors = [   # the leading 1 is Triton's batch dimension (max_batch_size > 0)
            pb.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb.Tensor("output_ids", np.array([ids], dtype=np.int32).reshape(1, -1)),
            pb.Tensor("finish_reason", np.array([[reason.encode()]], dtype=np.object_)),
            pb.Tensor("prompt_tokens", np.array([[row.prompt_tokens]], dtype=np.int32)),
            pb.Tensor("completion_tokens", np.array([[completion]], dtype=np.int32)),
            pb.Tensor("cached_tokens", np.array([[row.cached_tokens]], dtype=np.int32)),
            pb.Tensor("log_probs", np.array([lps], dtype=np.float32).reshape(1, -1)),
        ]
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            st.sender.send(pb.InferenceResponse(output_tensors=tensors), flags=flags)
        except Exception as e:   # noqa: BLE001 - a client gone mid-stream: stop generating for it
            log.info("lmtriton: response for %s could not be sent (%s); aborting it", st.rid, e)
            if not final and self.pop(st.rid) is not None:
                self.send_to_engine(["abort", st.rid])

    def send_error(self, sender, message: str) -> None:
        pb = self.pb
        try:
            sender.send(pb.InferenceResponse(error=pb.TritonError(message)),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:   # noqa: BLE001
            log.info("lmtriton: error response could not be sent: %s", e)

    def send_empty_final(self, sender, prompt_tokens: int = 0) -> None:
        pb = self.pb
        tensors = [pb.Tensor("text_output", np.array([[b""]], dtype=np.object_)),
                   pb.Tensor("output_ids", np.zeros((1, 0), dtype=np.int32)),
                   pb.Tensor("finish_reason", np.array([[b"stop"]], dtype=np.object_)),
                   pb.Tensor("prompt_tokens", np.array([[prompt_tokens]], dtype=np.int32)),
                   pb.Tensor("completion_tokens", np.array([[0]], dtype=np.int32)),
                   pb.Tensor("cached_tokens", np.array([[0]], dtype=np.int32)),
                   pb.Tensor("log_probs", np.zeros((1, 0), dtype=np.float32))]
        sender.send(pb.InferenceResponse(output_tensors=tensors), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    # -- periodic: cancellation, engine liveness, metrics --------------------------------------------------------
    def on_tick(self) -> None:
        now = time.monotonic()
        if now - self.last_cancel_check >= self.cancel_check_interval:
            self.last_cancel_check = now
            with self.lock:
                streams = list(self.streams.values())
            for st in streams:
                if st.sender.is_cancelled() and self.pop(st.rid) is not None:
                    self.send_to_engine(["abort", st.rid])
                    try:
                        st.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    except Exception:   # noqa: BLE001 - already closed by Triton
                        pass
            self._check_engine(now, streams)
        if self.metrics is not None:
            self.metrics.flush()

    def _check_engine(self, now: float, streams: List[Stream]) -> None:
        if not streams:
            return
        dead = self.engine_proc is not None and self.engine_proc.poll() is not None
        silent = now - max(self.last_engine_message, max(st.t_arrival for st in streams)) > 120.0
        if not (dead or silent):
            return
        why = (f"the engine process exited with code {self.engine_proc.returncode}" if dead
               else "the engine process has not answered for 120 s")
        with self.lock:
            streams, self.streams = list(self.streams.values()), {}
        for st in streams:
            self.send_error(st.sender, why)
        if streams:
            log.error("lmtriton: %s; failed %d requests", why, len(streams))

"""The engine process: LLMEngine.step() in a loop behind a ZMQ ROUTER socket (msgpack messages).

Frontends (Triton model instances, possibly of several models) connect DEALER sockets; each message is a list:
  in:  ["hello"] · ["bye"] · ["add", rid, prompt_ids, sampling dict, session_id, start, end] · ["abort", rid]
       ["stop", rid, num_output_tokens] · ["end_session", session_id]
  out: ["hello", info] · ["out", [output row, ...]] (one message per client per step) · ["stats", dict]
An output row is [rid, new_ids, new_logprobs, finished, finish_reason, error, prompt_tokens, completion_tokens,
cached_tokens, prefilled_tokens]. The process exits when its last frontend says bye, or when the process that
owns it (tritonserver, --watch-pid) is gone.

    python -m backend.engine.core --addr ipc:///tmp/x.ipc --config '{"model": "...", ...}' --watch-pid 123
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List

import zmq

from ..config import EngineConfig, SamplingParams
from .engine import LLMEngine, RequestOutput
from .ipc import error_row, pack, unpack

log = logging.getLogger("lmtriton.engine")

STATS_INTERVAL = 0.25      # seconds between stats broadcasts
IDLE_POLL_MS = 100


def output_row(o: RequestOutput) -> list:
    return [o.request_id, o.new_token_ids, o.new_logprobs, o.finished, o.finish_reason, o.error, o.prompt_tokens,
            o.completion_tokens, o.cached_tokens, o.prefilled_tokens]


class EngineCore:
    def __init__(self, engine: LLMEngine, addr: str, watch_pid: int = 0):
        self.engine = engine
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)    # a vanished frontend's messages are dropped
        self.sock.bind(addr)
        self.addr = addr
        self.watch_pid = watch_pid
        self.clients: set = set()
        self.had_clients = False
        self.owner: Dict[object, bytes] = {}              # request id -> frontend identity
        self.last_stats = 0.0
        self.last_watch = time.monotonic()

    # -- messages in -------------------------------------------------------------------------------------------
    def handle(self, ident: bytes, msg: list) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, ids, sp, sid, start, end = msg
            self.owner[rid] = ident
            try:
                self.engine.add_request(rid, ids, SamplingParams.from_dict(sp), session_id=sid,
                                        session_start=bool(start), session_end=bool(end))
            except ValueError as e:               # SessionError included: the message names the problem
                self.owner.pop(rid, None)
                self.send(ident, ["out", [error_row(rid, str(e))]])
        elif kind == "abort":
            self.engine.abort(msg[1])
        elif kind == "stop":
            self.engine.stop_request(msg[1], msg[2])
        elif kind == "end_session":
            self.engine.end_session(msg[1])
        elif kind == "hello":
            self.clients.add(ident)
            self.had_clients = True
            self.send(ident, ["hello", {"pid": os.getpid(), "vocab_size": self.engine.model_cfg.vocab_size,
                                        "session_len": self.engine.config.session_len}])
            self.send(ident, ["stats", self.engine.stats()])
        elif kind == "bye":
            self.clients.discard(ident)
        else:
            log.warning("engine: unknown message %r", kind)

    def send(self, ident: bytes, msg) -> None:
        self.sock.send_multipart([ident, pack(msg)], copy=False)

    def drain(self, timeout_ms: int) -> None:
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                ident, data = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(ident, unpack(data))

    # -- the loop ----------------------------------------------------------------------------------------------
    def step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:   # noqa: BLE001 - a broken step must not hang every stream: fail them all
            log.exception("engine step failed")
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
            outputs = [RequestOutput(o.request_id, finished=True, finish_reason="error",
                                     error=f"engine step failed: {e}") for o in self.engine.pending]
            self.engine.pending.clear()
        by_client: Dict[bytes, List[list]] = {}
        for o in outputs:
            ident = self.owner.get(o.request_id)
            if ident is None:
                continue
            by_client.setdefault(ident, []).append(output_row(o))
            if o.finished:
                del self.owner[o.request_id]
        for ident, rows in by_client.items():
            self.send(ident, ["out", rows])

    def broadcast_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_stats >= STATS_INTERVAL:
            self.last_stats = now
            msg = ["stats", self.engine.stats()]
            for ident in self.clients:
                self.send(ident, msg)

    def should_stop(self) -> bool:
        if self.had_clients and not self.clients:
            log.info("engine: last frontend left, stopping")
            return True
        now = time.monotonic()
        if self.watch_pid and now - self.last_watch > 1.0:
            self.last_watch = now
            try:
                os.kill(self.watch_pid, 0)
            except ProcessLookupError:
                log.warning("engine: process %d is gone, stopping", self.watch_pid)
                return True
        return False

    def run(self) -> None:
        busy_before = False
        while not self.should_stop():
            busy = self.engine.has_unfinished()
            self.drain(0 if busy else IDLE_POLL_MS)
            if self.engine.has_unfinished():
                self.step()
                busy = True
            self.broadcast_stats(force=busy_before and not busy)   # idle values at once after the last request
            busy_before = busy
        self.close()

    def close(self) -> None:
        self.engine.close()
        self.sock.close(linger=0)
        self.ctx.term()
        if self.addr.startswith("ipc://"):
            try:
                os.unlink(self.addr[len("ipc://"):])
            except OSError:
                pass


def build_engine(config: dict) -> LLMEngine:
    """config: EngineConfig fields plus optional 'tokenizer_dir' (its EOS and chat turn-end tokens stop too)."""
    config = dict(config)
    tokenizer_dir = config.pop("tokenizer_dir", None)
    engine = LLMEngine(EngineConfig.from_dict(config))
    if tokenizer_dir:
        from ..llm import load_tokenizer, stop_token_ids
        engine.runner.eos_ids = stop_token_ids(load_tokenizer(tokenizer_dir), engine.runner.eos_ids)
    return engine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lmtriton engine process")
    ap.add_argument("--addr", required=True, help="ZMQ address to bind, e.g. ipc:///tmp/lmtriton-x.ipc")
    ap.add_argument("--config", required=True, help="JSON: EngineConfig fields (+ tokenizer_dir)")
    ap.add_argument("--watch-pid", type=int, default=0, help="exit when this process is gone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LMTRITON_LOG", "INFO"),
                        format="%(asctime)s engine %(levelname)s %(message)s")
    engine = build_engine(json.loads(args.config))
    core = EngineCore(engine, args.addr, args.watch_pid)
    log.info("engine: serving on %s (pid %d)", args.addr, os.getpid())
    core.run()                      # closes the engine (tp workers stopped, bounded) and the socket
    # the process has nothing left to do: skip the interpreter's teardown, where a tp=2 engine whose NCCL teardown
    # timed out lingered on the GPUs after tritonserver had stopped (2 x H200, 2026-11-22)
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

"""A frontend's connection to the engine process, and starting that process once per model repository.

Every Triton model instance (several instances of the stateless model, and the session model) owns one
EngineClient: a DEALER socket driven by one I/O thread. Other threads hand it messages through an inproc queue,
because ZMQ sockets must not be shared between threads. The first instance to load starts the engine process
under a file lock; the others find it through the same address and just say hello.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional

import zmq

from ..engine.ipc import pack, unpack

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]   # the project root: the engine process imports `backend` from here


def engine_address(engine_model_dir, server_pid: int) -> str:
    """One engine per (model directory, tritonserver process): both models and all instances derive the same."""
    key = f"{os.path.realpath(engine_model_dir)}:{server_pid}"
    return f"ipc:///tmp/lmtriton-{hashlib.sha1(key.encode()).hexdigest()[:16]}.ipc"


class EngineClient:
    def __init__(self, addr: str, on_messages: Callable[[List[list]], None], on_tick: Callable[[], None],
                 tick_s: float = 0.05):
        self.addr = addr
        self.on_messages, self.on_tick, self.tick_ms = on_messages, on_tick, int(tick_s * 1000)
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, uuid.uuid4().hex.encode())
        self.dealer.setsockopt(zmq.SNDHWM, 0)
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        self.dealer.setsockopt(zmq.LINGER, 1000)
        self.dealer.connect(addr)
        inproc = f"inproc://to-engine-{id(self)}"
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(inproc)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(inproc)
        self.push_lock = threading.Lock()
        self.hello_info: Optional[dict] = None
        self.hello_event = threading.Event()
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="lmtriton-engine-io", daemon=True)
        self.thread.start()

    def send(self, msg: list) -> None:
        """Thread-safe: queue a message for the engine."""
        with self.push_lock:
            self.push.send(pack(msg))

    def hello(self, timeout: float, proc: Optional[subprocess.Popen] = None) -> Optional[dict]:
        """Say hello and wait for the engine's answer; None on timeout. Fails early if `proc` exits."""
        self.hello_event.clear()
        self.send(["hello"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.hello_event.wait(0.2):
                return self.hello_info
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the engine process exited with code {proc.returncode} while starting "
                                   f"(its log is in tritonserver's output)")
        return None

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        while self.running:
            events = dict(poller.poll(self.tick_ms))
            if self.pull in events:
                while True:
                    try:
                        self.dealer.send(self.pull.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.dealer in events:
                msgs = []
                while True:       # drain: a stream's tokens that piled up go out as one response
                    try:
                        msgs.append(unpack(self.dealer.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
                for m in msgs:
                    if m[0] == "hello":
                        self.hello_info = m[1]
                        self.hello_event.set()
                try:
                    self.on_messages(msgs)
                except Exception:   # noqa: BLE001 - the I/O thread must survive a bug in one response
                    log.exception("lmtriton frontend: handling engine messages failed")
            try:
                self.on_tick()
            except Exception:   # noqa: BLE001
                log.exception("lmtriton frontend: periodic check failed")

    def close(self) -> None:
        try:
            self.send(["bye"])
            time.sleep(0.1)        # let the I/O thread forward it
        finally:
            self.running = False
            self.thread.join(timeout=5)
            for s in (self.push, self.pull, self.dealer):
                s.close()
            self.ctx.term()


def start_engine(client: EngineClient, lock_path: str, config: dict, engine_python: str, watch_pid: int,
                 timeout: float) -> Optional[subprocess.Popen]:
    """Connect to the engine at client.addr, starting it first if nobody has; returns the process if we did."""
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if client.hello(timeout=1.0) is not None:
            return None
        python = engine_python or os.environ.get("ENGINE_PYTHON") or shutil.which("python3") or sys.executable
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [python, "-m", "backend.engine.core", "--addr", client.addr, "--config", json.dumps(config),
               "--watch-pid", str(watch_pid)]
        log.info("lmtriton: starting the engine process: %s", " ".join(cmd[:3]))
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, start_new_session=True)
        if client.hello(timeout=timeout, proc=proc) is None:
            proc.kill()
            raise RuntimeError(f"the engine process did not answer within engine_start_timeout={timeout:g}s")
        return proc

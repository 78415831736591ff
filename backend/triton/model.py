"""TritonPythonModel: the thin frontend of lmtriton (decoupled; one engine process behind all instances).

initialize: read config.pbtxt parameters, load the tokenizer, connect to the engine process (the stateless
model's first instance starts it). execute: validate and tokenize each request, hand it to the engine, return
None; responses are sent by the I/O thread (backend/triton/streams.py). finalize: say bye; the engine process
stops when its last frontend has left.

Two models share this class: the stateless one (sessions through the session_id / session_start / session_end
inputs, for HTTP users) and the sequence-batched one (sessions through Triton's CORRID / START / END).
"""
from __future__ import annotations

import itertools
import json
import os
import time
import uuid

import triton_python_backend_utils as pb_utils

from ..engine.detokenizer import IncrementalDetokenizer
from .engine_client import EngineClient, engine_address, start_engine
from .metrics import Metrics
from .params import InputError, engine_config_from_parameters, parse_request
from .streams import Stream, StreamSet
from .tokenizer import TextTokenizer

_FLAG_START, _FLAG_END = 1, 2        # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END
class TritonPythonModel:
    def initialize(self, args):
        self.log = pb_utils.Logger
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = args["model_repository"]
        self.sequence_batching = "sequence_batching" in config
        engine_model = params.get("engine_model", self.name) if self.sequence_batching else self.name
        engine_dir = os.path.join(os.path.dirname(model_dir), engine_model) if self.sequence_batching else model_dir
        self.default_max_tokens = int(params.get("default_max_tokens", 256))
        self.tokenizer = TextTokenizer(os.path.normpath(os.path.join(model_dir, params["tokenizer_dir"])))
        self.metrics = Metrics(pb_utils, self.name, engine_model)
        server_pid = os.getppid()                   # the stub's parent is tritonserver
        addr = engine_address(engine_dir, server_pid)
        self.streams = StreamSet(pb_utils, self._to_engine, self.metrics,
                                 float(params.get("cancel_check_interval", 0.1)))
        self.client = EngineClient(addr, self.streams.on_messages, self.streams.on_tick)
        self._ids = itertools.count()
        self._prefix = f"{self.name}-{uuid.uuid4().hex[:8]}"
        if self.sequence_batching:                  # the stateless model starts the engine; register lazily
            self.client.send(["hello"])
        else:
            engine_cfg = engine_config_from_parameters(params, model_dir)
            engine_cfg["tokenizer_dir"] = os.path.normpath(os.path.join(model_dir, params["tokenizer_dir"]))
            self.streams.engine_proc = start_engine(
                self.client, addr[len("ipc://"):] + ".lock", engine_cfg, params.get("engine_python", ""),
                server_pid, float(params.get("engine_start_timeout", 600)))
        self.log.log_info(f"lmtriton: model {self.name} ready (engine {addr}, "
                          f"{'sequence batching' if self.sequence_batching else 'stateless'})")

    def _to_engine(self, msg: list) -> None:
        self.client.send(msg)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except InputError as e:
                self.streams.send_error(sender, f"{self.name}: {e}")
            except Exception as e:   # noqa: BLE001 - one bad request must not fail its neighbours
                self.log.log_error(f"lmtriton: request failed: {e!r}")
                self.streams.send_error(sender, f"{self.name}: internal error: {e}")
        return None

    def _session_controls(self, request):
        if not self.sequence_batching:
            return {}
        corrid = request.correlation_id()
        if isinstance(corrid, str):
            if not corrid.isdigit():
                raise InputError(f"sequence_id must be an unsigned integer for this model, got {corrid!r}")
            corrid = int(corrid)
        flags = request.flags()
        return {"session_id": corrid, "session_start": bool(flags & _FLAG_START),
                "session_end": bool(flags & _FLAG_END)}

    def _submit(self, request, sender) -> None:
        t_arrival = time.monotonic()

        def get(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        req = parse_request(get, self.default_max_tokens, **self._session_controls(request))
        if req.is_empty:              # a session END without a new turn
            self._to_engine(["end_session", req.session_id])
            self.streams.send_empty_final(sender)
            return
        if req.input_ids is not None:
            ids = req.input_ids
        else:   # a continuation extends a history that already has its BOS
            ids = self.tokenizer.encode(req.text, add_special_tokens=not req.is_continuation)
        rid = f"{self._prefix}-{next(self._ids)}"
        detok = IncrementalDetokenizer(self.tokenizer, ids, req.stop)
        self.streams.add(Stream(rid, sender, req, detok, t_arrival))
        self._to_engine(["add", rid, ids, req.params.to_dict(), req.session_id, req.session_start, req.session_end])

    def finalize(self):
        self.client.close()
        proc = self.streams.engine_proc
        if proc is not None:   # it exits once every frontend has said bye, or when tritonserver is gone
            try:
                proc.wait(timeout=2)
            except Exception:   # noqa: BLE001 - other frontends still use it: it outlives this instance
                pass
        with self.streams.lock:       # nothing may touch a response sender once the stub tears down
            self.streams.streams.clear()
        self.metrics.flush(force=True)

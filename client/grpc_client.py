"""gRPC streaming clients of the served LLM: `GrpcClient` (threads) and `AsyncGrpcClient` (asyncio).

Both send one request on Triton's bidirectional ModelStreamInfer stream and yield a `Delta` per response. The
empty final response Triton sends when asked (`triton_enable_empty_final_response`) marks the end, so a stream
ends exactly when the model says so. Sessions go to the sequence-batched model with Triton's sequence controls
(sequence_id, START, END). Leaving a stream early, or `cancel()`, cancels the request in the server.

    with GrpcClient("localhost:8001", model="llm") as c:
        for d in c.stream("Hello", max_tokens=16, temperature=0.0):
            print(d.text, end="")
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import AsyncIterator, Dict, Iterator, List, Optional, Union

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from client.protocol import Delta, Generation, ModelInterface, TritonError

logger = logging.getLogger(__name__)
Prompt = Union[str, List[int]]
_CANCELLED = object()


def _infer_inputs(arrays: Dict[str, np.ndarray]) -> List[grpcclient.InferInput]:
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def _as_error(err: Exception) -> TritonError:
    if isinstance(err, TritonError):
        return err
    if isinstance(err, InferenceServerException):
        return TritonError(err.message() or str(err), err.status())
    if isinstance(err, grpc.RpcError):
        return TritonError(err.details() or str(err), str(err.code()))
    return TritonError(str(err))


def _parse(result) -> tuple:
    """(delta or None, is_final) of one stream response."""
    response = result.get_response()
    final = response.parameters["triton_final_response"].bool_param \
        if "triton_final_response" in response.parameters else False
    delta = Delta.from_outputs(result.as_numpy) if len(response.outputs) else None
    return delta, final


class GrpcClient:
    """One connection to tritonserver; one stream at a time (use a client per thread for concurrency)."""

    def __init__(self, url: str = "localhost:8001", model: str = "llm", session_model: Optional[str] = None,
                 timeout: Optional[float] = 600.0):
        self.url, self.model, self.timeout = url, model, timeout
        self.session_model = session_model or model
        self.client = grpcclient.InferenceServerClient(url)
        self._interfaces: Dict[str, ModelInterface] = {}
        self._queue: Optional[queue.Queue] = None
        self._cancelled = False
        self._lock = threading.Lock()

    def interface(self, model: str) -> ModelInterface:
        if model not in self._interfaces:
            try:
                config = self.client.get_model_config(model, as_json=True)
            except InferenceServerException as e:
                raise _as_error(e) from None
            self._interfaces[model] = ModelInterface.from_config(config)
        return self._interfaces[model]

    def is_ready(self) -> bool:
        try:
            return self.client.is_server_ready() and self.client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    def stream(self, prompt: Prompt, *, session_id: int = 0, session_start: bool = False,
               session_end: bool = False, request_id: str = "", **params) -> Iterator[Delta]:
        """Yield the answer's deltas; a session turn when session_id is given. Raises TritonError."""
        model = self.session_model if session_id else self.model
        iface = self.interface(model)
        inputs = _infer_inputs(iface.arrays(iface.request_values(prompt, True, params)))
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this GrpcClient already has a stream open; use one client per concurrent stream")
        q: queue.Queue = queue.Queue()
        self._queue, self._cancelled, finished = q, False, False
        try:
            self.client.start_stream(callback=lambda result, error: q.put((result, error)))
            self.client.async_stream_infer(model, inputs, request_id=request_id, sequence_id=session_id,
                                           sequence_start=session_start, sequence_end=session_end,
                                           enable_empty_final_response=True)
            while True:
                try:
                    item = q.get(timeout=self.timeout)
                except queue.Empty:
                    raise TritonError(f"no response from {self.url} within {self.timeout} s") from None
                if item is _CANCELLED:
                    finished = True
                    return
                result, error = item
                if error is not None:
                    finished = True
                    if self._cancelled:               # "Locally cancelled": cancel() ended this stream
                        return
                    raise _as_error(error)
                delta, finished = _parse(result)
                if delta is not None:
                    yield delta
                if finished:
                    return
        finally:
            self._queue = None
            try:
                if not self._cancelled:               # cancel() has stopped the stream already
                    self.client.stop_stream(cancel_requests=not finished)
            finally:
                self._lock.release()

    def generate(self, prompt: Prompt, **kwargs) -> Generation:
        return Generation.join(list(self.stream(prompt, **kwargs)))

    def cancel(self) -> None:
        """Cancel the stream in flight (from another thread); the stream's iterator then ends."""
        q = self._queue
        if q is not None:
            self._cancelled = True
            q.put(_CANCELLED)
            self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGrpcClient:
    """asyncio client: any number of concurrent streams over one channel (used by the OpenAI gateway)."""

    def __init__(self, url: str = "localhost:8001", timeout: Optional[float] = 600.0):
        self.url, self.timeout = url, timeout
        self.client = grpcaio.InferenceServerClient(url)
        self._interfaces: Dict[str, ModelInterface] = {}

    async def interface(self, model: str) -> ModelInterface:
        if model not in self._interfaces:
            try:
                config = await self.client.get_model_config(model, as_json=True)
            except (InferenceServerException, grpc.RpcError) as e:
                raise _as_error(e) from None
            self._interfaces[model] = ModelInterface.from_config(config)
        return self._interfaces[model]

    async def is_ready(self, model: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(model))
        except (InferenceServerException, grpc.RpcError):
            return False

    async def stream(self, model: str, prompt: Prompt, *, request_id: str = "", **params) -> AsyncIterator[Delta]:
        """Yield the answer's deltas. Closing the iterator early (or cancelling its task) cancels the request."""
        iface = await self.interface(model)
        inputs = _infer_inputs(iface.arrays(iface.request_values(prompt, True, params)))
        request = {"model_name": model, "inputs": inputs, "request_id": request_id,
                   "parameters": {"triton_enable_empty_final_response": True}}

        async def requests():
            yield request

        try:
            responses = self.client.stream_infer(requests(), stream_timeout=self.timeout)
        except (InferenceServerException, grpc.RpcError) as e:
            raise _as_error(e) from None
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise _as_error(error)
                delta, finished = _parse(result)
                if delta is not None:
                    yield delta
                if finished:
                    return
            finished = True
            raise TritonError("the stream closed before the final response")
        except grpc.RpcError as e:
            finished = True
            raise _as_error(e) from None
        finally:
            if not finished:
                logger.info("cancelling request %r", request_id)
                responses.cancel()

    async def generate(self, model: str, prompt: Prompt, **kwargs) -> Generation:
        gen = Generation()
        async for delta in self.stream(model, prompt, **kwargs):
            gen.add(delta)
        return gen

    async def close(self) -> None:
        await self.client.close()

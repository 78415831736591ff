"""`lmtriton serve openai`: an OpenAI-compatible HTTP gateway in front of tritonserver (gRPC streaming).

    lmtriton serve openai --triton localhost:8001 --model llm --tokenizer workspace/tokenizer --port 23333
    curl localhost:23333/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"model": "llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream true: server-sent events
ending in `data: [DONE]`), GET /health, and the web chat page at / (client/web.py). Chat prompts are rendered
with the model's chat template. No second engine: every request is one Triton stream, cancelled when the HTTP
client goes away. Errors are OpenAI error objects: 400 bad parameter, 401 bad API key, 404 unknown model,
503 Triton unreachable.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from client import openai_protocol as proto
from client.grpc_client import AsyncGrpcClient
from client.protocol import Delta, Generation, TritonError
from client.template import ChatFormatter

logger = logging.getLogger(__name__)


class Gateway:
    """What the routes share: the Triton client, the served model's names, its chat template, the API key."""

    def __init__(self, triton_url: str, model: str, tokenizer_dir: str, served_name: Optional[str] = None,
                 api_key: Optional[str] = None):
        self.triton_url, self.model = triton_url, model
        self.served_name = served_name or model
        self.api_key = api_key
        self.formatter = ChatFormatter(tokenizer_dir)
        self.client: Optional[AsyncGrpcClient] = None
        self.created = int(time.time())

    def check_auth(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise proto.APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                 code="invalid_api_key")

    def prompt_text(self, req: proto.GenerateRequest):
        if req.kind == "completion":
            return req.prompt
        try:
            return self.formatter.render(req.prompt)
        except ValueError as e:
            raise proto.bad("messages", str(e)) from None
        except Exception as e:                    # a template that rejects this conversation (e.g. role order)
            raise proto.bad("messages", f"the model's chat template rejected the messages: {e}") from None

    async def deltas(self, req: proto.GenerateRequest, rid: str) -> AsyncIterator[Delta]:
        if req.model != self.served_name:
            raise proto.APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                      f"{self.served_name!r}", param="model", code="model_not_found")
        prompt = self.prompt_text(req)
        try:
            async for delta in self.client.stream(self.model, prompt, request_id=rid, **req.sampling):
                yield delta
        except ValueError as e:                  # an input the model does not declare, a value of a wrong type
            raise proto.APIError(400, str(e)) from None
        except TritonError as e:
            if e.is_unavailable:
                raise proto.APIError(503, f"tritonserver at {self.triton_url} is unavailable: {e}",
                                     code="triton_unavailable") from None
            raise proto.APIError(400, str(e), code="rejected_by_model") from None

    def logprobs(self, req: proto.GenerateRequest, delta_or_gen, offset: int = 0):
        if not req.logprobs:
            return None
        tokens = self.formatter.token_texts(delta_or_gen.token_ids)
        return proto.logprobs_object(req.kind, tokens, delta_or_gen.logprobs, offset)


def error_response(err: proto.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(gw: Gateway, req, rid: str, request: Request) -> Generation:
    """The whole answer; the Triton request is cancelled if the HTTP client disconnects first."""
    gen = Generation()

    async def run():
        async for delta in gw.deltas(req, rid):
            gen.add(delta)

    task = asyncio.ensure_future(run())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            task.result()                           # re-raises the request's error, if any
            return gen
        if await request.is_disconnected():
            logger.info("client of %s disconnected; cancelling", rid)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return gen


async def _stream(gw: Gateway, req, rid: str) -> StreamingResponse:
    """Start the Triton stream first, so that errors before the first token get a proper HTTP status."""
    deltas = gw.deltas(req, rid)
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        first = Delta(finish_reason="stop")

    async def events():
        gen, delta, offset, created = Generation(), first, 0, int(time.time())
        try:
            while delta is not None:
                gen.add(delta)
                reason = proto.finish_reason(delta.finish_reason) if delta.finish_reason else None
                choice = proto.choice(req.kind, delta.text, reason, gw.logprobs(req, delta, offset), chunk=True,
                                      first=delta is first)
                offset += len(delta.text)
                yield sse(proto.response(req.kind, rid, req.model, [choice], chunk=True, created=created))
                delta = await deltas.__anext__() if not delta.finish_reason else None
            if req.include_usage:
                yield sse(proto.response(req.kind, rid, req.model, [], chunk=True, usage_=proto.usage(gen),
                                         created=created))
        except StopAsyncIteration:
            pass
        except proto.APIError as e:
            yield sse(e.body())
        finally:
            await deltas.aclose()               # cancels the Triton request if the HTTP client went away
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(gw: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        gw.client = AsyncGrpcClient(gw.triton_url)   # the gRPC channel belongs to the server's event loop
        yield
        await gw.client.close()

    app = FastAPI(title="lmtriton OpenAI-compatible API", lifespan=lifespan)
    app.state.gateway = gw

    @app.exception_handler(proto.APIError)
    async def api_error(request, err: proto.APIError):
        return error_response(err)

    @app.get("/health")
    async def health():
        ready = await gw.client.is_ready(gw.model)
        return JSONResponse({"triton_ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        gw.check_auth(request)
        card = {"id": gw.served_name, "object": "model", "created": gw.created, "owned_by": "lmtriton"}
        return {"object": "list", "data": [card]}

    async def generate(kind: str, request: Request):
        gw.check_auth(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise proto.APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = proto.parse_request(kind, body)
        rid = proto.new_id(kind)
        if req.stream:
            return await _stream(gw, req, rid)
        gen = await _collect(gw, req, rid, request)
        choice = proto.choice(kind, gen.text, proto.finish_reason(gen.finish_reason), gw.logprobs(req, gen),
                              chunk=False)
        return proto.response(kind, rid, req.model, [choice], chunk=False, usage_=proto.usage(gen))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate("chat", request)

    from client.web import mount_web
    mount_web(app)
    return app


def build_parser(prog: str = "lmtriton serve openai") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--triton", default="localhost:8001", help="tritonserver gRPC address")
    p.add_argument("--model", default="llm", help="the Triton model to call (the stateless one)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--tokenizer", default="workspace/tokenizer", help="tokenizer directory with the chat template")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=23333)
    p.add_argument("--api-key", default=os.environ.get("LMTRITON_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $LMTRITON_API_KEY, none if unset)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv=None, prog: str = "lmtriton serve openai") -> int:
    import uvicorn
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        gw = Gateway(args.triton, args.model, args.tokenizer, args.served_model_name, args.api_key)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"{prog}: {e}\n")
        return 2
    logger.info("OpenAI API on http://%s:%d/v1 (web chat at http://%s:%d/) -> tritonserver %s model %s",
                args.host, args.port, args.host, args.port, args.triton, args.model)
    uvicorn.run(create_app(gw), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

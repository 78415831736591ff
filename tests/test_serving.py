"""The real tritonserver serving SmolLM2 on CPU: streaming over gRPC and HTTP, concurrency, cancellation, one
engine behind every frontend instance, and a clear error for each bad input."""
from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from backend.config import SamplingParams
from tests.serving_util import (SESSION_LEN, grpc_stream, grpc_stream_many, http_generate_stream, inputs, metric,
                                served)  # noqa: F401 - served is a fixture

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPT = "The capital of France is"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def expected(demo_llm):
    """Greedy answers of the in-process engine: PROMPT, and 16 prompts for the concurrency test."""
    prompts = [PROMPT] + [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)]
    outs = demo_llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return prompts, [o.text for o in outs]


def test_grpc_stream_equals_in_process_engine(served, expected):
    res = grpc_stream(served.grpc_url, text_input=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
    assert res.error is None
    assert res.text == expected[1][0]
    assert res.responses >= 2                          # streamed, not one final blob
    assert res.finish_reason in ("length", "stop")
    assert res.completion_tokens == len(res.ids) <= MAX_TOKENS
    assert res.prompt_tokens == 5                      # "The capital of France is"


def test_http_generate_stream_equals_in_process_engine(served, expected):
    res = http_generate_stream(served.http_url, text_input=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                               stream=True)
    assert res.error is None
    assert res.text == expected[1][0]
    assert res.responses >= 2


def test_http_generate_non_stream_includes_the_prompt_unless_excluded(served, expected):
    body = {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    for exclude, want in ((False, PROMPT + expected[1][0]), (True, expected[1][0])):
        req = urllib.request.Request(f"http://{served.http_url}/v2/models/llm/generate",
                                     data=json.dumps({**body, "exclude_input_in_output": exclude}).encode())
        out = json.loads(urllib.request.urlopen(req, timeout=600).read())
        assert out["text_output"] == want


def test_16_concurrent_streams(served, expected):
    prompts, texts = expected[0][1:], expected[1][1:]
    reqs = [("llm", inputs(text_input=p, max_tokens=MAX_TOKENS, temperature=0.0, stream=True), {}) for p in prompts]
    results = grpc_stream_many(served.grpc_url, reqs)
    assert [r.error for r in results] == [None] * 16
    assert [r.text for r in results] == texts


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)
    return cond()


def test_cancel_mid_stream_frees_kv_blocks(served):
    time.sleep(1.0)                    # let the engine's idle stats reach the metrics port
    idle = metric(served, "lmtriton_kv_blocks_used")
    client = grpcclient.InferenceServerClient(served.grpc_url)
    got = []
    client.start_stream(callback=lambda result, error: got.append((result, error)))
    client.async_stream_infer("llm", inputs(text_input="Tell me a long story about a dragon.", max_tokens=400,
                                            ignore_eos=True, stream=True))
    assert _wait_for(lambda: len(got) >= 1, 300) and got[0][1] is None
    assert _wait_for(lambda: metric(served, "lmtriton_kv_blocks_used") > idle, 30)   # it holds blocks now
    client.stop_stream(cancel_requests=True)
    assert _wait_for(lambda: metric(served, "lmtriton_kv_blocks_used") == idle, 60)
    assert metric(served, "lmtriton_requests_running") == 0
    assert len(got) < 400


def test_http_stream_client_leaving_cancels_the_request(served):
    """Triton's HTTP frontend cancels a generate_stream request whose connection closed; the backend stops it."""
    host, port = served.http_url.rsplit(":", 1)
    body = json.dumps({"text_input": "Tell me a long story about a dragon.", "max_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    before = metric(served, "lmtriton_generated_tokens_total")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v2/models/llm/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while data.count(b"data:") < 3:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        assert _wait_for(lambda: metric(served, "lmtriton_requests_running") == 1, 10)
    assert _wait_for(lambda: metric(served, "lmtriton_requests_running") == 0, 20)
    time.sleep(1.0)                                  # the token counter is flushed every 0.25 s
    assert 3 <= metric(served, "lmtriton_generated_tokens_total") - before < 400


def test_instances_share_one_engine_process(served):
    cmdlines = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines.append(p.read_bytes().split(b"\0"))
        except OSError:
            pass
    engines = [c for c in cmdlines if b"backend.engine.core" in c and str(served.proc.pid).encode() in c]
    assert len(engines) == 1, engines


BAD = [
    ("missing text_input", dict(max_tokens=4), "text_input is required"),
    ("max_tokens 0", dict(text_input="hi", max_tokens=0), "max_tokens must be >= 1"),
    ("max_tokens -1", dict(text_input="hi", max_tokens=-1), "max_tokens must be >= 1"),
    ("temperature -1", dict(text_input="hi", temperature=-1.0), "temperature must be >= 0"),
    ("top_p 2", dict(text_input="hi", top_p=2.0), "top_p must be <= 1"),
    ("invalid UTF-8", dict(text_input=b"caf\xc3\x28 \xff"), "text_input is not valid UTF-8"),
    ("prompt over session_len", dict(text_input="hello " * (SESSION_LEN + 10)), f"session_len={SESSION_LEN}"),
    ("unknown session", dict(text_input="hi", session_id=np.array([[987654]], dtype=np.uint64)),
     "session 987654 is unknown"),
    ("wrong dtype", dict(text_input="hi", max_tokens=np.array([[4.0]], dtype=np.float32)), "max_tokens"),
]


@pytest.mark.parametrize("what,values,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_a_clear_error_and_server_stays_ready(served, what, values, message):
    res = grpc_stream(served.grpc_url, **values)
    assert res.error is not None and message in res.error, res.error
    assert served.is_ready()


def test_continuation_of_unknown_sequence_is_refused(served):
    res = grpc_stream(served.grpc_url, model="llm_session", text_input="hi", sequence_id=424242,
                      sequence_start=False)
    assert res.error is not None and "START" in res.error
    assert served.is_ready()


def test_metrics_are_exported(served):
    for name in ("lmtriton_time_to_first_token_seconds_count", "lmtriton_inter_token_latency_seconds_count",
                 "lmtriton_generated_tokens_total", "lmtriton_requests_waiting", "lmtriton_kv_blocks_total",
                 "lmtriton_prefix_cache_hits"):
        metric(served, name)
    assert metric(served, "lmtriton_time_to_first_token_seconds_count") >= 1
    assert metric(served, "lmtriton_generated_tokens_total") >= MAX_TOKENS

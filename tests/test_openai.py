"""The OpenAI-compatible gateway against the real tritonserver + SmolLM2, driven by the official `openai` client."""
from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from client.grpc_client import GrpcClient
from client.openai_protocol import APIError, parse_request
from client.template import ChatFormatter
from tests.gateway import run_gateway
from tests.serving import triton_server  # noqa: F401  (module-scoped server fixture)
from tests.serving_util import metric

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"
N = 8
pytestmark = [pytest.mark.server, pytest.mark.slow]


# --- request validation (no server) ---------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"model": "llm", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "llm", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "llm", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "llm", "prompt": "x", "n": 2}, "n"),
    ({"model": "llm", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "llm", "prompt": ""}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "llm", "prompt": "x", "stream": "yes"}, "stream"),
])
def test_bad_completion_parameters_are_named(body, param):
    with pytest.raises(APIError) as e:
        parse_request("completion", body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_chat_request_maps_to_triton_inputs():
    req = parse_request("chat", {"model": "llm", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}]}], "max_completion_tokens": 7, "temperature": 0, "stop": "x",
        "logprobs": True, "stream": True, "stream_options": {"include_usage": True}})
    assert req.prompt == [{"role": "user", "content": "Hi"}]
    assert req.sampling == {"max_tokens": 7, "temperature": 0.0, "stop_words": ["x"], "return_log_probs": True}
    assert req.stream and req.include_usage and req.logprobs
    with pytest.raises(APIError, match=r"messages\[0\].content"):
        parse_request("chat", {"model": "llm", "messages": [{"role": "user", "content": 3}]})


# --- against the real server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(triton_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with run_gateway(triton_server.grpc_url, triton_server.tokenizer_dir, log) as url:
        yield url


@pytest.fixture(scope="module")
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def triton_answer(triton_server):
    """The same greedy requests straight over Triton gRPC."""
    fmt = ChatFormatter(triton_server.tokenizer_dir)
    with GrpcClient(triton_server.grpc_url, model=triton_server.model) as c:
        chat = c.generate(fmt.render(MESSAGES), max_tokens=N, temperature=0.0)
        completion = c.generate(PROMPT, max_tokens=N, temperature=0.0)
    assert chat.text and completion.text
    return {"chat": chat, "completion": completion}


def test_models_lists_the_served_model(oai, triton_server):
    assert [m.id for m in oai.models.list().data] == [triton_server.model]


def test_chat_equals_triton_and_counts_usage(oai, triton_server, triton_answer):
    r = oai.chat.completions.create(model=triton_server.model, messages=MESSAGES, max_tokens=N, temperature=0)
    ref = triton_answer["chat"]
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens > 10          # the chat template's system prompt too
    assert r.usage.completion_tokens == ref.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_concurrent_chats_and_chat_logprobs(oai, triton_server, triton_answer):
    def ask(_):
        return oai.chat.completions.create(model=triton_server.model, messages=MESSAGES, max_tokens=N,
                                           temperature=0, logprobs=True)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    for r in answers:                                   # one gRPC channel, four concurrent Triton streams
        assert r.choices[0].message.content == triton_answer["chat"].text
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens and all(t.logprob <= 0 for t in content)
        assert "".join(t.token for t in content) == r.choices[0].message.content


def test_chat_stream_equals_non_stream(oai, triton_server, triton_answer):
    chunks = list(oai.chat.completions.create(model=triton_server.model, messages=MESSAGES, max_tokens=N,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == triton_answer["chat"].text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1     # really streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == triton_answer["chat"].completion_tokens


def test_completion_stream_and_not_equal_triton(oai, triton_server, triton_answer):
    ref = triton_answer["completion"]
    r = oai.completions.create(model=triton_server.model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == ref.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    stream = oai.completions.create(model=triton_server.model, prompt=PROMPT, max_tokens=N, temperature=0,
                                    stream=True)
    assert "".join(c.choices[0].text for c in stream) == ref.text


def test_stop_string_ends_the_answer_and_is_not_in_it(oai, triton_server, triton_answer):
    ref = triton_answer["completion"].text
    stop = ref.split()[1]                               # the greedy answer's second word
    r = oai.completions.create(model=triton_server.model, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].text == ref[:ref.index(stop)] and r.choices[0].finish_reason == "stop"


def test_completion_logprobs_and_seed(oai, triton_server):
    r = oai.completions.create(model=triton_server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(x <= 0.0 for x in lp.token_logprobs)
    a, b = (oai.completions.create(model=triton_server.model, prompt=PROMPT, max_tokens=4, temperature=1.0,
                                   seed=1234).choices[0].text for _ in range(2))
    assert a == b


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_errors_are_openai_objects(oai, gateway, triton_server):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 404 and "no-such-model" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=triton_server.model, prompt=PROMPT, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=triton_server.model, messages=MESSAGES, temperature=5)
    assert e.value.body["param"] == "temperature" and "[0.0, 2.0]" in e.value.body["message"]
    r = httpx.post(f"{gateway}/v1/chat/completions", content=b'{"model": "llm", "messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _error(r)["message"]


def test_client_disconnect_cancels_the_triton_request(gateway, triton_server):
    body = {"model": triton_server.model, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/completions", json=body, timeout=60) as r:
        # `lines` keeps the response's byte iterator referenced: a generator chain that is garbage-collected closes
        # httpcore's stream, i.e. the connection, which made this test race its own early disconnect
        lines = r.iter_lines()
        events = list(itertools.islice((x for x in lines if x.startswith("data:")), 3))
        assert len(events) == 3 and json.loads(events[-1][5:])["choices"][0]["text"] is not None
        time.sleep(1.0)          # >> the cancellation check: a connected client that reads slowly keeps its request
        _wait_for(lambda: metric(triton_server, "lmtriton_requests_running", sum) == 1, "the request to run")
    _wait_for(lambda: metric(triton_server, "lmtriton_requests_running", sum) == 0,
              "the request to stop after its HTTP client disconnected")


def test_client_leaving_a_non_stream_request_cancels_it(gateway, triton_server):
    body = {"model": triton_server.model, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
    before = metric(triton_server, "lmtriton_generated_tokens_total", sum)
    with pytest.raises(httpx.ReadTimeout):           # the client gives up long before 400 tokens (~35 s on 2 cores)
        httpx.post(f"{gateway}/v1/completions", json=body, timeout=httpx.Timeout(30.0, read=2.0))
    _wait_for(lambda: metric(triton_server, "lmtriton_requests_running", sum) == 0,
              "the request to stop after its HTTP client left")
    time.sleep(1.0)                                  # the token counter is flushed every 0.25 s
    made = metric(triton_server, "lmtriton_generated_tokens_total", sum) - before
    assert 0 < made < 400, made


def _wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_api_key(triton_server, tmp_path):
    with run_gateway(triton_server.grpc_url, triton_server.tokenizer_dir, tmp_path / "gw.log",
                     "--api-key", "sekret") as url:
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == triton_server.model


def test_triton_down_gives_503_and_gateway_stays_up(oai, gateway, triton_server):
    """Last in this module: stops the module's tritonserver."""
    triton_server.stop()
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(model=triton_server.model, messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 503 and e.value.body["code"] == "triton_unavailable"
    r = httpx.post(f"{gateway}/v1/completions", json={"model": triton_server.model, "prompt": "x", "stream": True})
    assert r.status_code == 503 and "unavailable" in _error(r)["message"]
    assert httpx.get(f"{gateway}/v1/models").status_code == 200
    assert httpx.get(f"{gateway}/health").json() == {"triton_ready": False}
    assert json.loads(httpx.get(f"{gateway}/v1/models").text)["data"][0]["id"] == triton_server.model

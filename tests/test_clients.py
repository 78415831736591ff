"""gRPC / HTTP clients and the CLI chat against the real tritonserver serving SmolLM2 (CPU)."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from client.chat import ChatSession
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from client.protocol import TritonError
from client.template import ChatFormatter
from tests.gateway import ROOT
from tests.serving import triton_server  # noqa: F401  (module-scoped server fixture)
from tests.serving_util import metric

PROMPT = "The capital of France is"
GREEDY = {"max_tokens": 6, "temperature": 0.0}
pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def grpc(triton_server):
    with GrpcClient(triton_server.grpc_url, model=triton_server.model,
                    session_model=triton_server.session_model) as c:
        yield c


@pytest.fixture(scope="module")
def formatter(triton_server):
    return ChatFormatter(triton_server.tokenizer_dir)


def test_grpc_stream_http_and_http_stream_agree(grpc, triton_server):
    deltas = list(grpc.stream(PROMPT, **GREEDY))
    text = "".join(d.text for d in deltas)
    assert len(deltas) > 1 and text.strip()
    assert deltas[-1].finish_reason in ("length", "stop") and all(d.finish_reason is None for d in deltas[:-1])
    whole = grpc.generate(PROMPT, stream=False, **GREEDY)
    assert whole.text == text and whole.completion_tokens == len(whole.token_ids) <= 6
    with HttpClient(triton_server.http_url, model=triton_server.model) as http:
        assert http.generate(PROMPT, **GREEDY).text == text
        assert "".join(d.text for d in http.generate_stream(PROMPT, **GREEDY)) == text


def test_unknown_input_and_bad_value_are_named(grpc, triton_server):
    with pytest.raises(ValueError, match="no input 'temprature'"):
        grpc.generate(PROMPT, temprature=0.5)
    with pytest.raises(TritonError, match="top_p"):
        grpc.generate(PROMPT, top_p=2.0)
    with HttpClient(triton_server.http_url, model=triton_server.model) as http:
        with pytest.raises(TritonError, match="max_tokens"):
            http.generate(PROMPT, max_tokens=0)
    assert grpc.is_ready()


def test_leaving_a_stream_cancels_it(grpc, triton_server):
    stream = grpc.stream(PROMPT, max_tokens=400, ignore_eos=True)
    assert next(stream).text is not None
    stream.close()
    assert grpc.generate(PROMPT, **GREEDY).text                  # the client is usable again at once
    _wait_running_zero(triton_server)


def test_cancel_from_another_thread(grpc, triton_server):
    got = []
    stream = grpc.stream(PROMPT, max_tokens=400, ignore_eos=True)
    got.append(next(stream))
    threading.Timer(0.3, grpc.cancel).start()
    got += list(stream)                                          # ends by itself once cancelled
    assert 1 <= len(got) < 400 and got[-1].finish_reason is None      # ended early, no error
    _wait_running_zero(triton_server)


def _wait_running_zero(server, timeout=20.0):
    import time
    deadline = time.monotonic() + timeout
    while metric(server, "lmtriton_requests_running", sum) != 0:
        assert time.monotonic() < deadline, "a cancelled request still runs in the engine"
        time.sleep(0.25)


def test_chat_session_sends_only_new_turns_and_recovers(grpc, formatter):
    chat = ChatSession(grpc, formatter, **GREEDY)
    first = "".join(chat.ask("Hi! What is your name?"))
    sid, held = chat.session_id, chat.held
    turn1 = chat.last
    second = "".join(chat.ask("And what can you do?"))
    assert first and second and chat.session_id == sid and chat.num_restarts == 0
    assert chat.held.startswith(held) and len(chat.messages) == 4
    # turn 2 sent only its new text: the engine reused turn 1's prompt and answer from the session's KV
    assert chat.last.cached_tokens >= turn1.prompt_tokens + turn1.completion_tokens - 1
    assert chat.last.prompt_tokens > chat.last.cached_tokens
    # the whole conversation, stateless: the same greedy answer as the session's second turn
    assert grpc.generate(formatter.render(chat.messages[:3]), **GREEDY).text == second
    # the server forgets the session (END); the next turn resends the history under a new START
    list(grpc.stream("", session_id=sid, session_end=True, max_tokens=1))
    third = "".join(chat.ask("Thanks!"))
    assert third and chat.num_restarts == 1 and chat.session_id != sid
    chat.close()


def test_cli_chat_answers_two_turns_from_stdin(triton_server):
    cmd = [sys.executable, "-m", "client.chat", "--url", triton_server.grpc_url, "--model", triton_server.model,
           "--session-model", triton_server.session_model, "--tokenizer", str(triton_server.tokenizer_dir),
           "--max-tokens", "8", "--temperature", "0"]
    r = subprocess.run(cmd, input="Hello!\nWhat is 2+2?\nexit\nnever read\n", capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    one = subprocess.run(cmd + ["--prompt", "Hello!"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert one.returncode == 0 and one.stdout.strip(), one.stderr
    # turn 1 is the one-shot answer (greedy, session or not); turn 2 follows it
    assert r.stdout.startswith(one.stdout), (r.stdout, one.stdout)
    assert r.stdout[len(one.stdout):].strip(), r.stdout

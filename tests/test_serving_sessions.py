"""Chat sessions through the real tritonserver: the session's KV stays in the engine between turns, a turn
sends only its new text, and every answer equals the stateless answer given the full history."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.serving_util import grpc_stream, http_generate_stream, served  # noqa: F401 - served is a fixture

pytestmark = [pytest.mark.server, pytest.mark.slow]

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(str(demo_model_dir))


def render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def turn_texts(tokenizer, messages, history) -> tuple:
    """(full-history prompt, the new text a session turn sends) for the last user message of `messages`.

    The session's history ends with the previous answer, and with its end-of-turn token when the model generated
    it (finish_reason "stop"); the new text is everything the template adds after that."""
    full = render(tokenizer, messages)
    if history is None:
        return full, full
    assert full.startswith(history)
    return full, full[len(history):]


def run_conversation(tokenizer, send_turn, send_stateless):
    messages, history, results = [], None, []
    for i, q in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": q})
        full, new_text = turn_texts(tokenizer, messages, history)
        turn = send_turn(new_text, start=i == 0, end=i == len(QUESTIONS) - 1)
        ref = send_stateless(full)
        assert turn.error is None and ref.error is None, (turn.error, ref.error)
        assert turn.text == ref.text
        assert turn.prompt_tokens == ref.prompt_tokens     # same tokens as the full-history tokenization
        results.append((turn, len(tokenizer.encode(new_text, add_special_tokens=False))))
        messages.append({"role": "assistant", "content": turn.text})
        history = render(tokenizer, messages[:-1]) + turn.text + (tokenizer.eos_token if turn.finish_reason == "stop"
                                                                   else "")
    for turn, num_new in results[1:]:   # no recompute: only the new turn (+ the end-of-turn token) is prefilled
        assert turn.cached_tokens >= turn.prompt_tokens - num_new - 1
    return results


def test_three_turn_grpc_session_equals_stateless_full_history(served, tokenizer):
    def send_turn(text, start, end):
        return grpc_stream(served.grpc_url, model="llm_session", text_input=text, max_tokens=MAX_TOKENS,
                           temperature=0.0, stream=True, sequence_id=77, sequence_start=start, sequence_end=end)

    def send_stateless(text):
        return grpc_stream(served.grpc_url, text_input=text, max_tokens=MAX_TOKENS, temperature=0.0, stream=True)

    run_conversation(tokenizer, send_turn, send_stateless)
    again = grpc_stream(served.grpc_url, model="llm_session", text_input="Hi", max_tokens=2, sequence_id=77,
                        sequence_start=True, sequence_end=True)   # END released it; START opens a fresh one
    assert again.error is None and again.cached_tokens == 0


def test_three_turn_http_session_through_inputs(served, tokenizer):
    def send_turn(text, start, end):
        return http_generate_stream(served.http_url, text_input=text, max_tokens=MAX_TOKENS, temperature=0.0,
                                    session_id=4242, session_start=start, session_end=end)

    def send_stateless(text):
        return http_generate_stream(served.http_url, text_input=text, max_tokens=MAX_TOKENS, temperature=0.0)

    run_conversation(tokenizer, send_turn, send_stateless)
    after_end = http_generate_stream(served.http_url, text_input="more", max_tokens=2, session_id=4242)
    assert after_end.error is not None and "session 4242" in after_end.error


def test_session_end_without_a_turn_releases_it(served):
    first = grpc_stream(served.grpc_url, model="llm_session", text_input="Hello", max_tokens=2, sequence_id=91,
                        sequence_start=True)
    assert first.error is None
    end = grpc_stream(served.grpc_url, model="llm_session", sequence_id=91, sequence_end=True)
    assert end.error is None and end.completion_tokens == 0
    after = grpc_stream(served.grpc_url, text_input="x", max_tokens=2, session_id=np.array([[91]], dtype=np.uint64))
    assert after.error is not None and "session 91" in after.error

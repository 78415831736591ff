"""Fast checks of the serving pieces that need no tritonserver: templates, request parsing, config parameters."""
from __future__ import annotations

import numpy as np
import pytest

from backend.triton.params import InputError, engine_config_from_parameters, parse_request
from tools.convert import ENGINE_DEFAULTS, FRONTEND_DEFAULTS, TRITON_DEFAULTS, write_repository
from tools.fill_template import fill


def getter(**values):
    def get(name):
        v = values.get(name)
        if v is None or isinstance(v, np.ndarray):
            return v
        if isinstance(v, (str, bytes)):
            return np.array([[v.encode() if isinstance(v, str) else v]], dtype=np.object_)
        dtype = np.bool_ if isinstance(v, bool) else np.int32 if isinstance(v, int) else np.float32
        return np.array([[v]], dtype=dtype)
    return get


def test_fill_template_refuses_unknown_and_missing_keys():
    assert fill("a ${x} b ${y}", {"x": 1, "y": "z"}) == "a 1 b z"
    with pytest.raises(ValueError, match=r"no placeholder for \['nope'\]"):
        fill("a ${x}", {"x": 1, "nope": 2})
    with pytest.raises(ValueError, match=r"needs values for \['y'\]"):
        fill("${x}${y}", {"x": 1})


def test_parse_request_values_and_defaults():
    req = parse_request(getter(text_input="héllo", max_tokens=7, temperature=0.0, stream=True,
                               stop_words=np.array([[b"\n", b"END"]], dtype=np.object_)), default_max_tokens=99)
    assert (req.text, req.params.max_tokens, req.params.temperature, req.stream) == ("héllo", 7, 0.0, True)
    assert req.stop == ["\n", "END"] and req.session_id is None
    assert parse_request(getter(text_input="x"), default_max_tokens=99).params.max_tokens == 99
    assert parse_request(getter(text_input="x", min_length=3), default_max_tokens=9).params.min_tokens == 3


@pytest.mark.parametrize("values,message", [
    (dict(max_tokens=4), "text_input is required"),
    (dict(text_input="x", max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(text_input="x", top_p=2.0), "top_p must be <= 1.0, got 2.0"),
    (dict(text_input="x", temperature=-1.0), "temperature must be >= 0.0"),
    (dict(text_input=b"\xff\xfe"), "text_input is not valid UTF-8"),
    (dict(text_input="x", max_tokens=np.array([[1.5]], dtype=np.float32)), "max_tokens must be an integer"),
    (dict(text_input=np.array([[b"a"], [b"b"]], dtype=np.object_)), "send one prompt per request"),
    (dict(text_input="x", session_start=True), "need a session_id"),
    (dict(text_input="x", session_id=np.array([[0]], dtype=np.uint64)), "session_id must be non-zero"),
])
def test_parse_request_errors_name_the_field(values, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_request(getter(**values), default_max_tokens=8)


def test_session_inputs_and_sequence_controls():
    sid = np.array([[5]], dtype=np.uint64)
    req = parse_request(getter(text_input="x", session_id=sid, session_start=True), default_max_tokens=8)
    assert (req.session_id, req.session_start, req.session_end, req.is_continuation) == (5, True, False, False)
    end = parse_request(getter(), default_max_tokens=8, session_id=9, session_end=True)   # END without a turn
    assert end.is_empty and end.session_end


def test_converted_config_parameters_round_trip(tmp_path):
    repo = write_repository(tmp_path, "m", dict(ENGINE_DEFAULTS, session_len=1024, device="cpu"),
                            dict(FRONTEND_DEFAULTS), dict(TRITON_DEFAULTS))
    text = (repo / "m" / "config.pbtxt").read_text()
    assert 'name: "m"' in text and "decoupled: true" in text
    params = dict(__import__("re").findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
    cfg = engine_config_from_parameters(params, str(repo / "m"))
    assert cfg["session_len"] == 1024 and cfg["enable_prefix_caching"] is True and cfg["device"] == "cpu"
    assert cfg["model"] == str(tmp_path / "weights")
    session = (repo / "m_session" / "config.pbtxt").read_text()
    assert 'string_value: "m"' in session and "CONTROL_SEQUENCE_CORRID" in session
    assert "max_sequence_idle_microseconds: 3600000000" in session
    with pytest.raises(ValueError, match="session_len='abc'"):
        engine_config_from_parameters({**params, "session_len": "abc"}, str(repo / "m"))
    with pytest.raises(ValueError, match=r"unknown parameters \['bogus'\]"):
        engine_config_from_parameters({**params, "bogus": "1"}, str(repo / "m"))

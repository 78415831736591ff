"""Start the real tritonserver (from nvidia-pytriton) on a model repository; `make serve`.

Assembles a backend directory (python backend + the stub for the Python that will run it), puts that Python's
bin first on PATH (the stub finds its interpreter there), binds HTTP/gRPC/metrics to loopback, waits until the
server is ready and stops it cleanly on Ctrl-C / SIGTERM. From tests:

    with TritonServer("workspace/model_repository", http_port=0) as server:   # 0 = pick a free port
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

On the GPU machine (see ../shared/device/README.md) the environment of .carry/setup.sh is honoured:
TRITON_HOME (tritonserver tree), STUB_BIN (the stub's venv bin) and ENGINE_PYTHON (exported for the model's
engine_python parameter when that is empty).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

log = logging.getLogger("lmtriton.serve")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def triton_home() -> Path:
    if os.environ.get("TRITON_HOME"):
        return Path(os.environ["TRITON_HOME"])
    try:
        import pytriton
    except ImportError:
        raise SystemExit("tritonserver not found: install nvidia-pytriton (make install) or set TRITON_HOME")
    return Path(pytriton.__file__).parent / "tritonserver"


def stub_bin() -> Path:
    """The directory whose python3 runs the stub: STUB_BIN, else this interpreter's (the project venv)."""
    return Path(os.environ.get("STUB_BIN") or Path(sys.executable).parent)


def assemble_backends(home: Path, python: Path, dest: Path) -> Path:
    """dest/python/ = the python backend + the stub built for `python`'s version."""
    version = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"no python-backend stub for Python {version} in {home / 'python_backend_stubs'}")
    target = dest / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in (home / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy(f, target / f.name)
    shutil.copy(stub, target / stub.name)
    os.chmod(target / stub.name, 0o755)
    return dest


class TritonServer:
    def __init__(self, model_repository, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_verbose: int = 0, extra_args: Optional[List[str]] = None, log_file=None):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise SystemExit(f"model repository {self.model_repository} does not exist (run `make convert` first)")
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        self.log_file = log_file
        self.proc: Optional[subprocess.Popen] = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    http_url = property(lambda self: f"127.0.0.1:{self.http_port}")
    grpc_url = property(lambda self: f"127.0.0.1:{self.grpc_port}")
    metrics_url = property(lambda self: f"http://127.0.0.1:{self.metrics_port}/metrics")

    def command(self, backend_dir: Path) -> List[str]:
        return [str(triton_home() / "bin" / "tritonserver"), "--model-repository", str(self.model_repository),
                "--backend-directory", str(backend_dir), "--http-address", "127.0.0.1",
                "--http-port", str(self.http_port), "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--log-verbose", str(self.log_verbose)] + self.extra_args

    def environment(self) -> dict:
        home = triton_home()
        env = dict(os.environ)
        env["PATH"] = f"{stub_bin()}{os.pathsep}{env.get('PATH', '')}"
        libs = home.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def start(self, timeout: float = 600.0) -> "TritonServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="lmtriton-backends-")
        backends = assemble_backends(triton_home(), stub_bin() / "python3", Path(self._tmp.name))
        cmd = self.command(backends)
        log.info("starting %s", " ".join(cmd))
        out = open(self.log_file, "ab") if self.log_file else None
        self.proc = subprocess.Popen(cmd, env=self.environment(), stdout=out, stderr=subprocess.STDOUT if out else None)
        self.wait_ready(timeout)
        log.info("tritonserver ready: HTTP %s, gRPC %s, metrics %s", self.http_url, self.grpc_url, self.metrics_url)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode} before it was ready"
                                   + (f" (log: {self.log_file})" if self.log_file else ""))
            if self.is_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver was not ready within {timeout:g}s")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)      # tritonserver unloads models (finalize) on SIGTERM
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %gs; killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-repository", default="workspace/model_repository")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--log-verbose", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    args, extra = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = TritonServer(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                          args.log_verbose, extra)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start(args.timeout)
        print(f"tritonserver is ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}"
              f"\nCtrl-C stops it.", flush=True)
        server.proc.wait()
        return server.proc.returncode or 0
    except KeyboardInterrupt:
        log.info("stopping tritonserver")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())

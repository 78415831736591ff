"""pytest plugin for the device: name the first Python call after which a CUDA graph capture is invalidated.

A capture broken by an operation the capturing stream does not permit fails later, at some unrelated launch
(CUresult 901 / cudaErrorStreamCaptureInvalidated). With this plugin every capture_begin installs a profile hook
that asks the driver for the stream's capture status after each call returns, and prints the first call (Python or
C) after which it reads "invalidated", with its stack:
    PYTHONPATH=. python3 -m pytest -m gpu -s -p scripts.capture_probe tests/...
"""
import ctypes
import sys
import traceback

import torch

try:
    _lib = ctypes.CDLL("libcuda.so.1")
except OSError:     # no driver here: the plugin does nothing (every gpu test is skipped anyway)
    _lib = None
_state = {"stream": None, "found": False}


def _status(stream) -> int:
    st = ctypes.c_int(0)
    _lib.cuStreamIsCapturing(ctypes.c_void_p(stream), ctypes.byref(st))
    return st.value


def _prof(frame, event, arg):
    if _state["found"] or event not in ("return", "c_return", "c_exception", "exception"):
        return
    s = _state["stream"]
    if s is not None and _status(s) == 2:
        _state["found"] = True
        name = getattr(arg, "__qualname__", getattr(arg, "__name__", repr(arg))) if event.startswith("c_") else ""
        print(f"\n### CAPTURE INVALIDATED after {event} {name} in {frame.f_code.co_filename}:{frame.f_lineno} "
              f"{frame.f_code.co_name}", file=sys.stderr, flush=True)
        traceback.print_stack(frame, limit=14, file=sys.stderr)


_begin, _end = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end


def capture_begin(self, *a, **k):
    r = _begin(self, *a, **k)
    _state["stream"], _state["found"] = torch.cuda.current_stream().cuda_stream, False
    print(f"### capture begins on stream {_state['stream']:#x}, status {_status(_state['stream'])}",
          file=sys.stderr, flush=True)
    sys.setprofile(_prof)
    return r


def capture_end(self, *a, **k):
    sys.setprofile(None)
    _state["stream"] = None
    return _end(self, *a, **k)


if _lib is not None:
    torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end = capture_begin, capture_end

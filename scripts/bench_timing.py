"""Kernel timing without the host: a CUDA graph of many calls, replayed, timed with CUDA events.

Timing one eager call between two events also measures the host's launch latency (the first event is reached at
once, the kernel only after Python has prepared and launched it: tens of microseconds), which for a kernel of
~0.1 ms is a large share; a replayed graph has no host work between its kernels.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from backend.engine.cuda_graph import collector_off

log = logging.getLogger(__name__)


def graph_ms(fn, calls: int, replays: int = 5) -> float:
    """Milliseconds per call of `fn` (which makes `calls` calls), replayed from a CUDA graph; NaN if it fails."""
    try:
        return _graph_ms(fn, calls, replays)
    except Exception as e:   # one failing path must not lose the others' numbers
        log.error("timing failed: %s", e)
        return float("nan")


def _graph_ms(fn, calls: int, replays: int) -> float:
    fn()                                              # compile kernels, prepare, allocate outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with collector_off(), torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(1, min(50, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps / calls)
    return statistics.median(times)

"""Serving metrics on Triton's metrics port (pb_utils.MetricFamily), named lmtriton_*.

Per request (labelled with the frontend model): time to first token and inter-token latency histograms,
generated tokens. Engine-wide (labelled with the engine's model): running and waiting requests, KV blocks in use
and in total, idle sessions, prefix cache hits. Each metric call crosses into the Triton process, so samples are
buffered and flushed from the I/O thread at most every FLUSH_S seconds, off the response path.
Deleting the Metric / MetricFamily objects explicitly in finalize crashed the 2.51 stub at unload (heap
corruption, signal 6); they are left to the stub's own teardown.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List

FLUSH_S = 0.25
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
# engine stats key -> (metric name, help)
ENGINE_GAUGES = {
    "num_running": ("lmtriton_requests_running", "Requests in the engine's running batch"),
    "num_waiting": ("lmtriton_requests_waiting", "Requests waiting for KV blocks or a batch slot"),
    "kv_blocks_used": ("lmtriton_kv_blocks_used", "KV cache blocks in use (idle sessions and prefix cache incl.)"),
    "kv_blocks_total": ("lmtriton_kv_blocks_total", "KV cache blocks in the pool"),
    "num_idle_sessions": ("lmtriton_sessions_idle", "Sessions holding KV between turns"),
    "prefix_cache_hits": ("lmtriton_prefix_cache_hits", "KV blocks reused from the prefix cache since start"),
    "prefix_cache_queries": ("lmtriton_prefix_cache_queries", "Full prompt blocks looked up in the prefix cache"),
}


class Metrics:
    def __init__(self, pb_utils, model_name: str, engine_model: str):
        fam = pb_utils.MetricFamily
        self._families = [
            fam("lmtriton_time_to_first_token_seconds", "Time from request arrival to its first token", fam.HISTOGRAM),
            fam("lmtriton_inter_token_latency_seconds", "Time between tokens of a stream", fam.HISTOGRAM),
            fam("lmtriton_generated_tokens_total", "Tokens generated for this model's requests", fam.COUNTER),
        ]
        labels = {"model": model_name}
        self.ttft = self._families[0].Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.itl = self._families[1].Metric(labels=labels, buckets=ITL_BUCKETS)
        self.tokens = self._families[2].Metric(labels=labels)
        self.gauges = {}
        for key, (name, help_) in ENGINE_GAUGES.items():
            f = fam(name, help_, fam.GAUGE)
            self._families.append(f)
            self.gauges[key] = f.Metric(labels={"model": engine_model})
        self._lock = threading.Lock()
        self._ttft: List[float] = []
        self._itl: List[float] = []
        self._tokens = 0
        self._stats: Dict[str, float] = {}
        self._last_flush = 0.0

    # called from any thread
    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft.append(seconds)

    def tokens_out(self, n: int, seconds_per_token: float = None) -> None:
        with self._lock:
            self._tokens += n
            if seconds_per_token is not None:
                self._itl.append(seconds_per_token)

    def engine_stats(self, stats: dict) -> None:
        with self._lock:
            self._stats = stats

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < FLUSH_S:
            return
        self._last_flush = now
        with self._lock:
            ttft, itl, tokens, stats = self._ttft, self._itl, self._tokens, self._stats
            self._ttft, self._itl, self._tokens, self._stats = [], [], 0, {}
        for v in ttft:
            self.ttft.observe(v)
        for v in itl:
            self.itl.observe(v)
        if tokens:
            self.tokens.increment(tokens)
        for key, value in stats.items():
            if key in self.gauges:
                self.gauges[key].set(float(value))

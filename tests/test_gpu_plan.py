"""CPU checks of the GPU path's planning: CUDA-graph batch buckets, the collector around captures, and query heads
per attention CTA."""
import gc
import weakref

import pytest

from backend.engine.cuda_graph import batch_buckets, collector_off
from backend.kernels.paged_attention import rep_tile


def test_batch_buckets_cover_every_batch_size_up_to_the_max():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(1) == [1]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    for max_bs in (1, 3, 17, 100):
        b = batch_buckets(max_bs)
        assert b == sorted(set(b)) and b[-1] == max_bs
        assert all(any(x >= n for x in b) for n in range(1, max_bs + 1))


def test_rep_tile_divides_the_gqa_ratio():
    # Llama-2 (MHA), 9:3, Llama-3 (32:8), 64:8, Qwen 14:2, 5:1
    assert [rep_tile(r) for r in (1, 3, 4, 8, 7, 5)] == [1, 3, 4, 4, 7, 5]
    for r in range(1, 33):
        assert r % rep_tile(r) == 0 and rep_tile(r) <= 8


class _Held:
    """Stands for a dead engine: a reference cycle that still owns something."""


def test_captures_run_with_dead_cycles_collected_and_the_collector_off():
    """A dead engine freed by the collector in the middle of a capture invalidates it (CUresult 901, seen on the
    H100 when a test built several engines): collect before, keep the collector off while capturing."""
    dead = _Held()
    dead.me = dead
    alive = weakref.ref(dead)
    del dead
    assert gc.isenabled()
    with collector_off():
        assert alive() is None                  # collected before the capture begins
        assert not gc.isenabled()               # nothing is collected in the middle of one
    assert gc.isenabled()
    with pytest.raises(RuntimeError):           # a failed capture leaves the collector as it was
        with collector_off():
            raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_off():
            pass
        assert not gc.isenabled()               # and one that was off stays off
    finally:
        gc.enable()


def test_a_dropped_engine_is_freed_without_the_collector(demo_model_dir):
    """runner.graphs -> DecodeGraphs -> runner must not be a cycle: an engine its owner drops frees its KV cache and
    graphs at once, not at some later collection (which may fall in another engine's graph capture). On this CPU
    machine DecodeGraphs finds no cupy and captures nothing, but keeps its runner as on a GPU."""
    from backend.config import EngineConfig
    from backend.engine.cuda_graph import DecodeGraphs
    from backend.engine.engine import LLMEngine
    eng = LLMEngine(EngineConfig(model=str(demo_model_dir), dtype="float32", device="cpu", session_len=256,
                                 max_batch_size=2, cache_block_seq_len=16, cache_max_entry_count=32))
    eng.runner.graphs = DecodeGraphs(eng.runner)
    assert not eng.runner.graphs.enabled and eng.runner.graphs.runner.block_size == 16
    runner, engine = weakref.ref(eng.runner), weakref.ref(eng)
    gc.disable()
    try:
        del eng
        assert engine() is None and runner() is None
    finally:
        gc.enable()

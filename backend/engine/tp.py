"""Tensor-parallel execution: rank 0 lives in the engine process, one spawned worker process per extra rank.

The scheduler and block manager stay single: rank 0 decides. Each step rank 0 sends the batch description
(plain lists: the tokens to compute, their start position, the block table) over a pipe to every worker, then
all ranks run the forward pass (the row-parallel projections all-reduce across ranks) and only rank 0 samples.
Every rank builds its shard from one copy of the weights (backend/model/tp.py) and a KV cache of the block
count rank 0 chose, so a block id means the same slots everywhere.
Collectives: gloo on CPU, NCCL on GPU (NVLink multicast off: NCCL_NVLS_ENABLE=0 and friends, set before init).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import traceback
import weakref
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import EngineConfig
from ..model.config import ModelConfig
from ..model.tp import check_tp, load_shard, shard_config, shard_weights
from .model_runner import ModelRunner, resolve_device

log = logging.getLogger(__name__)

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
START_TIMEOUT_S = 600.0      # a worker must load its shard and build its cache within this
STEP_DESC = List[Tuple[List[int], int, List[int]]]   # per sequence: token ids to compute, start, block table


def check_devices(config: EngineConfig) -> str:
    """-> the collective backend ('gloo' | 'nccl'); ValueError when tp exceeds the visible GPUs."""
    if resolve_device(config).type != "cuda":
        return "gloo"
    n = torch.cuda.device_count()
    if config.tp > n:
        raise ValueError(f"tp={config.tp} exceeds the {n} visible GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return "nccl"


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def _init_group(backend: str, port: int, rank: int, tp: int) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine already runs in this process (one per process; close() it)")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp,
                            timeout=timedelta(seconds=START_TIMEOUT_S))


@dataclasses.dataclass(frozen=True)
class RankWeights:
    """A weights factory that builds each rank's shard itself: make(rank, tp) -> the shard dict (random benchmark
    weights of 70B shapes, made on the rank's GPU: no full copy anywhere). tp=1 engines take make(0, 1)."""
    make: Callable[[int, int], Dict]


def _build_rank(config: EngineConfig, model_cfg: ModelConfig, weights: Optional[Callable[[], Dict]], rank: int,
                num_blocks: Optional[int]) -> ModelRunner:
    """This rank's ModelRunner over its shard; CUDA graphs are captured later, by all ranks together."""
    tp = config.tp
    if isinstance(weights, RankWeights):
        shard = weights.make(rank, tp)
    else:
        full = weights() if weights is not None else None
        shard = (shard_weights(full, model_cfg, rank, tp) if full is not None
                 else load_shard(config.model, model_cfg, rank, tp))
        del full
    local = dataclasses.replace(config, tp=1, use_cuda_graph=False)
    if num_blocks is not None:
        local = dataclasses.replace(local, cache_max_entry_count=float(num_blocks))
    if config.kv_qparams:     # static KV: the file has every head; this rank loads its share below
        local = dataclasses.replace(local, kv_qparams="", kv_rotation="off")
    runner = ModelRunner(local, shard_config(model_cfg, rank, tp), shard)
    if config.kv_qparams:
        from ..kernels.kv_static import load_kv_qparams
        c = runner.model_cfg
        runner.model.kv_qparams = load_kv_qparams(config.kv_qparams, c.num_layers, c.num_kv_heads,
                                                  config.kv_cache_dtype, rank, tp).to(runner.device)
    runner.model.all_reduce = _all_reduce
    return runner


def _capture_graphs(runner: ModelRunner, config: EngineConfig) -> None:
    if runner.device.type == "cuda" and config.use_cuda_graph and not config.kv_qparams:   # static KV: eager
        from .cuda_graph import DecodeGraphs
        runner.graphs = DecodeGraphs(runner)     # warm-up and capture all-reduce on every rank in the same order


class _Window:
    """token_ids[start:start + n] of a sequence, held without the rest (what ModelRunner.prepare slices)."""

    def __init__(self, ids: List[int], start: int):
        self.ids, self.start = ids, start

    def __getitem__(self, s: slice) -> List[int]:
        return self.ids[s.start - self.start:s.stop - self.start]


class _StepSeq:
    """The fields of a Sequence that ModelRunner.prepare reads, rebuilt in a worker from the step description."""
    __slots__ = ("token_ids", "num_computed_tokens", "block_table")

    def __init__(self, ids: List[int], start: int, table: List[int]):
        self.token_ids, self.num_computed_tokens, self.block_table = _Window(ids, start), start, table


@torch.inference_mode()
def _forward(runner: ModelRunner, desc: STEP_DESC) -> None:
    batch = [(_StepSeq(ids, start, table), len(ids)) for ids, start, table in desc]
    input_ids, meta, _ = runner.prepare(batch)
    if runner.graphs is not None and runner.graphs.can_run(meta):
        runner.graphs.run(input_ids, meta)
    else:
        runner.model.forward(input_ids, meta, runner.kv_cache)


def _worker_main(rank: int, config: EngineConfig, model_cfg: ModelConfig, weights, backend: str, port: int,
                 conn) -> None:
    logging.basicConfig(level=os.environ.get("LMTRITON_LOG", "WARNING"),
                        format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads() // config.tp))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        conn.send(("ready",))
        _init_group(backend, port, rank, config.tp)
        runner = _build_rank(config, model_cfg, weights, rank, conn.recv()[1])
        conn.send(("built",))
        while True:
            msg = conn.recv()
            if msg[0] == "step":
                _forward(runner, msg[1])
            elif msg[0] == "graphs":
                _capture_graphs(runner, config)
                conn.send(("captured",))
            elif msg[0] == "stop":
                break
    except EOFError:        # the engine process is gone: no peer to tear NCCL down with
        os._exit(0)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
    _release_graphs(runner)
    _leave_group()
    # never through the interpreter's teardown: a destroy thread still stuck in NCCL made the 2-GPU runs abort at
    # exit ("terminate called without an active exception") or linger past tritonserver's shutdown
    logging.shutdown()
    os._exit(0)


def _release_graphs(runner) -> None:
    """Drop a rank's CUDA graphs (they hold the communicator's captured kernels) before the group is destroyed."""
    if runner is not None and getattr(runner, "graphs", None) is not None:
        runner.graphs = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leave_group(timeout_s: float = 15.0) -> bool:
    """destroy_process_group, bounded: NCCL's teardown waits for the peers, which may be gone."""
    if not dist.is_initialized():
        return True
    t = threading.Thread(target=dist.destroy_process_group, name="lmtriton-tp-destroy", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning("tensor parallel: leaving the process group did not finish in %.0f s", timeout_s)
    return not t.is_alive()


def _shutdown(procs, conns, state: dict) -> None:
    state["closing"] = True
    for c in conns:
        try:
            c.send(("stop",))
        except (OSError, ValueError):
            pass
    _release_graphs(state.get("runner"))
    state["left_group"] = _leave_group()   # at the same time as the workers: NCCL's teardown is collective
    for p in procs:
        p.join(10)
        if p.is_alive():
            log.warning("tp worker pid %d did not stop; terminating it", p.pid)
            p.terminate()
            p.join(5)
    for c in conns:
        c.close()

class TPRunner:
    """ModelRunner's interface (run, num_blocks, eos_ids, ...) over tp ranks. close() stops the workers."""

    def __init__(self, config: EngineConfig, model_cfg: Optional[ModelConfig] = None,
                 weights: Optional[Callable[[], Dict]] = None):
        if weights is not None and not callable(weights) and not isinstance(weights, RankWeights):
            raise ValueError("tp > 1 takes weights from config.model or from a picklable factory "
                             "(weights() -> full-model dict, called in every rank), not a dict")
        self.config = config
        self.model_cfg = model_cfg or ModelConfig.load(config.model)
        check_tp(self.model_cfg, config.tp)
        self.backend = check_devices(config)
        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel engine already runs in this process (one per process: close() "
                               "it first)")
        self.failure: Optional[str] = None
        self._state = {"closing": False}      # shared with the finalizer, which also runs at interpreter exit
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        os.environ.update(NO_MULTICAST_ENV)     # inherited by the workers
        for rank in range(1, config.tp):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, name=f"lmtriton-tp{rank}", daemon=True,
                            args=(rank, config, self.model_cfg, weights, self.backend, port, child))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns, self._state)
        try:
            self._expect("ready", "start-up")
            _init_group(self.backend, port, 0, config.tp)
            self.runner = _build_rank(config, self.model_cfg, weights, 0, None)
            self._state["runner"] = self.runner      # the finalizer drops its graphs before leaving the group
            if self.runner.num_blocks < 2:     # workers get the count as cache_max_entry_count, where 1 is a fraction
                raise ValueError(f"tp={config.tp}: only {self.runner.num_blocks} KV block fits; raise "
                                 f"cache_max_entry_count")
            self._send(("build", self.runner.num_blocks))
            self._expect("built", "loading its shard")
            if self.runner.device.type == "cuda" and config.use_cuda_graph:
                self._send(("graphs",))
                _capture_graphs(self.runner, config)
                self._expect("captured", "CUDA graph capture")
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._watch, name="lmtriton-tp-watch", daemon=True).start()
        log.info("tensor parallel: tp=%d over %s, %d KV blocks per rank", config.tp, self.backend,
                 self.runner.num_blocks)

    # -- the ModelRunner surface the engine uses ---------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def eos_ids(self) -> List[int]:
        return self.runner.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: List[int]) -> None:
        self.runner.eos_ids = ids

    def __getattr__(self, name):        # device, dtype, model, kv_cache, ...: rank 0's
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def run(self, batch):
        if not batch:
            return []
        if self.failure:
            raise RuntimeError(self.failure)
        bs = self.runner.block_size
        desc: STEP_DESC = []
        for seq, n in batch:
            start = seq.num_computed_tokens
            desc.append((seq.token_ids[start:start + n], start, seq.block_table[:-(-(start + n) // bs)]))
        try:
            self._send(("step", desc))
            return self.runner.run(batch)
        except Exception as e:
            raise RuntimeError(self._worker_failure() or f"tensor-parallel step failed: {e}") from e

    # -- workers -------------------------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        for c in self.conns:
            c.send(msg)

    def _expect(self, reply: str, during: str) -> None:
        """Wait for `reply` from every worker; a worker error or exit becomes a RuntimeError naming it."""
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), start=1):
            ready = wait([c, p.sentinel], timeout=START_TIMEOUT_S)
            if c in ready or c.poll():
                msg = c.recv()
                if msg[0] == reply:
                    continue
                if msg[0] == "error":
                    raise RuntimeError(f"tp worker rank {rank} failed during {during}:\n{msg[1]}")
            p.join(1)
            raise RuntimeError(f"tp worker rank {rank} exited (code {p.exitcode}) during {during}"
                               if not p.is_alive() else f"tp worker rank {rank}: no {reply!r} after "
                               f"{START_TIMEOUT_S:.0f} s during {during}")

    def _worker_failure(self, grace_s: float = 2.0) -> Optional[str]:
        """After a failed step: the first worker's error or exit code, waiting briefly for it (None if healthy)."""
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), start=1):
            try:
                msg = c.recv() if c.poll(grace_s) else ("running",)
            except (EOFError, OSError):
                msg = ("exited",)
            if msg[0] == "error":
                self.failure = f"tp worker rank {rank} failed:\n{msg[1]}"
                return self.failure
            p.join(grace_s if msg[0] == "exited" else 0)
            if not p.is_alive():
                self.failure = f"tp worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                return self.failure
        return None

    def _watch(self) -> None:
        """A worker that dies while rank 0 waits in an NCCL all-reduce would hang it: abort the group."""
        ready = wait([p.sentinel for p in self.procs])
        if self._state["closing"]:
            return
        dead = next(p for p in self.procs if p.sentinel in ready)
        dead.join(5)                    # the sentinel closes a moment before the exit code can be read
        self.failure = self.failure or f"tp worker {dead.name} (pid {dead.pid}) exited with code {dead.exitcode}"
        log.error("%s", self.failure)
        if self.backend == "nccl":
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                try:
                    abort()
                except Exception:     # best effort: the step raises either way once the collective returns
                    log.exception("could not abort the NCCL process group")

    def close(self) -> None:
        """Stop the workers and leave the process group; safe to call twice."""
        self._finalizer()

"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start-up, replayed each step.

A decode step of a 7B model launches ~300 kernels; launched from Python they cost more than the step's memory
traffic. A graph replays them in one launch. Inputs live in static buffers that each step overwrites: token ids,
positions, slot mapping, block tables (padded to the blocks of session_len), context lens. Rows past the real
batch get slot -1 (the KV write skips them) and context 0 (attention writes zeros). The attention kernel reads
lengths from the device and takes session_len as its static bound, so one graph serves any context length.

decode_step_in_graph (EngineConfig): the int32 inputs (token ids, positions, slots, context lens, block tables)
live in ONE device buffer filled by one host-to-device copy from a pinned buffer (`load_decode`), and the graph
also computes lm_head and the greedy argmax: a plain-greedy step is one copy in, one replay, one copy out.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from ..kernels import _cupy
from ..kernels.paged_attention import AttnMetadata

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> List[int]:
    """1, 2, 4, 8, 16, 32, 48, 64, ... (steps of 16) up to max_batch_size, which is always included."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


@contextlib.contextmanager
def collector_off():
    """Around CUDA graph captures. A dead object in a reference cycle (an earlier LLMEngine of the same process)
    still holds graphs, pinned buffers and pool memory; the garbage collector may free it at any allocation, and
    freeing those mid-capture is an operation a capturing stream does not permit: the capture is invalidated
    (CUresult 901 at the next launch). torch.cuda.graph.__enter__ collects only under
    torch.compiler.config.force_cudagraph_gc (torch 2.13 here), so collect first, then keep the collector off until
    the captures are done (vLLM does the same)."""
    gc.collect()
    torch.cuda.empty_cache()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class DecodeGraphs:
    def __init__(self, runner):
        # weak: runner.graphs -> self -> runner would be a cycle, and an engine dropped by its owner would then live
        # (KV cache, graphs, pools) until the garbage collector runs, which may be in another engine's capture
        self.runner = weakref.proxy(runner)
        self.model = runner.model
        cfg = runner.config
        self.session_len = cfg.session_len
        self.max_bs = cfg.max_batch_size
        self.max_blocks = -(-cfg.session_len // runner.block_size)
        self.buckets = batch_buckets(self.max_bs)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.in_graph = cfg.decode_step_in_graph
        self.logits: Dict[int, torch.Tensor] = {}     # [bs, V] float32 (in_graph only)
        self.tokens: Dict[int, torch.Tensor] = {}     # [bs] int64 greedy argmax (in_graph only)
        self.enabled = self._check_supported()
        if self.enabled:
            self._capture_all()

    def _check_supported(self) -> bool:
        dev = self.runner.device
        if _cupy.cupy is None:
            log.warning("CUDA graphs off: cupy is not installed (the reference attention reads host lists)")
            return False
        m = self.model
        if m.rope_scaling_factor > 0 and self.session_len > m.cfg.max_position_embeddings:
            log.warning("CUDA graphs off: dynamic NTK rotary frequencies depend on each step's lengths")
            return False
        probe = torch.zeros(1, 1, m.cfg.head_dim, dtype=self.runner.dtype, device=dev)
        if not (_cupy.supports_dtype(probe) and m.cfg.head_dim in (64, 128)):
            log.warning("CUDA graphs off: no decode kernel for %s head_dim %d", self.runner.dtype, m.cfg.head_dim)
            return False
        return True

    def _static_buffers(self):
        dev, n = self.runner.device, self.max_bs
        i32 = dict(dtype=torch.int32, device=dev)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        # one int32 buffer: [ids | positions | slots | context lens | block tables n x max_blocks]; the rows of
        # a batch of b are its first 4 n + b * max_blocks entries (one copy)
        self.flat = torch.zeros(4 * n + n * self.max_blocks, **i32)
        parts = self.flat.split([n, n, n, n, n * self.max_blocks])
        self.ids32, self.positions, self.slot_mapping, self.context_lens, tables = parts
        self.slot_mapping.fill_(-1)
        self.block_tables = tables.view(n, self.max_blocks)                               # [n, max_blocks]
        self.cu_seqlens = torch.arange(n + 1, **i32)
        if self.in_graph:   # two pinned host copies of `flat`, used in turn (a copy may still read the last one)
            self.host = [torch.zeros(self.flat.shape, dtype=torch.int32, pin_memory=dev.type == "cuda")
                         for _ in range(2)]
            self.host_np = [h.numpy() for h in self.host]
            self.turn = 0

    def _forward(self, bs: int, meta: AttnMetadata, kv) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                                   Optional[torch.Tensor]]:
        if not self.in_graph:
            return self.model.forward(self.input_ids[:bs], meta, kv), None, None
        self.input_ids[:bs].copy_(self.ids32[:bs])                                       # int32 -> int64
        hidden = self.model.forward(self.input_ids[:bs], meta, kv)
        logits = self.model.logits(hidden)                                                # [bs, V] float32
        return hidden, logits, logits.argmax(-1)

    def _meta(self, bs: int) -> AttnMetadata:
        return AttnMetadata(positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
                            block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                            cu_seqlens_q=self.cu_seqlens[:bs + 1], q_lens=[1] * bs,
                            ctx_lens=[self.session_len] * bs, is_decode=True, max_context_len=self.session_len)

    def _capture_all(self) -> None:
        with collector_off():
            self._capture_buckets()

    @torch.inference_mode()
    def _capture_buckets(self) -> None:
        self._static_buffers()
        kv = self.runner.kv_cache
        pool = None
        for bs in reversed(self.buckets):           # largest first: smaller graphs reuse its memory pool
            meta = self._meta(bs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):         # warm-up compiles and loads every kernel before capture
                for _ in range(2):
                    self._forward(bs, meta, kv)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs], self.logits[bs], self.tokens[bs] = self._forward(bs, meta, kv)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def can_run(self, meta: AttnMetadata) -> bool:
        return (self.enabled and meta.is_decode and len(meta.q_lens) <= self.max_bs
                and meta.max_context_len <= self.session_len and meta.block_tables.shape[1] <= self.max_blocks)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        bs = self.bucket(n)
        width = meta.block_tables.shape[1]
        (self.ids32 if self.in_graph else self.input_ids)[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.context_lens[:n].copy_(meta.context_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.context_lens[n:bs].fill_(0)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]

    # -- decode_step_in_graph ----------------------------------------------------------------------------------
    def can_load(self, batch) -> bool:
        """A decode batch whose inputs load_decode can write: one new token each, within the static bounds."""
        return (self.enabled and self.in_graph and len(batch) <= self.max_bs
                and all(n == 1 and seq.num_computed_tokens < self.session_len for seq, n in batch))

    def load_decode(self, batch) -> int:
        """Write the inputs of a decode batch (what prepare() builds) with one H2D copy; -> its bucket size."""
        n, bsz, mb, s = len(batch), self.runner.block_size, self.max_blocks, self.max_bs
        arr = self.host_np[self.turn]
        pos = [seq.num_computed_tokens for seq, _ in batch]
        arr[:n] = [seq.token_ids[p] for (seq, _), p in zip(batch, pos)]
        arr[s:s + n] = pos
        arr[2 * s:2 * s + n] = [seq.block_table[p // bsz] * bsz + p % bsz for (seq, _), p in zip(batch, pos)]
        arr[3 * s:3 * s + n] = [p + 1 for p in pos]
        tables = arr[4 * s:4 * s + n * mb].reshape(n, mb)
        for (seq, _), p, row in zip(batch, pos, tables):   # the blocks attention reads; the rest may be stale
            row[:p // bsz + 1] = seq.block_table[:p // bsz + 1]
        bs = self.bucket(n)
        arr[2 * s + n:2 * s + bs] = -1                     # padded rows: no KV write, empty context
        arr[3 * s + n:3 * s + bs] = 0
        end = 4 * s + n * mb
        self.flat[:end].copy_(self.host[self.turn][:end], non_blocking=True)
        self.turn ^= 1
        return bs

    def replay(self, bs: int) -> None:
        self.graphs[bs].replay()

"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start-up, replayed each step.

A decode step of a 7B model launches ~300 kernels; launched from Python they cost more than the step's memory
traffic. A graph replays them in one launch. Inputs live in static buffers that each step overwrites: token ids,
positions, slot mapping, block tables (padded to the blocks of session_len), context lens. Rows past the real
batch get slot -1 (the KV write skips them) and context 0 (attention writes zeros). The attention kernel reads
lengths from the device and takes session_len as its static bound, so one graph serves any context length.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch

from ..kernels import _cupy
from ..kernels.paged_attention import AttnMetadata

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> List[int]:
    """1, 2, 4, 8, 16, 32, 48, 64, ... (steps of 16) up to max_batch_size, which is always included."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        self.model = runner.model
        cfg = runner.config
        self.session_len = cfg.session_len
        self.max_bs = cfg.max_batch_size
        self.max_blocks = -(-cfg.session_len // runner.block_size)
        self.buckets = batch_buckets(self.max_bs)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
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
        self.positions = torch.zeros(n, **i32)
        self.slot_mapping = torch.full((n,), -1, **i32)
        self.block_tables = torch.zeros(n, self.max_blocks, **i32)
        self.context_lens = torch.zeros(n, **i32)
        self.cu_seqlens = torch.arange(n + 1, **i32)

    def _meta(self, bs: int) -> AttnMetadata:
        return AttnMetadata(positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
                            block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                            cu_seqlens_q=self.cu_seqlens[:bs + 1], q_lens=[1] * bs,
                            ctx_lens=[self.session_len] * bs, is_decode=True, max_context_len=self.session_len)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._static_buffers()
        kv = self.runner.kv_cache
        pool = None
        for bs in reversed(self.buckets):           # largest first: smaller graphs reuse its memory pool
            meta = self._meta(bs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):         # warm-up compiles and loads every kernel before capture
                for _ in range(2):
                    self.model.forward(self.input_ids[:bs], meta, kv)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model.forward(self.input_ids[:bs], meta, kv)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def can_run(self, meta: AttnMetadata) -> bool:
        return (self.enabled and meta.is_decode and len(meta.q_lens) <= self.max_bs
                and meta.max_context_len <= self.session_len and meta.block_tables.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.context_lens[:n].copy_(meta.context_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.context_lens[n:bs].fill_(0)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]

"""Model runner: turns a scheduled batch into flat tensors, runs the model over the paged cache, samples.

The same code runs on CPU (pure-torch reference ops) and GPU (cupy kernels chosen inside each op by device);
the GPU path adds CUDA graphs for decode batches (backend/engine/cuda_graph.py) without the scheduler knowing.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch

from ..config import EngineConfig
from ..kernels.kv_cache import KVCache
from ..kernels.paged_attention import AttnMetadata
from ..model.config import ModelConfig
from ..model.llama import LlamaModel
from ..model.rotation import resolve_kv_rotation
from ..model.sampler import build_sampling_batch, sample
from ..model.weights import load_weights
from .sequence import Sequence

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if model_cfg.torch_dtype == "bfloat16" else torch.float16


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing that changes the logits first (no penalty, no min_tokens ban, no logprobs)."""
    p = seq.params
    return (p.is_greedy and p.repetition_penalty == 1.0 and not p.logprobs
            and len(seq.output_ids) >= p.min_tokens)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: Optional[ModelConfig] = None, weights=None):
        self.config = config
        self.model_cfg = model_cfg or ModelConfig.load(config.model)
        self.model_cfg.validate_tp(config.tp)
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.model_cfg, self.device)
        if weights is None:
            weights = load_weights(config.model, self.model_cfg)
        weights = {k: (v.to(self.dtype) if v.is_floating_point() else v).to(self.device)
                   for k, v in weights.items()}
        rot = resolve_kv_rotation(config.kv_rotation, config.kv_cache_dtype, self.model_cfg.head_dim,
                                  bool(config.kv_qparams))
        self.model = LlamaModel(self.model_cfg, weights, config.rope_scaling_factor, config.use_logn_attn, rot)
        self.model.fuse_rope_kv = config.fuse_rope_kv
        self.block_size = config.cache_block_seq_len
        self.num_blocks = self._num_kv_blocks()
        c = self.model_cfg
        self.kv_cache = KVCache(c.num_layers, self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim,
                                config.kv_cache_dtype, self.dtype, self.device)
        if config.kv_qparams:
            from ..kernels.kv_static import load_kv_qparams
            self.model.kv_qparams = load_kv_qparams(config.kv_qparams, c.num_layers, c.num_kv_heads,
                                                    config.kv_cache_dtype).to(self.device)
        self.eos_ids: List[int] = list(c.eos_token_ids)
        self.graphs = None
        if self.device.type == "cuda" and config.use_cuda_graph and not config.kv_qparams:   # static KV: eager
            from .cuda_graph import DecodeGraphs
            self.graphs = DecodeGraphs(self)
        log.info("model runner: %s %s, %d KV blocks of %d tokens (%s%s)", self.device, self.dtype,
                 self.num_blocks, self.block_size, config.kv_cache_dtype, ", Hadamard-rotated" if rot else "")

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model_cfg
        return KVCache.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.config.kv_cache_dtype,
                                       self.dtype)

    def _num_kv_blocks(self) -> int:
        cme = self.config.cache_max_entry_count
        if cme > 1:
            return int(cme)
        per_block = self.kv_bytes_per_token * self.block_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * cme) // per_block)
        if self.config.cpu_kv_blocks:
            return self.config.cpu_kv_blocks
        want = -(-self.config.session_len // self.block_size) * self.config.max_batch_size
        cap = int(_mem_available_bytes() * 0.25 * cme) // per_block
        return max(1, min(want, cap))

    # -- inputs ------------------------------------------------------------------------------------------------
    def prepare(self, batch: List[Tuple[Sequence, int]]):
        """-> (input_ids [T], AttnMetadata, indices of each sequence's last token in T)."""
        bs = self.block_size
        ids, pos, slots, q_lens, ctx_lens, last = [], [], [], [], [], []
        for seq, n in batch:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            r = range(start, start + n)
            pos.extend(r)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in r)
            q_lens.append(n)
            ctx_lens.append(start + n)
            last.append(len(ids) - 1)
        width = max(-(-c // bs) for c in ctx_lens)
        tables = [seq.block_table[:width] + [0] * (width - min(width, len(seq.block_table))) for seq, _ in batch]
        cu = [0]
        for q in q_lens:
            cu.append(cu[-1] + q)
        # one int32 buffer for all metadata: on the GPU, two host-to-device copies a step instead of six
        b, t = len(batch), len(ids)
        flat = torch.tensor(pos + slots + ctx_lens + cu + [x for row in tables for x in row], dtype=torch.int32)
        input_ids = torch.tensor(ids, dtype=torch.int64)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
            input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
        positions, slot_mapping, context_lens, cu_seqlens, block_tables = flat.split([t, t, b, b + 1, b * width])
        block_tables = block_tables.view(b, width)                                        # [B, max_blocks]
        meta = AttnMetadata(positions=positions, slot_mapping=slot_mapping, block_tables=block_tables,
                            context_lens=context_lens, cu_seqlens_q=cu_seqlens, q_lens=q_lens, ctx_lens=ctx_lens,
                            is_decode=all(q == 1 for q in q_lens), max_context_len=max(ctx_lens))
        return input_ids, meta, last

    # -- one step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: List[Tuple[Sequence, int]]) -> List[Optional[Tuple[int, Optional[float]]]]:
        """Compute the batch; for each sequence that reaches its end, sample one token (else None)."""
        if not batch:
            return []
        g, bucket = self.graphs, 0          # bucket > 0: a graph with lm_head + argmax inside ran this step
        if g is not None and g.can_load(batch):
            bucket = g.load_decode(batch)
            g.replay(bucket)
            hidden, last = g.outputs[bucket][:len(batch)], list(range(len(batch)))
        else:
            input_ids, meta, last = self.prepare(batch)
            if g is not None and g.can_run(meta):
                hidden = g.run(input_ids, meta)
                bucket = g.bucket(len(batch)) if g.in_graph else 0
            else:
                hidden = self.model.forward(input_ids, meta, self.kv_cache)
        rows = [i for i, (seq, n) in enumerate(batch) if seq.num_computed_tokens + n == len(seq)]
        results: List[Optional[Tuple[int, Optional[float]]]] = [None] * len(batch)
        if not rows:
            return results
        seqs = [batch[i][0] for i in rows]
        picked = [last[i] for i in rows]
        if bucket and picked == list(range(len(batch))):    # lm_head and the argmax ran inside the graph
            logits, argmax = g.logits[bucket][:len(batch)], g.tokens[bucket][:len(batch)]
        else:                                       # decode: every row samples; no gather (no H2D index copy)
            logits = self.model.logits(hidden if picked == list(range(hidden.shape[0])) else hidden[picked])
            argmax = None                                                                 # logits: [B, V] fp32
        if all(_plain_greedy(s) for s in seqs):     # what sample() reduces to here, without its 7 small H2D copies
            tokens, logprobs = (logits.argmax(-1) if argmax is None else argmax), None
        else:
            sb = build_sampling_batch(seqs, self.device, self.eos_ids, logits.shape[1])
            tokens, logprobs = sample(logits, sb)
        tokens = tokens.tolist()
        logprobs = logprobs.tolist() if logprobs is not None else [None] * len(rows)
        for i, t, lp in zip(rows, tokens, logprobs):
            results[i] = (t, lp if batch[i][0].params.logprobs else None)
        return results

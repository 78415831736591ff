"""`lmtriton lite calibrate`: run the fp model over calibration text, layer by layer, and keep statistics.

Per decoder layer: for the input of each linear group (qkv, o, gate_up, down) the per-channel max |x| and mean
|x| over all calibration tokens (AWQ's activation scale); for K (after RoPE) and V the per-head min, max and
max |x| (static KV quantization parameters). Written to WORK_DIR/calib_stats.pt with the settings used, so
that `auto_awq` can re-read the same calibration windows.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

import torch
from tqdm import tqdm

from .layerwise import LayerwiseCheckpoint, layer_forward
from .wiki_text import token_windows

log = logging.getLogger(__name__)

STATS_FILE = "calib_stats.pt"
LINEAR_INPUTS = ("qkv", "o", "gate_up", "down")


class LayerStats:
    """Accumulates one layer's statistics from layer_forward observations."""

    def __init__(self):
        self.absmax: Dict[str, torch.Tensor] = {}
        self.abssum: Dict[str, torch.Tensor] = {}
        self.count: Dict[str, int] = {}
        self.kv: Dict[str, Dict[str, torch.Tensor]] = {}

    def observe(self, name: str, t: torch.Tensor) -> None:
        if name in ("k", "v"):                       # t: [n, S, Hk, D]
            x = t.transpose(2, 3).reshape(-1, t.shape[2])              # [n*S*D, Hk]
            cur = {"min": x.amin(0), "max": x.amax(0)}
            old = self.kv.get(name)
            self.kv[name] = cur if old is None else {"min": torch.minimum(old["min"], cur["min"]),
                                                     "max": torch.maximum(old["max"], cur["max"])}
            return
        a = t.abs()                                  # t: [T, C]
        mx, sm = a.amax(0), a.sum(0, dtype=torch.float64)
        if name in self.absmax:
            mx, sm = torch.maximum(self.absmax[name], mx), self.abssum[name] + sm
        self.absmax[name], self.abssum[name] = mx, sm
        self.count[name] = self.count.get(name, 0) + t.shape[0]

    def result(self) -> dict:
        out = {n: {"absmax": self.absmax[n], "absmean": (self.abssum[n] / self.count[n]).float()}
               for n in LINEAR_INPUTS}
        for n in ("k", "v"):
            out[n] = dict(self.kv[n], absmax=torch.maximum(self.kv[n]["min"].abs(), self.kv[n]["max"].abs()))
        return out


def calib_windows(model_dir, calib_text: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    from backend.llm import load_tokenizer
    tok = load_tokenizer(model_dir)
    return torch.tensor(token_windows(tok, calib_text, "calib", samples, seqlen, seed))      # [N, S]


def calibrate(model_dir, work_dir, calib_text: str = "wiki", samples: int = 128, seqlen: int = 2048,
              seed: int = 0, batch: int = 4, progress: bool = True) -> Path:
    """-> path of the statistics file written into work_dir."""
    t0 = time.time()
    ckpt = LayerwiseCheckpoint(model_dir)
    cfg = ckpt.cfg
    ids = calib_windows(model_dir, calib_text, samples, seqlen, seed)
    torch.manual_seed(seed)
    x = ckpt.embed(ids)                                                      # [N, S, H]
    layers: List[dict] = []
    with torch.inference_mode():
        for i in tqdm(range(cfg.num_layers), desc="calibrate", unit="layer", disable=not progress):
            acc = LayerStats()
            x = layer_forward(ckpt.layer(i), cfg, ckpt.family, x, acc.observe, batch)
            layers.append(acc.result())
    meta = {"model_dir": str(Path(model_dir).resolve()), "arch": cfg.arch, "calib_text": calib_text,
            "samples": samples, "seqlen": seqlen, "seed": seed, "num_tokens": int(ids.numel()),
            "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "seconds": round(time.time() - t0, 1)}
    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "layers": layers}, out / STATS_FILE)
    log.info("calibrated %s on %d tokens in %.1fs -> %s", model_dir, ids.numel(), meta["seconds"], out / STATS_FILE)
    return out / STATS_FILE


def load_stats(work_dir, num_layers: int = 0) -> dict:
    """The statistics `calibrate` wrote into work_dir; a clear error when they are missing or do not fit."""
    path = Path(work_dir) / STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no calibration statistics at {path}: run "
                                f"`lmtriton lite calibrate --model MODEL --work-dir {work_dir}` first")
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stats, dict) or "layers" not in stats or "meta" not in stats:
        raise ValueError(f"{path} is not a calibration statistics file written by `lmtriton lite calibrate`")
    if num_layers and len(stats["layers"]) != num_layers:
        raise ValueError(f"{path} has statistics for {len(stats['layers'])} layers, the model has {num_layers}: "
                         f"it was calibrated for another model ({stats['meta'].get('model_dir')})")
    return stats

"""`lmtriton lite kv_qparams`: static per-layer, per-head KV quantization parameters from calibration statistics.

Reads the K (after RoPE) / V per-head min and max that `lite calibrate` collected and writes them as the JSON the
engine reads (EngineConfig.kv_qparams, backend/kernels/kv_static.py); scale and zero are derived at load time for
the chosen kv_cache_dtype (int8: (max - min) / 255, int4: / 15; zero = min). Online per-token quantization
(kv_cache_dtype int8 / int4 without this file) needs no calibration at all.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from backend.kernels.kv_static import FORMAT

from .calibrate import load_stats

log = logging.getLogger(__name__)

KV_QPARAMS_FILE = "kv_qparams.json"


def write_kv_qparams(work_dir, out: Optional[str] = None) -> Path:
    """-> path of the written file (default WORK_DIR/kv_qparams.json)."""
    stats = load_stats(work_dir)
    layers = stats["layers"]
    missing = [i for i, s in enumerate(layers) if "k" not in s or "v" not in s]
    if missing:
        raise ValueError(f"calibration statistics in {work_dir} have no K/V ranges for layers {missing[:5]}; "
                         f"re-run `lmtriton lite calibrate`")
    d = {"format": FORMAT, "num_layers": len(layers), "num_kv_heads": int(layers[0]["k"]["min"].numel()),
         "source": stats["meta"]}
    for name in ("k", "v"):
        d[f"{name}_min"] = torch.stack([s[name]["min"] for s in layers]).tolist()      # [L][Hk]
        d[f"{name}_max"] = torch.stack([s[name]["max"] for s in layers]).tolist()
    path = Path(out) if out else Path(work_dir) / KV_QPARAMS_FILE
    path.write_text(json.dumps(d, indent=1))
    log.info("static KV parameters for %d layers x %d heads -> %s", d["num_layers"], d["num_kv_heads"], path)
    return path

"""Benchmark results: percentiles, the machine a run used, and the files a run leaves (JSON + Markdown table).

Every result file carries the command that made it, the machine and the date, so a table in docs/benchmarks.md
can always be traced back and reproduced.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

log = logging.getLogger(__name__)


def percentiles(values: Sequence[float], qs=(50, 90, 99)) -> Dict[str, Optional[float]]:
    """{'p50': .., 'p90': .., 'p99': ..} by linear interpolation; None for an empty list."""
    if not values:
        return {f"p{q}": None for q in qs}
    v = sorted(values)
    out = {}
    for q in qs:
        pos = (len(v) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        out[f"p{q}"] = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return out


def mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def machine() -> dict:
    info = {"host_cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["host_cpu"] = names[0]
    except OSError:
        pass
    return info


def meta(bench: str, argv: Sequence[str]) -> dict:
    return {"bench": bench, "command": "lmtriton bench " + shlex.join([bench, *argv]),
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: List[dict], columns: List[tuple]) -> str:
    """columns: (key, header) pairs; a key may be 'a.b' to reach into a nested dict."""
    def get(row, key):
        for part in key.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        return row
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(get(r, k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(out_dir, name: str, result: dict, table: str) -> Path:
    """Write <name>.json and <name>.md (header + table) under out_dir; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    m = result["meta"]
    mach = m["machine"]
    where = mach.get("gpu", mach["host_cpu"] + f" ({mach['cpu_count']} cores)")
    head = (f"`{m['command']}` — {where}, torch {mach['torch']}, {m['date_utc']}\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in result.get("model", {}).items()))
    (out / f"{name}.md").write_text(head + "\n" + table + "\n")
    log.info("wrote %s and %s.md", path, name)
    return path


def plot(json_path: Path) -> None:
    """The PNG next to a result file; where matplotlib is missing (the GPU image), say how to make it later."""
    try:
        from . import plots
    except ImportError as e:
        log.warning("no plot (%s): run `python -m scripts.plots %s` where matplotlib is installed", e, json_path)
        return
    plots.main([str(json_path)])

"""Validation of a checkpoint's AWQ quantization config (HF `quantization_config` or AutoAWQ quant_config.json).

Accepted: AutoAWQ "gemm" checkpoints and what `lmtriton lite auto_awq` writes: 4-bit, zero point, group size
32 / 64 / 128 dividing every linear's in_features. Anything else fails here, naming the field and what would work.
"""
from __future__ import annotations

from typing import Dict

from ..kernels.w4a16 import SUPPORTED_GROUP_SIZES

QUANT_CONFIG_FILE = "quant_config.json"     # AutoAWQ's side file (older checkpoints have only this one)


def parse_awq_config(qc: dict, in_features: Dict[str, int]) -> dict:
    """qc: the checkpoint's quantization config; in_features: linear input name -> size.
    -> {"method": "awq", "bits": 4, "group_size": g}."""
    method = qc.get("quant_method", "awq" if "w_bit" in qc else None)
    if str(method).lower() != "awq":
        raise ValueError(f"quantization_config.quant_method must be 'awq' (AutoAWQ or `lmtriton lite auto_awq`), "
                         f"got {method!r}")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"quantization_config.bits must be 4 (W4A16), got {bits!r}")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version {version!r} is not supported: only AutoAWQ 'gemm' packing "
                         f"(qweight [in, out/8]) is")
    if qc.get("zero_point", True) is not True:
        raise ValueError("quantization_config.zero_point must be true: only asymmetric AWQ (with qzeros) is supported")
    g = qc.get("group_size", qc.get("q_group_size"))
    if g not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"quantization_config.group_size must be one of {SUPPORTED_GROUP_SIZES}, got {g!r}")
    bad = {k: v for k, v in in_features.items() if v % g}
    if bad:
        ok = [s for s in SUPPORTED_GROUP_SIZES if all(v % s == 0 for v in in_features.values())]
        raise ValueError(f"quantization_config.group_size {g} does not divide in_features {bad}; "
                         f"group sizes that fit this model: {ok or 'none'}")
    return {"method": "awq", "bits": 4, "group_size": int(g)}

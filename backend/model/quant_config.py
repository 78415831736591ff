"""Validation of a checkpoint's AWQ quantization config (HF `quantization_config` or AutoAWQ quant_config.json).

Accepted: AutoAWQ "gemm" checkpoints and what `lmtriton lite auto_awq` writes: 4-bit, zero point, group size
32 / 64 / 128 dividing every linear's in_features. Anything else fails here, naming the field and what would work.
zero_point says how the zeros are stored: true (AutoAWQ: integer zeros packed into int32 `qzeros`) or "fp16"
(lmtriton: fractional fp16 `zeros`, backend/kernels/w4a16.py); the loader takes either.
"""
from __future__ import annotations

from typing import Dict

from ..kernels.w4a16 import SUPPORTED_GROUP_SIZES

QUANT_CONFIG_FILE = "quant_config.json"     # AutoAWQ's side file (older checkpoints have only this one)
ZERO_POINT_FP16 = "fp16"                    # quantization_config.zero_point of fp16 fractional zeros


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
    zp = qc.get("zero_point", True)
    if zp is not True and zp != ZERO_POINT_FP16:
        raise ValueError(f"quantization_config.zero_point must be true (AutoAWQ: packed int4 qzeros) or "
                         f"{ZERO_POINT_FP16!r} (fp16 zeros, `lmtriton lite auto_awq`), got {zp!r}; only asymmetric "
                         f"AWQ is supported")
    g = qc.get("group_size", qc.get("q_group_size"))
    if g not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"quantization_config.group_size must be one of {SUPPORTED_GROUP_SIZES}, got {g!r}")
    bad = {k: v for k, v in in_features.items() if v % g}
    if bad:
        ok = [s for s in SUPPORTED_GROUP_SIZES if all(v % s == 0 for v in in_features.values())]
        raise ValueError(f"quantization_config.group_size {g} does not divide in_features {bad}; "
                         f"group sizes that fit this model: {ok or 'none'}")
    return {"method": "awq", "bits": 4, "group_size": int(g)}

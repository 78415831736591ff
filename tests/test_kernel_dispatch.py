"""Which CUDA kernel a shape gets: pure decisions, checked on the CPU (the kernels themselves: -m gpu tests)."""
import os
import pytest

from backend.kernels import paged_attention as pa
from backend.kernels.w4a16_gemm import splitk_config


def test_decode_attention_auto_takes_tensor_cores_for_gqa_or_quantized_kv():
    assert pa.use_mma(32, 8, "auto") and pa.use_mma(9, 3, "auto")                     # GQA, 16-bit cache
    assert pa.use_mma(32, 32, "auto", "int8") and pa.use_mma(32, 32, "auto", "int4")  # MHA, quantized cache
    assert not pa.use_mma(32, 32, "auto")                      # MHA, 16-bit cache: the CUDA-core kernel is faster
    assert not pa.use_mma(64, 4, "auto", "int8")               # GQA ratio 16: the mma kernel takes at most 8
    assert pa.use_mma(32, 32, "mma") and not pa.use_mma(32, 8, "cuda")
    with pytest.raises(ValueError, match="'auto', 'cuda' or 'mma'"):
        pa.use_mma(32, 8, "tensor")


def test_default_partition_follows_the_kernel_choice():
    # bs=1: the mma kernel's grid is one CTA per KV head, the CUDA-core kernel's one per query-head tile
    assert pa.default_partition(1, 32, 8, "auto") == pa.SMALL_PARTITION
    assert pa.default_partition(64, 32, 32, "auto", "int8") == pa.PARTITION


def test_split_reduce_auto_combines_in_the_last_cta_only_on_small_grids(monkeypatch):
    monkeypatch.setattr(pa._cupy, "SPLIT_REDUCE", "auto")
    assert pa.block_reduce(1, 32, 32, "auto", "int8") and pa.block_reduce(1, 32, 8, "auto")        # bs=1
    assert not pa.block_reduce(16, 32, 8, "auto") and not pa.block_reduce(16, 32, 32, "auto")     # 16 x 4k
    for mode, want in (("block", True), ("kernel", False)):
        monkeypatch.setattr(pa._cupy, "SPLIT_REDUCE", mode)
        assert pa.block_reduce(16, 32, 8, "auto") is want and pa.block_reduce(1, 32, 8, "auto") is want


def test_split_cap_bounds_the_grid_not_the_context(monkeypatch):
    """A CUDA graph passes session_len as the bound: the tensor-core kernel's split count stops at
    SPLIT_CTAS_PER_SM CTAs an SM and longer contexts get longer splits; the CUDA-core kernel is not capped."""
    monkeypatch.setattr(pa._cupy, "sm_count", lambda device: 132)
    monkeypatch.setattr(pa, "SPLIT_CTAS_PER_SM", 8)
    # bs=16 GQA, tensor cores: 128 CTAs a split, 512-token splits; cap ceil(8 * 132 / 128) = 9
    assert pa.split_plan(16, 32, 8, 4096, 0) == (8, 512)
    assert pa.split_plan(16, 32, 8, 8192, 0) == (9, 512)
    # bs=64 MHA with an int8 cache (tensor cores): 2,048 CTAs a split fill the GPU, one split
    assert pa.split_plan(64, 32, 32, 2112, 0, kv_dtype="int8") == (1, 512)
    # bs=1 GQA: 8 CTAs a split, cap 132: the bound decides
    assert pa.split_plan(1, 32, 8, 8192, 0) == (64, 128)
    # MHA fp16 (CUDA-core kernel) and explicit partitions are not capped; the cap can be switched off
    assert pa.split_plan(64, 32, 32, 2112, 0) == (5, 512)
    assert pa.split_plan(16, 32, 8, 8192, 0, partition=512) == (16, 512)
    monkeypatch.setattr(pa, "SPLIT_CTAS_PER_SM", 0)
    assert pa.split_plan(64, 32, 32, 2112, 0, kv_dtype="int8") == (5, 512)
    with pytest.raises(ValueError, match="multiple of 16, got 100"):
        pa.split_plan(1, 32, 32, 8192, 0, partition=100)
    # a split's tokens: the minimum up to splits * minimum tokens, then longer, in whole 16-token tiles
    assert pa.split_len(300, 9, 512) == 512 and pa.split_len(8192, 9, 512) == 912
    assert pa.split_len(8192, 16, 512) == 512 and pa.split_len(7000, 6, 128) == 1168


@pytest.mark.parametrize("M,N,K", [(16, 4096, 4096), (64, 11008, 4096), (33, 4096, 11008)])
def test_splitk_config_fills_the_sms_and_covers_the_tokens(M, N, K):
    cfg = splitk_config(M, N, K, sm_count=132)
    assert cfg.bm >= M or cfg.bm == 64
    assert cfg.warps_m == 1 and 1 <= cfg.splitk <= K // 64 // 4
    blocks = -(-N // cfg.bn) * -(-M // cfg.bm) * cfg.splitk
    assert 132 <= blocks <= 4 * 132, blocks


def test_rotary_write_kv_names_a_bad_hadamard_mode():
    import torch
    from backend.kernels.kv_cache import KVCache
    from backend.kernels.rotary_kv import rotary_write_kv
    q, k = torch.zeros(1, 4, 64), torch.zeros(1, 2, 64)
    cache = KVCache(1, 2, 16, 2, 64, "auto", torch.float32, "cpu")
    with pytest.raises(ValueError, match="hadamard must be 0 .* got 3"):
        rotary_write_kv(q, k, k, torch.zeros(1, dtype=torch.int32), torch.ones(32), 0, cache.layer(0),
                        torch.zeros(1, dtype=torch.int32), hadamard=3)


@pytest.mark.parametrize("name,value,shown", [("LMTRITON_ATTN_SPLIT_CTAS", "eight", "'eight'"),
                                              ("LMTRITON_ATTN_SPLIT_CTAS", "0", "0"),
                                              ("LMTRITON_W4A16_SPLITK_MIN", "3.5", "'3.5'")])
def test_integer_env_knobs_are_refused_by_name(name, value, shown):
    assert f"{name} must be an integer >= 1, got {shown}" in _import_error_with(name, value)


def _import_error_with(name: str, value: str) -> str:
    """stderr of importing the kernels in a fresh interpreter with `name=value` (the knobs are read at import)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", "import backend.kernels.w4a16, backend.kernels.paged_attention"],
                       env=dict(os.environ, **{name: value}), capture_output=True, text=True)
    assert r.returncode != 0
    return r.stderr


@pytest.mark.parametrize("name,value,allowed", [("LMTRITON_ATTN_RAW_CODES", "int2", "none, int4, all"),
                                                ("LMTRITON_FUSE_SILU", "on", "0, 1"),
                                                ("LMTRITON_DECODE_ATTN", "tensor", "auto, cuda, mma"),
                                                ("LMTRITON_SPLIT_REDUCE", "last", "auto, block, kernel")])
def test_choice_env_knobs_are_refused_by_name(name, value, allowed):
    assert f"{name} must be one of {allowed}, got '{value}'" in _import_error_with(name, value)


def test_decode_gemv_defaults(monkeypatch):
    from backend.kernels import w4a16_decode
    from backend.kernels.w4a16_decode import DecodeConfig
    monkeypatch.setattr(w4a16_decode._cupy, "sm_count", lambda device: 132)
    dc = w4a16_decode.default_config
    assert all(dc(n, k, g, 0).il for n, k in ((4096, 4096), (22016, 4096), (4096, 11008)) for g in (128, 64, 32))
    # the H100 sweeps' best (docs/benchmarks.md, session 7): 32 adjacent chunks a block-step at every group
    assert dc(4096, 4096, 128, 0) == DecodeConfig(nt=1, ks=8, u=4, il=True)
    # group 128, 8-warp grid in (1, 1.5] waves (qkv / up of the 7B shape): 4 warps a block
    assert dc(11008, 4096, 128, 0) == DecodeConfig(nt=1, ks=4, u=2, il=True)
    assert dc(12288, 4096, 128, 0) == DecodeConfig(nt=1, ks=4, u=2, il=True)
    assert dc(22016, 4096, 128, 0) == DecodeConfig(nt=1, ks=8, u=2, il=True)      # 2.6 waves
    assert dc(6144, 4096, 128, 0) == DecodeConfig(nt=1, ks=8, u=4, il=True)       # under one wave
    assert dc(11008, 4096, 64, 0) == DecodeConfig(nt=1, ks=8, u=2, il=True)      # 128 only: as measured
    assert dc(4096, 4096, 64, 0) == DecodeConfig(nt=1, ks=16, u=2, il=True)
    assert dc(4096, 11008, 64, 0) == DecodeConfig(nt=1, ks=16, u=2, il=True)
    assert dc(4096, 4096, 32, 0) == DecodeConfig(nt=1, ks=8, u=4, il=True)
    assert dc(22016, 4096, 64, 0) == DecodeConfig(nt=1, ks=8, u=2, il=True)      # past one wave: as before
    # gemv_silu: twice the warps, but never past 16 (1,024 threads would cap the kernel at 64 registers)
    assert w4a16_decode.gated_config(22016, 4096, 128, 0) == DecodeConfig(nt=1, ks=16, u=2, il=True)
    assert w4a16_decode.gated_config(4096, 4096, 64, 0) == DecodeConfig(nt=1, ks=16, u=4, il=True)

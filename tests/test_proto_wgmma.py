"""The data flow of scripts/proto_wgmma_gemm.py, emulated on the CPU: the runtime layout's packed words give each lane
the register A fragments of a k-tile (mma row g / g + 8, columns 2t, 2t + 1, 2t + 8, 2t + 9), the tokens enter the
shared-memory B operand permuted by PERM, and the accumulator fragment maps back to (channel, token). If PERM or the
epilogue's mapping were wrong, this product would not be the reference's. What it cannot check without a GPU: that
wgmma's register A and D fragments and the swizzled descriptor behave as the PTX documentation says (the script's
own check() on the device does)."""
import torch

from backend.kernels import w4a16
from backend.kernels.w4a16_runtime import repack
from scripts.proto_wgmma_gemm import PERM, permute


def _dequant_tiles(rt, scale, zero, nt: int, c: int) -> torch.Tensor:
    """-> A [4 k-tiles, 16 rows, 16 mma columns] of n-tile nt, chunk c, assembled lane by lane from the packed
    words as the mma A fragment layout places them."""
    words = rt.qweight[nt, c].to(torch.int64) & 0xFFFFFFFF      # [32 lanes, 4 words]
    A = torch.zeros(4, 16, 16, dtype=torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for s in range(4):                                        # word s = k-tile s = (h, jj)
            h = s // 2
            for reg in range(4):                                  # mma register a_reg: rows g + 8 (reg & 1)
                rb, pp = reg & 1, reg >> 1
                for pl in range(2):
                    q = int(words[lane, s] >> (4 * (4 * pl + 2 * pp + rb))) & 0xF
                    row = g + 8 * rb
                    k = 64 * c + 32 * h                           # the group of this half chunk
                    n = 16 * nt + row
                    A[s, row, 2 * t + 8 * pp + pl] = (q - zero[k // rt.group_size, n]) * scale[k // rt.group_size, n]
    return A


def test_perm_and_fragments_reproduce_the_reference():
    torch.manual_seed(0)
    K, N, group, M = 192, 48, 64, 5
    lin = w4a16.random_awq_linear(K, N, group, dtype=torch.float32, seed=3)
    q = w4a16.unpack_awq(lin.qweight)
    rt = repack(q, lin.zeros, lin.scales.half(), group)
    scale = lin.scales.half().double()
    zero = lin.zeros.double()
    x = torch.randn(M, K, dtype=torch.float64)
    xp = permute(x)
    assert torch.equal(xp[:, 64 + 16], x[:, 64 + PERM[16]])
    y = torch.zeros(M, N, dtype=torch.float64)
    for nt in range(N // 16):
        d = torch.zeros(16, M, dtype=torch.float64)               # wgmma's D of this warp: rows x tokens
        for c in range(K // 64):
            A = _dequant_tiles(rt, scale, zero, nt, c)
            for s in range(4):                                    # B of k-tile s: smem columns 16 s .. 16 s + 15
                d += A[s] @ xp[:, 64 * c + 16 * s: 64 * c + 16 * s + 16].t()
        for i in range(32 * 4):                                   # the kernel's epilogue map, lane by lane
            lane, j = divmod(i, 4)
            g, t = divmod(lane, 4)
            for blk in range(8):                                  # d[4 blk + j]
                row, tok = g + 8 * ((j >> 1) & 1), 8 * blk + 2 * t + (j & 1)
                if tok < M:
                    y[tok, 16 * nt + row] = d[row, tok]
    ref = w4a16.w4a16_linear_ref(x, lin.qweight, lin.zeros, lin.scales.half().double(), group)
    torch.testing.assert_close(y, ref.double(), rtol=1e-4, atol=1e-5)      # the reference multiplies in float32

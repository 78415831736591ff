"""Numpy emulation of the register/fragment index math of paged_attention_mma.py (fp16) for one 16-token tile.

Each lane's registers are built from the cache bytes exactly as the kernel's k_regs / v_regs / elem do (prmt,
shifts, the magic-number code conversion), the m16n8k16 fragments are scattered into matrices by the PTX layout,
and S = Q K^T (with the int8/int4 scale/zero fold) and O = P V are compared with a plain float reference.
  python3 scripts/emulate_attention_mma.py        (CPU only; prints one line per case, exits 1 on a mismatch)
  python3 scripts/emulate_attention_mma.py --nvrtc    also compile every kernel variant with NVRTC (no GPU needed;
                                                      cupy's nvrtc bindings and libnvrtc on LD_LIBRARY_PATH)
"""
from __future__ import annotations

import sys

import numpy as np

MAGIC = 0x64006400


def prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def halves(w: int):
    return np.array([w & 0xFFFF, w >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)


def codes2(c: int):
    """fp16 path: (c | MAGIC) - MAGIC, exact."""
    return halves(c | MAGIC) - 1024.0


def consts(kind: int, d: int):
    bits = {0: 16, 1: 8, 2: 4}[kind]
    ch = {0: 8, 1: 16, 2: min(d // 4, 32)}[kind]
    vch = {0: 8, 1: min(d // 8, 16), 2: min(d // 8, 32)}[kind]
    return bits, ch, vch


def elem(kind, s, r, h):
    return 8 * (s >> 1) + 2 * (s & 1) + r + 4 * h if kind == 2 else 4 * s + 2 * r + h


def words(row_bytes: np.ndarray, first_elem: int, n_elems: int, bits: int):
    b = row_bytes[first_elem * bits // 8:(first_elem + n_elems) * bits // 8]
    return [int(x) for x in np.frombuffer(b.tobytes(), dtype=np.uint32)]


def k_regs(kind, w, s):
    if kind == 0:
        return halves(w[2 * s]), halves(w[2 * s + 1])
    if kind == 1:
        return codes2(prmt(w[s], 0, 0x4140)), codes2(prmt(w[s], 0, 0x4342))
    x = w[s >> 1] >> (8 * (s & 1))
    return codes2(x & 0x000F000F), codes2((x >> 4) & 0x000F000F)


def v_regs(kind, wa, wb, i):
    if kind == 0:
        return halves(prmt(wa[i], wb[i], 0x5410)), halves(prmt(wa[i], wb[i], 0x7632))
    if kind == 1:
        byte = 2 * (i & 1)
        x = prmt(wa[i >> 1], wb[i >> 1], byte | ((byte + 4) << 4) | ((byte + 1) << 8) | ((byte + 5) << 12))
        return codes2(prmt(x, 0, 0x4140)), codes2(prmt(x, 0, 0x4342))
    byte = i & 3
    x = prmt(wa[i >> 2], wb[i >> 2], byte | ((byte + 4) << 8))
    return codes2(x & 0x000F000F), codes2((x >> 4) & 0x000F000F)


def mma(a_regs, b_regs):
    """a_regs[lane] = 4 pairs, b_regs[lane] = 2 pairs -> C [16, 8] (float64)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        a0, a1, a2, a3 = a_regs[lane]
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a0, a1
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a2, a3
        b0, b1 = b_regs[lane]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b0, b1
    return A @ B


def c_of(C, lane):
    g, t = lane >> 2, lane & 3
    return [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]


def run_case(kind: int, d: int, rep: int, rng) -> float:
    bits, ch, vch = consts(kind, d)
    spc, ksteps = ch // 4, d // 16
    q = rng.standard_normal((rep, d)).astype(np.float16)
    if kind == 0:
        kx = rng.standard_normal((16, d)).astype(np.float16)
        vx = rng.standard_normal((16, d)).astype(np.float16)
        kraw, vraw = kx.view(np.uint8), vx.view(np.uint8)
        kf, vf = kx.astype(np.float64), vx.astype(np.float64)
        kqp = vqp = None
    else:
        qmax = 255 if kind == 1 else 15
        kc = rng.integers(0, qmax + 1, (16, d)); vc = rng.integers(0, qmax + 1, (16, d))
        kqp = np.stack([rng.uniform(0.005, 0.03, 16), rng.uniform(-2, -0.5, 16)], -1)
        vqp = np.stack([rng.uniform(0.005, 0.03, 16), rng.uniform(-2, -0.5, 16)], -1)
        pack = (lambda c: (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)) if kind == 2 else \
            (lambda c: c.astype(np.uint8))
        kraw, vraw = pack(kc), pack(vc)
        kf = kc * kqp[:, :1] + kqp[:, 1:]
        # V is dequantized in f16x2: one fma rounding, as the kernel
        vs16 = vqp[:, :1].astype(np.float16).astype(np.float64)
        vz16 = vqp[:, 1:].astype(np.float16).astype(np.float64)
        vf = (vc * vs16 + vz16).astype(np.float16).astype(np.float64)
    # S = Q K^T, two n-tiles
    qa = {}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for j in range(ksteps):
            for r in range(2):
                base = (j // spc) * 4 * ch + t * ch
                qa[lane, j, r] = np.array([q[g, base + elem(kind, j % spc, r, h)] if g < rep else 0.0
                                           for h in range(2)], dtype=np.float64)
    S = np.zeros((rep, 16))
    for n in range(2):
        C = np.zeros((16, 8))
        for j in range(ksteps):
            a_regs, b_regs = [], []
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                w = words(kraw[n * 8 + g], (j // spc) * 4 * ch + t * ch, ch, bits)
                b_regs.append(k_regs(kind, w, j % spc))
                z = np.zeros(2)
                a_regs.append((qa[lane, j, 0], z, qa[lane, j, 1], z))
            C += mma(a_regs, b_regs)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            if g >= rep:
                continue
            c = c_of(C, lane)
            for e in range(2):
                tok = 8 * n + 2 * t + e
                x = c[e]
                if kind:
                    x = x * kqp[tok, 0] + q[g].astype(np.float64).sum() * kqp[tok, 1]
                S[g, tok] = x
    err_s = np.abs(S - q.astype(np.float64) @ kf.T).max()
    # P (rows = heads) from the S accumulators' lanes; O^T = V^T P^T
    P = np.exp(S - S.max(1, keepdims=True)).astype(np.float16).astype(np.float64)
    vtok = lambda t: (2 * t, 2 * t + 1, 8 + 2 * t, 9 + 2 * t)
    O = np.zeros((rep, d))
    for c in range(d // (8 * vch)):
        for i in range(vch // 2):
            a_regs, b_regs = [], []
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                tk = vtok(t)
                w = [words(vraw[x], c * 8 * vch + g * vch, vch, bits) for x in tk]
                r0, r1 = v_regs(kind, w[0], w[1], i)
                r2, r3 = v_regs(kind, w[2], w[3], i)
                if kind:
                    s01 = np.array([vs16[tk[0], 0], vs16[tk[1], 0]]); z01 = np.array([vz16[tk[0], 0], vz16[tk[1], 0]])
                    s23 = np.array([vs16[tk[2], 0], vs16[tk[3], 0]]); z23 = np.array([vz16[tk[2], 0], vz16[tk[3], 0]])
                    f16 = lambda x: x.astype(np.float16).astype(np.float64)
                    r0, r1, r2, r3 = f16(r0 * s01 + z01), f16(r1 * s01 + z01), f16(r2 * s23 + z23), f16(r3 * s23 + z23)
                a_regs.append((r0, r1, r2, r3))
                pg = P[g] if g < rep else np.zeros(16)
                b_regs.append((pg[[2 * t, 2 * t + 1]], pg[[8 + 2 * t, 9 + 2 * t]]))
            C = mma(a_regs, b_regs)
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                dd = c * 8 * vch + g * vch + 2 * i
                cc = c_of(C, lane)
                for e in range(2):
                    if 2 * t + e < rep:
                        O[2 * t + e, dd], O[2 * t + e, dd + 1] = cc[e], cc[2 + e]
    err_o = np.abs(O - P @ vf).max()
    return max(err_s, err_o)


def nvrtc_compile_all() -> int:
    """Compile every variant (dtype x D x KV kind x G x tiles) to PTX; -> the number compiled."""
    from cupy_backends.cuda.libs import nvrtc

    from backend.kernels.paged_attention_mma import MMA_SOURCE
    n = 0
    for bf in (0, 1):
        for d in (64, 128):
            for kind in (0, 1, 2):
                for rep in (1, 2, 3, 4, 8):
                    for tiles in ("", 1, 2, 4):
                        opts = ["--std=c++17", "-arch=compute_90", f"-DIS_BF16={bf}", f"-DHEAD_DIM={d}",
                                f"-DKV_KIND={kind}", f"-DREP={rep}"] + ([f"-DTILES={tiles}"] if tiles else [])
                        prog = nvrtc.createProgram(MMA_SOURCE, "k.cu", [], [])
                        try:
                            nvrtc.compileProgram(prog, opts)
                        except Exception:
                            print("NVRTC failed:", opts, nvrtc.getProgramLog(prog))
                            raise
                        ptx = nvrtc.getPTX(prog)
                        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
                        assert ".local" not in ptx, f"local memory (spilled arrays) in {opts}"
                        n += 1
    return n


def main() -> int:
    if "--nvrtc" in sys.argv:
        print(f"NVRTC: {nvrtc_compile_all()} variants compiled, no local memory")
    rng = np.random.default_rng(0)
    bad = 0
    for kind in (0, 1, 2):
        for d in (64, 128):
            for rep in (1, 3, 4, 8):
                err = run_case(kind, d, rep, rng)
                ok = err < 1e-6
                bad += not ok
                print(f"kv_kind={kind} D={d} G={rep}: max |emulated - reference| = {err:.2e}",
                      "ok" if ok else "MISMATCH")
    # bf16 int8 codes: (128 + (c & 127)) - (bit7 ? 0 : 128) must be c for every byte
    for c in range(256):
        lo = (c & 0x7F) | 0x4300
        sub = ((c & 0x80) ^ 0x80) * 0x86
        bf = lambda x: np.array([x << 16], dtype=np.uint32).view(np.float32)[0]
        if bf(lo) - bf(sub) != c:
            print("bf16 code conversion wrong for", c)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

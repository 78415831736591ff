"""Static SASS size of the kernels without a GPU: NVRTC -> PTX -> ptxas (sm_90) -> cubin; an sm_90 instruction is
16 bytes of the kernel's .text section. For comparing kernel variants offline (the device is scarce): the loop body
of a kernel shows as the difference between two batch sizes.

Needs cupy (its NVRTC binding + nvidia-cuda-nvrtc-cu12) and ptxas (PyPI nvidia-cuda-nvcc-cu12; --ptxas or $PTXAS):
    python -m scripts.sass_size --ptxas /path/to/ptxas
prints, per variant, the instructions and the registers ptxas reports.
"""
from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile


def nvrtc_output(source: str, options, arch: str = "compute_90", cubin: bool = False) -> bytes:
    """NVRTC's PTX (arch compute_XX) or cubin (arch sm_XX[a]) of `source`; the compile log on stderr if it fails."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(source, "k.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [f"-arch={arch}", "-std=c++17", *options])
    except Exception:
        sys.stderr.write(nvrtc.getProgramLog(prog))
        raise
    out = nvrtc.getCUBIN(prog) if cubin else nvrtc.getPTX(prog)
    return out if isinstance(out, bytes) else bytes(out) if cubin else out.encode()


def text_sizes(cubin: bytes) -> dict:
    """{kernel: instructions} from the ELF section headers (.text.<kernel>)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = secs[shstrndx][4]
    sizes = {}
    for sec in secs:
        name = cubin[names + sec[0]: cubin.index(b"\0", names + sec[0])].decode()
        if name.startswith(".text."):
            sizes[name[6:]] = sec[5] // 16
    return sizes


def sass_size(source: str, kernel: str, options, ptxas: str):
    """-> (instructions, ptxas's register line) of `kernel`."""
    with tempfile.TemporaryDirectory() as td:
        p, c = os.path.join(td, "k.ptx"), os.path.join(td, "k.cubin")
        with open(p, "wb") as f:
            f.write(nvrtc_output(source, options))
        r = subprocess.run([ptxas, "-arch=sm_90", "-v", p, "-o", c], capture_output=True, text=True, check=True)
        with open(c, "rb") as f:
            sizes = text_sizes(f.read())
    regs = [line.split(":", 1)[-1].strip() for line in r.stderr.splitlines() if "registers" in line]
    return sizes[kernel], regs[-1] if regs else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ptxas", default=os.environ.get("PTXAS", "ptxas"))
    args = ap.parse_args(argv)
    from backend.kernels import paged_attention_mma, w4a16_decode
    w4 = ["-DIS_BF16=0", "-DNT=1", "-DKS=8", "-DL2PF=0", "-DIL=0", "-DZFRAC=0"]
    name = w4a16_decode.KERNEL
    for group in (128, 32):
        for u in (2, 4):
            n, regs = sass_size(w4a16_decode._SOURCE, name, w4 + [f"-DGROUP_SIZE={group}", f"-DU={u}"], args.ptxas)
            print(f"{name} g{group} U={u}: {n} instructions; {regs}")
    for raw in (0, 1):
        for kind in (1, 2):
            opts = ["-DIS_BF16=0", "-DHEAD_DIM=128", f"-DKV_KIND={kind}", "-DREP=4", f"-DRAW_CODES={raw}"]
            n, regs = sass_size(paged_attention_mma.MMA_SOURCE, "paged_decode_mma", opts, args.ptxas)
            print(f"paged_decode_mma D128 G4 {('int8', 'int4')[kind - 1]} RAW_CODES={raw}: {n} instructions; {regs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of llama.cpp's quantization kernels through moepack.gguf.kernels: MB/s of f32 input per type, 1 vs 2 threads.

Run: .venv/bin/python bench/quantize_kernels.py [--rows 1024 --cols 4096 --types Q4_K,IQ2_XXS]
Grid set-up of the IQ types (once per process) is timed separately as `init s`.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from moepack.gguf import kernels as ggml
from moepack.gguf import types as gt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--types", default=",".join(t.name for t in gt.QUANT_TYPES))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)  # (rows, n)
    imatrix = rng.uniform(0.1, 4.0, args.cols).astype(np.float32)  # (n,)
    mb = x.nbytes / 2**20
    print(f"# {' '.join(sys.argv)}  ({args.rows}x{args.cols} f32 = {mb:.0f} MiB, with an imatrix)")
    print("| type | bpw | init s | 1 thread MB/s | 2 threads MB/s | dequant MB/s |")
    print("|---|---|---|---|---|---|")
    for name in args.types.split(","):
        t = gt.parse_type(name)
        t0 = time.perf_counter()
        ggml._init_type(t)
        init = time.perf_counter() - t0
        speed = []
        for threads in (1, 2):
            t0 = time.perf_counter()
            q = ggml.quantize(x, t, imatrix=imatrix, threads=threads)
            speed.append(mb / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ggml.dequantize(q, t, x.shape, threads=2)
        deq = mb / (time.perf_counter() - t0)
        bpw = gt.bits_per_weight(t)
        print(f"| {t.name} | {bpw:.3f} | {init:.2f} | {speed[0]:.1f} | {speed[1]:.1f} | {deq:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

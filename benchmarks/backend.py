"""Matmul throughput of each compute path on this machine's MLX backend (which BLAS, which dtype).

    python benchmarks/backend.py [--shapes 1x1536x6144,512x1536x6144] [--repeat 5]

Rows: float32 / bfloat16 / float16 dense matmul, and MLX's quantized matmul (4- and 8-bit, group 64) with
bf16 and float32 activations and scales, plus "dequantize then float32 matmul" and the product the model
actually runs (`mlx_gemma4.kernels.products.quantized_matmul`: quantized below UNPACK_MIN_ROWS rows, unpacked + sgemm
from there on the CPU). Shapes are M x K x N (x: M x K, weight: N x K as in a Linear). The backend policy
(`mlx_gemma4.runtime.RuntimePolicy.describe`) is printed at the end; this table is the evidence for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx_gemma4  # noqa: E402  (preloads the optimized BLAS before mlx.core)
from mlx_gemma4 import runtime  # noqa: E402
from mlx_gemma4.kernels import products  # noqa: E402

import mlx.core as mx  # noqa: E402


def _time(fn, repeat: int) -> float:
    mx.eval(fn())  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best


def _probe(fn) -> float:
    t = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t


def paths(M: int, K: int, N: int):
    """(name, thunk) for each compute path at M x K x N."""
    key = mx.random.key(0)
    w32 = 0.02 * mx.random.normal((N, K), key=key)
    x32 = mx.random.normal((M, K), key=mx.random.key(1))
    out = []
    for dt in (mx.float32, mx.bfloat16, mx.float16):
        w, x = w32.astype(dt), x32.astype(dt)
        mx.eval(w, x)
        out.append((f"{dt} matmul", lambda w=w, x=x: x @ w.T))
    for bits in (4, 8):
        for dt in (mx.bfloat16, mx.float32):
            wq, s, b = mx.quantize(w32.astype(dt), group_size=64, bits=bits)
            x = x32.astype(dt)
            mx.eval(wq, s, b, x)
            out.append((f"q{bits} qmm ({dt} x, scales)",
                        lambda wq=wq, s=s, b=b, x=x, bits=bits: mx.quantized_matmul(
                            x, wq, s, b, transpose=True, group_size=64, bits=bits)))
        wq, s, b = mx.quantize(w32.astype(mx.bfloat16), group_size=64, bits=bits)
        mx.eval(wq, s, b)
        out.append((f"q{bits} dequantize + float32 matmul",
                    lambda wq=wq, s=s, b=b, bits=bits: x32 @ mx.dequantize(
                        wq, s, b, group_size=64, bits=bits).astype(mx.float32).T))
        s32, b32 = s.astype(mx.float32), b.astype(mx.float32)
        mx.eval(s32, b32)
        out.append((f"q{bits} products.quantized_matmul (what the model runs)",
                    lambda wq=wq, s=s32, b=b32, bits=bits: products.quantized_matmul(x32, wq, s, b, 64, bits)))
    return out


def measure(shapes, repeat: int, cap_s: float):
    """Yield one row per (shape, path) as soon as it is measured.

    A path too slow to run at full M (more than cap_s predicted) is timed at M=8 and M=16 and extrapolated
    along t(M) = a + b*M (a: per-call work such as dequantizing the weight); its row is marked "~"."""
    for M, K, N in shapes:
        flops = 2 * M * K * N
        small = {8: dict(paths(8, K, N)), 16: dict(paths(16, K, N))} if M > 16 else {}
        for name, fn in paths(M, K, N):
            row = {"shape": f"{M}x{K}x{N}", "path": name, "extrapolated": False}
            if small:
                t8, t16 = (_time(small[m][name], 1) for m in (8, 16))
                slope = max(t16 - t8, 0.0) / 8
                predicted = max(t8 - 8 * slope, 0.0) + slope * M
                if predicted > cap_s:
                    row.update(ms=1e3 * predicted, gflops=flops / predicted / 1e9, extrapolated=True)
                    yield row
                    continue
            t = _time(fn, repeat)
            row.update(ms=1e3 * t, gflops=flops / t / 1e9)
            yield row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1x1536x6144,512x1536x6144")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cap-s", type=float, default=5.0, help="extrapolate paths slower than this from M=8")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"MLX {mx.__version__}, device {mx.default_device()}, BLAS: {runtime.blas_in_use}")
    print("| M x K x N | path | ms | GFLOP/s |\n|---|---|---:|---:|")
    for r in measure(shapes, args.repeat, args.cap_s):
        mark = "~" if r["extrapolated"] else ""
        print(f"| {r['shape']} | {r['path']} | {mark}{r['ms']:.2f} | {mark}{r['gflops']:.2f} |", flush=True)
    print(f"\npolicy: {runtime.RuntimePolicy.from_arguments().describe()}")


if __name__ == "__main__":
    main()

"""Kernel benchmarks, printed as one markdown table.

    python benchmarks/kernels.py [--sizes 2048,8192,32768] [--repeat 3] [--quick]

Always (any machine): sliding-window prefill, our blockwise MLX path vs the masked full attention mlx-lm uses
(`mx.fast.scaled_dot_product_attention` over all keys with an (n, n) window mask), E2B sliding-layer shapes
(8 query heads, 1 KV head, head dim 256, window 512).
On a Mac with Metal: each Metal kernel vs its MLX peer (`mx.gather_qmm` for the 26B A4B experts,
`mx.fast.scaled_dot_product_attention` for attention). Without Metal it says so and times the MLX path of the
same calls instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx_gemma4  # noqa: E402  (BLAS preload before mlx.core)
import mlx.core as mx  # noqa: E402

from mlx_gemma4 import runtime  # noqa: E402
from mlx_gemma4.kernels import ExpertBank, expert_glu, use_backend, windowed_attention  # noqa: E402
from mlx_gemma4.kernels.sliding_attention import dense_attention_mlx, visibility  # noqa: E402

E2B_SLIDING = dict(heads=8, kv_heads=1, head_dim=256, window=512)
MOE_26B = dict(experts=128, hidden=2816, inter=704, top_k=8, bits=4, group_size=64)
# masked full attention materializes (heads, n, n) float32 scores: skip sizes that would not fit comfortably
FULL_SCORES_LIMIT_BYTES = 6 << 30


def timeit(fn, repeat: int) -> float:
    mx.eval(fn())  # warm-up (compiles kernels, allocates)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed run (shared machines)


def fmt_ms(s: float | None) -> str:
    return "skipped" if s is None else f"{s * 1e3:.1f} ms"


def row(name, shape, ours, peer, note=""):
    speed = f"{peer / ours:.2f}x" if ours and peer else "-"
    print(f"| {name} | {shape} | {fmt_ms(ours)} | {fmt_ms(peer)} | {speed} | {note} |")


def bench_sliding_prefill(sizes, repeat, dtype):
    d = E2B_SLIDING
    for n in sizes:
        mx.random.seed(0)
        q = mx.random.normal((1, d["heads"], n, d["head_dim"])).astype(dtype)
        k = mx.random.normal((1, d["kv_heads"], n, d["head_dim"])).astype(dtype)
        v = mx.random.normal((1, d["kv_heads"], n, d["head_dim"])).astype(dtype)
        kw = dict(scale=d["head_dim"] ** -0.5, q_start=0, k_start=0, window=d["window"])
        with use_backend("mlx"):
            ours = timeit(lambda: windowed_attention(q, k, v, **kw), repeat)
        scores = d["heads"] * n * n * 4
        note = ""
        if scores > FULL_SCORES_LIMIT_BYTES:
            peer = None
            note = f"masked full attention skipped: its {scores / 2**30:.0f} GiB score matrix does not fit"
        else:
            mask = visibility(mx.arange(n), mx.arange(n), d["window"])
            peer = timeit(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=kw["scale"], mask=mask),
                          repeat)
        row("sliding prefill: blockwise MLX vs masked full (mlx-lm)", f"n={n} H=8/1 D=256 w=512 {dtype_name(dtype)}",
            ours, peer, note)
        del q, k, v


def dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def random_quantized_bank(E, out, inp, bits, group_size, dtype):
    """A packed bank with random codes (quantizing 500M random floats would take minutes)."""
    words = inp * bits // 32
    w = mx.random.randint(0, 2**31 - 1, (E, out, words)).astype(mx.uint32)
    scales = (mx.random.uniform(shape=(E, out, inp // group_size)) * 0.01).astype(dtype)
    biases = (mx.random.normal((E, out, inp // group_size)) * 0.01).astype(dtype)
    return ExpertBank(w, scales, biases, bits=bits, group_size=group_size)


def bench_experts(tokens, repeat, metal, dtype):
    m = MOE_26B
    mx.random.seed(1)
    gate_up = random_quantized_bank(m["experts"], 2 * m["inter"], m["hidden"], m["bits"], m["group_size"], dtype)
    down = random_quantized_bank(m["experts"], m["hidden"], m["inter"], m["bits"], m["group_size"], dtype)
    for T in tokens:
        x = mx.random.normal((T, m["hidden"])).astype(dtype)
        idx = mx.argsort(mx.random.uniform(shape=(T, m["experts"])), axis=-1)[:, : m["top_k"]].astype(mx.int32)
        w = mx.softmax(mx.random.normal((T, m["top_k"])), axis=-1)
        shape = f"T={T} E=128 top-8 H=2816 I=704 q4g64 {dtype_name(dtype)}"
        with use_backend("mlx"):
            peer = timeit(lambda: expert_glu(x, idx, w, gate_up, down), repeat)
        if metal:
            with use_backend("metal"):
                ours = timeit(lambda: expert_glu(x, idx, w, gate_up, down), repeat)
            row("experts: Metal kernel vs mx.gather_qmm path", shape, ours, peer)
        else:
            row("experts: MLX path (mx.gather_qmm)", shape, peer, None, "Metal absent: MLX path only")


def bench_attention_metal(repeat, metal, dtype):
    """Metal prefill/decode kernels vs mx.fast.scaled_dot_product_attention (same mask)."""
    cases = [  # (name, Hq, Hkv, D, L, S, window)
        ("sliding prefill", 8, 1, 256, 2048, 2048, 512),
        ("global prefill (D=512)", 16, 2, 512, 2048, 2048, None),
        ("sliding decode", 8, 1, 256, 1, 512, 512),
        ("global decode (D=512)", 16, 2, 512, 1, 8192, None),
    ]
    for name, Hq, Hkv, D, L, S, window in cases:
        mx.random.seed(2)
        q = mx.random.normal((1, Hq, L, D)).astype(dtype)
        k = mx.random.normal((1, Hkv, S, D)).astype(dtype)
        v = mx.random.normal((1, Hkv, S, D)).astype(dtype)
        kw = dict(scale=D**-0.5, q_start=S - L, k_start=0, window=window)
        shape = f"L={L} S={S} H={Hq}/{Hkv} D={D} w={window} {dtype_name(dtype)}"
        peer = timeit(lambda: dense_attention_mlx(q, k, v, **kw), repeat)
        if metal:
            with use_backend("metal"):
                ours = timeit(lambda: windowed_attention(q, k, v, **kw), repeat)
            row(f"attention {name}: Metal kernel vs mx.fast.sdpa", shape, ours, peer)
        else:
            with use_backend("mlx"):
                ours = timeit(lambda: windowed_attention(q, k, v, **kw), repeat)
            row(f"attention {name}: MLX path vs mx.fast.sdpa (masked)", shape, ours, peer,
                "Metal absent: MLX path timed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,8192,32768", help="sliding prefill lengths")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [512, 1024]
    metal = bool(mx.metal.is_available())
    cpu_dtype = mx.float32  # MLX's CPU backend is fastest in float32 (see mlx_gemma4/runtime.py)
    dtype = mx.bfloat16 if metal else cpu_dtype
    print(f"device: {'Metal GPU' if metal else 'CPU'} ({platform.machine()}, {os.cpu_count()} cores), "
          f"mlx {mx.__version__}, BLAS: {runtime.blas_in_use}")
    if not metal:
        print("Metal is absent on this machine: Metal-kernel rows time the MLX path instead.")
    print()
    print("| benchmark | shape | ours | peer | speedup | note |")
    print("|---|---|---|---|---|---|")
    with mx.stream(mx.gpu if metal else mx.cpu):
        bench_sliding_prefill(sizes, args.repeat, dtype)
        bench_attention_metal(args.repeat, metal, dtype)
        bench_experts([1, 8] if args.quick else [1, 8, 512 if metal else 128], args.repeat, metal, dtype)


if __name__ == "__main__":
    main()

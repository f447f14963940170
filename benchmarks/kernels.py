"""Kernel benchmarks, printed as markdown tables.

    python benchmarks/kernels.py [--sizes 2048,8192,32768] [--contexts 4096,32768] [--repeat 3] [--quick]

1. Sliding-window prefill (any machine): our blockwise MLX path vs the masked full attention mlx-lm uses
   (`mx.fast.scaled_dot_product_attention` over all keys with an (n, n) window mask), E2B sliding-layer shapes.
2. Decode kernels, per published model shape: the emulator's device-memory traffic (bytes read / the minimum:
   each needed K/V or expert byte once) and threadgroup count (msim, needs the test extra and g++), beside the
   MLX path's time on this machine; on a Mac also the Metal kernel's time on the GPU next to the MLX path's there.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # kernel_emulator: the emulator as the kernels' factory

import mlx_gemma4  # noqa: E402  (BLAS preload before mlx.core)
import mlx.core as mx  # noqa: E402
from kernel_emulator import attention_shapes, decode_attention_traffic, expert_decode_traffic  # noqa: E402

from mlx_gemma4 import runtime  # noqa: E402
from mlx_gemma4.kernels import ExpertBank, expert_decode, kernel_runner  # noqa: E402
from mlx_gemma4.kernels import use_backend, windowed_attention  # noqa: E402
from mlx_gemma4.kernels.gather_experts import expert_glu_mlx  # noqa: E402
from mlx_gemma4.kernels.sliding_attention import visibility, windowed_attention_mlx  # noqa: E402

E2B_SLIDING = dict(heads=8, kv_heads=1, head_dim=256, window=512)
MOE_26B = dict(experts=128, hidden=2816, inter=704, top_k=8)
VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")
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


def gpu_times(kernel, mlx_path, repeat):
    """(Metal kernel ms, MLX path ms) on the GPU, or (None, None) without Metal."""
    if kernel_runner() is None or not mx.metal.is_available():
        return None, None
    with mx.stream(mx.gpu), use_backend("metal"):
        ours = timeit(kernel, repeat)
    with mx.stream(mx.gpu):
        peer = timeit(mlx_path, repeat)
    return ours, peer


def decode_row(name, shape, traffic, threadgroups, cpu, metal, gpu_mlx):
    ratio = "-" if traffic is None else f"{traffic:.3f}"
    tgs = "-" if threadgroups is None else str(threadgroups)
    print(f"| {name} | {shape} | {ratio} | {tgs} | {fmt_ms(cpu)} | {fmt_ms(metal)} | {fmt_ms(gpu_mlx)} |")


def bench_decode_attention(contexts, repeat):
    for variant in VARIANTS:
        for kind, Hq, Hkv, D, window in attention_shapes(variant):
            for context in contexts:
                visible = context if window is None else min(context, window)
                traffic, tgs = decode_attention_traffic(Hq, Hkv, D, visible)
                mx.random.seed(3)
                q = mx.random.normal((1, Hq, 1, D)).astype(mx.bfloat16)
                k, v = (mx.random.normal((1, Hkv, visible, D)).astype(mx.bfloat16) for _ in range(2))
                kw = dict(scale=D**-0.5, q_start=visible - 1, k_start=0, window=window)
                with mx.stream(mx.cpu):
                    cpu = timeit(lambda: windowed_attention_mlx(q, k, v, **kw), repeat)
                metal, gpu_mlx = gpu_times(lambda: windowed_attention(q, k, v, **kw),
                                           lambda: windowed_attention_mlx(q, k, v, **kw), repeat)
                decode_row(f"decode attention {variant} {kind.split('_')[0]}",
                           f"ctx={context} H={Hq}/{Hkv} D={D} bf16", traffic, tgs, cpu, metal, gpu_mlx)
                del q, k, v


def bench_decode_experts(tokens, repeat):
    m = MOE_26B
    for bits in (4, 8):
        mx.random.seed(1)
        gate_up = random_quantized_bank(m["experts"], 2 * m["inter"], m["hidden"], bits, 64, mx.bfloat16)
        down = random_quantized_bank(m["experts"], m["hidden"], m["inter"], bits, 64, mx.bfloat16)
        for T in tokens:
            launches = expert_decode_traffic(bits, 64, T)
            traffic = max(ratio for _, ratio, _ in launches)  # the worse of gate/up and down
            tgs = sum(t for _, _, t in launches)  # launched; those at repeated expert positions exit at once
            x = mx.random.normal((T, m["hidden"])).astype(mx.bfloat16)
            idx = mx.argsort(mx.random.uniform(shape=(T, m["experts"])), axis=-1)[:, : m["top_k"]].astype(mx.int32)
            w = mx.softmax(mx.random.normal((T, m["top_k"])), axis=-1)
            with mx.stream(mx.cpu):
                cpu = timeit(lambda: expert_glu_mlx(x, idx, w, gate_up, down), repeat)
            metal, gpu_mlx = gpu_times(lambda: expert_decode.expert_decode_metal(kernel_runner(), x, idx, w, gate_up,
                                                                                 down),
                                       lambda: expert_glu_mlx(x, idx, w, gate_up, down), repeat)
            decode_row("expert decode 26b-a4b", f"T={T} E=128 top-8 q{bits}g64 bf16", traffic, tgs, cpu, metal,
                       gpu_mlx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,8192,32768", help="sliding prefill lengths")
    ap.add_argument("--contexts", default="4096,32768", help="decode attention contexts")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.quick:
        sizes, contexts = [512, 1024], [4096]
    metal = bool(mx.metal.is_available())
    print(f"device: {'Metal GPU' if metal else 'CPU'} ({platform.machine()}, {os.cpu_count()} cores), "
          f"mlx {mx.__version__}, BLAS: {runtime.blas_in_use}")
    print()
    print("| benchmark | shape | ours | peer | speedup | note |")
    print("|---|---|---|---|---|---|")
    with mx.stream(mx.gpu if metal else mx.cpu):
        # MLX's CPU backend is fastest in float32 (see mlx_gemma4/runtime.py)
        bench_sliding_prefill(sizes, args.repeat, mx.bfloat16 if metal else mx.float32)
    print()
    print("Decode kernels: traffic = bytes read / minimum bytes in the msim emulator (1.000 = every needed byte "
          "once), threadgroups = pass-1 threadgroups of attention / gate-up + down launches of the experts")
    print()
    print("| kernel | shape | traffic (emulator) | threadgroups | MLX path, CPU | Metal kernel, GPU | MLX path, GPU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    bench_decode_attention(contexts, args.repeat)
    bench_decode_experts([1, 8] if args.quick else [1, 2, 4, 8], args.repeat)


if __name__ == "__main__":
    main()

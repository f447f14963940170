"""Quantization time at a published model's real dimensions (random weights): is the fitted quantizer practical
for the 26B A4B?

    python benchmarks/quant_time.py [--variant 26b-a4b] [--bits 4] [--group-size 64] [--json out.json]

Every quantizable text-decoder matrix of the variant (the module tree is built lazily: nothing of the model is
allocated), grouped by shape; one matrix of each shape (bf16, N(0, 0.02)) is quantized by MLX's min/max
`mx.quantize` (what mlx-lm's convert does) and by `mlx_gemma4.quant.affine.quantize`, unweighted and weighted by a
random per-column importance (what calibrated recipes pass); the full model's time is the sum over shapes of
count x seconds. Not included: the calibration forward pass of calibrated recipes (one pass over 2048 tokens)
and AWQ's scale search.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_gemma4  # noqa: E402,F401  (preloads the optimized BLAS before mlx.core)

import mlx.core as mx  # noqa: E402

from mlx_gemma4.memory import is_quantizable, load_preset, text_param_specs  # noqa: E402
from mlx_gemma4.quant import affine  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="26b-a4b")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    gs, bits = args.group_size, args.bits

    shapes = Counter(shape for name, shape in text_param_specs(load_preset(args.variant))
                     if is_quantizable(name, shape, gs))
    mx.eval(affine.quantize(mx.zeros((64, 4 * gs)), gs, bits))  # compile the fitter once
    print(f"{args.variant}: {sum(shapes.values())} matrices, {len(shapes)} shapes, {bits}-bit g{gs}, bf16 weights")
    print("| shape | count | M weights each | min/max s | fitted s | fitted, weighted s |")
    print("|---|---:|---:|---:|---:|---:|")
    rows, totals = [], [0.0, 0.0, 0.0]
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[1] * int(mx.prod(mx.array(kv[0])).item())):
        w = (0.02 * mx.random.normal(shape, key=mx.random.key(0))).astype(mx.bfloat16)
        importance = mx.random.uniform(0.1, 10.0, (shape[-1],), key=mx.random.key(1))
        mx.eval(w, importance)
        seconds = [timed(lambda: mx.quantize(w, group_size=gs, bits=bits)),
                   timed(lambda: affine.quantize(w, gs, bits)),
                   timed(lambda: affine.quantize(w, gs, bits, importance))]
        del w
        for i, s in enumerate(seconds):
            totals[i] += count * s
        rows.append({"shape": list(shape), "count": count, "seconds": seconds})
        size = 1
        for d in shape:
            size *= d
        print(f"| {'x'.join(map(str, shape))} | {count} | {size / 1e6:.1f} | "
              + " | ".join(f"{s:.2f}" for s in seconds) + " |", flush=True)
    print(f"| **whole model, minutes** | {sum(shapes.values())} | | "
          + " | ".join(f"**{t / 60:.1f}**" for t in totals) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"variant": args.variant, "bits": bits, "group_size": gs,
                                               "rows": rows, "total_seconds": totals}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

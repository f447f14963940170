"""Quantization time at the 26B A4B's real dimensions (synthetic weights): is the fitted quantizer practical there?

    flock /tmp/heavy.lock python benchmarks/quant_time.py [--layers 2] [--recipes minmax,uniform,mixed,awq]

Two measurements, MLX's own min/max quantization (`mx.quantize`, what mlx-lm's convert does) side by side:
  * the token embedding (262144 x 2816, bf16), quantized alone at 4 and 8 bits;
  * a synthetic 26B A4B checkpoint cut to --layers decoder layers (published dimensions: 128 experts of 704, the
    sliding and full attention shapes; vocabulary cut to 16384 so the table does not dominate) quantized by
    `mlx_gemma4.quant.quantize` with each recipe, calibration included (the shipped text tokenized by the demo
    model's Gemma tokenizer, ids folded into the cut vocabulary).
The full model's estimate is 30 x (seconds per layer) + the embedding at the recipe's embedding bits. Weights are
bf16, computed on this machine's CPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_gemma4  # noqa: E402,F401  (preloads the optimized BLAS before mlx.core)

import mlx.core as mx  # noqa: E402

from mlx_gemma4.loading import load_model  # noqa: E402
from mlx_gemma4.memory import load_preset  # noqa: E402
from mlx_gemma4.quant import Recipe, affine, quantize  # noqa: E402
from mlx_gemma4.runtime import RuntimePolicy  # noqa: E402
from mlx_gemma4.synth import shrink_config, write_checkpoint  # noqa: E402

FULL_LAYERS = 30
EMBEDDING = (262144, 2816)
VOCAB = 16384
RECIPES = {
    "minmax": Recipe("uniform", method="minmax"),
    "uniform-unweighted": Recipe("uniform", calibration=False),
    "uniform": Recipe("uniform"),
    "mixed": Recipe("mixed"),
    "awq": Recipe("mixed", awq=True),
    "dynamic": Recipe("dynamic"),
}
EMBEDDING_BITS = {"minmax": 4, "uniform-unweighted": 4, "uniform": 4, "mixed": 8, "awq": 8, "dynamic": 8}


class FoldedProcessor:
    """The demo tokenizer with ids folded into a cut vocabulary (timing only: the text's meaning is lost)."""

    def __init__(self, processor, vocab: int):
        self.processor, self.vocab = processor, vocab

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [t % self.vocab for t in self.processor.encode(text, add_bos=add_bos)]


def demo_processor():
    from mlx_gemma4.gguf import demo_model_path, gguf_processor, gguf_tokenizer, open_gguf

    gf = open_gguf(demo_model_path())
    return gguf_processor(gf, gguf_tokenizer(gf))


def time_embedding(bits: int) -> tuple[float, float]:
    """(min/max seconds, fitted seconds) for the full token embedding at `bits`."""
    w = (0.02 * mx.random.normal(EMBEDDING, key=mx.random.key(0))).astype(mx.bfloat16)
    mx.eval(w)
    t = time.perf_counter()
    mx.eval(mx.quantize(w, group_size=64, bits=bits))
    minmax = time.perf_counter() - t
    t = time.perf_counter()
    mx.eval(affine.quantize(w, 64, bits))
    fitted = time.perf_counter() - t
    return minmax, fitted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--recipes", default=",".join(RECIPES))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown} (known: {', '.join(RECIPES)})")

    embedding = {bits: time_embedding(bits) for bits in (4, 8)}
    print("| token embedding 262144 x 2816 | min/max s | fitted s |")
    print("|---|---:|---:|")
    for bits, (minmax, fitted) in embedding.items():
        print(f"| {bits}-bit g64 | {minmax:.1f} | {fitted:.1f} |", flush=True)

    processor = FoldedProcessor(demo_processor(), VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        config = shrink_config(load_preset("26b-a4b"), layers=args.layers, vocab=VOCAB)
        write_checkpoint(config, tmp)
        print(f"\n26B A4B, {args.layers} layers at real dims (bf16), 4-bit g64; full model = {FULL_LAYERS} layers "
              "x s/layer + embedding")
        print("| recipe | seconds | s/layer | full 26B estimate, min |")
        print("|---|---:|---:|---:|")
        for name in names:
            model = load_model(Path(tmp), policy=RuntimePolicy.from_arguments("bfloat16"))
            mx.eval(model.parameters())
            t = time.perf_counter()
            quantize(model, 4, 64, RECIPES[name], processor)
            mx.eval(model.parameters())
            seconds = time.perf_counter() - t
            per_layer = seconds / args.layers
            emb = embedding[EMBEDDING_BITS[name]][0 if name == "minmax" else 1]
            print(f"| {name} | {seconds:.1f} | {per_layer:.1f} | {(FULL_LAYERS * per_layer + emb) / 60:.1f} |",
                  flush=True)
            del model
            gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

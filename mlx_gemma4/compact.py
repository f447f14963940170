"""Model modules whose weights are stored more compactly than the compute dtype.

Two kinds: MLX affine-quantized weights (4/8-bit, packed uint32 with per-group scales and biases), and float
weights kept in bfloat16/float16 while the model computes in float32 (`load(..., weights_dtype="bfloat16")`, half
the memory of float32 weights). The products themselves live in `mlx_gemma4.kernels.products` (when the CPU unpacks
a compact weight, and why).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .kernels.products import compact_matmul, quantized_matmul


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` (same parameters and file layout) computing through `quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        if getattr(self, "mode", "affine") != "affine":
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


class CompactLinear(nn.Linear):
    """`nn.Linear` whose weight may be stored in a narrower float dtype than its input."""

    def __call__(self, x: mx.array) -> mx.array:
        y = compact_matmul(x, self["weight"])
        return y + self["bias"].astype(y.dtype) if "bias" in self else y


class CompactEmbedding(nn.Embedding):
    """`nn.Embedding` whose table may be stored in a narrower float dtype: rows come out in `compute_dtype`."""

    compute_dtype = None

    def __call__(self, x: mx.array) -> mx.array:
        rows = self.weight[x]
        return rows if self.compute_dtype is None else rows.astype(self.compute_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return compact_matmul(x, self.weight)


def use_fast_products(model: nn.Module, compute_dtype: mx.Dtype | None = None) -> None:
    """Give the model's linears and embeddings the compact-aware products, in place (weights are shared):
    every `nn.QuantizedLinear`, and with `compute_dtype` every float `nn.Linear` / `nn.Embedding`."""
    swaps = {nn.QuantizedLinear: QuantizedLinear}
    if compute_dtype is not None:
        swaps.update({nn.Linear: CompactLinear, nn.Embedding: CompactEmbedding})
    for _, module in model.named_modules():
        # the subclasses add behaviour only (no state), so switching the class keeps the module as loaded
        new_class = swaps.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
        if isinstance(module, CompactEmbedding):
            module.compute_dtype = compute_dtype

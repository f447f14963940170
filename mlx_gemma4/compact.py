"""Model modules whose weights are stored more compactly than the compute dtype.

Two kinds: MLX affine-quantized weights (4/8-bit, packed uint32 with per-group scales and biases), and float
weights kept in bfloat16/float16 while the model computes in float32 (`load(..., weights_dtype="bfloat16")`, half
the memory of float32 weights). The products themselves live in `mlx_gemma4.kernels.products` (when the CPU unpacks
a compact weight, and why).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

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


def _as(cls, module: nn.Module) -> nn.Module:
    """A `cls` module holding `module`'s arrays and settings (the subclasses add products, no state)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    dict.update(new, module)
    return new


def use_products(model: nn.Module, compute_dtype: mx.Dtype | None = None) -> None:
    """Put the compact-aware products into the model's tree, as `nn.quantize` puts its quantized layers: every
    `nn.QuantizedLinear` becomes a `QuantizedLinear` and, with `compute_dtype` (float weights stored narrower), every
    float `nn.Linear` / `nn.Embedding` a `CompactLinear` / `CompactEmbedding`, holding the same arrays."""
    swaps = {nn.QuantizedLinear: QuantizedLinear}
    if compute_dtype is not None:
        swaps.update({nn.Linear: CompactLinear, nn.Embedding: CompactEmbedding})

    def choose(_, module):
        cls = swaps.get(type(module))
        if cls is None:
            return module
        new = _as(cls, module)
        if cls is CompactEmbedding:
            new.compute_dtype = compute_dtype
        return new

    model.update_modules(tree_map_with_path(choose, model.leaf_modules(), is_leaf=nn.Module.is_module))

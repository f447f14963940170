"""Model modules whose weights are stored more compactly than the compute dtype.

Two kinds: MLX-quantized weights (packed uint32 with per-group scales, plus biases in the affine mode), and float
weights kept in bfloat16/float16 while the model computes in float32 (`load(..., weights_dtype="bfloat16")`, half
the memory of float32 weights). The products themselves live in `mlx_gemma4.kernels.products` (when the CPU unpacks
a compact weight, and why).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .kernels.products import compact_matmul, dequantize, quantized_head_matmul, quantized_matmul


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` (same parameters and file layout) computing through `quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                             self.mode)
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


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose rows come out in `compute_dtype` (MLX dequantizes the floating-point modes
    to bfloat16 unless told otherwise); the tied LM head (`as_linear`) computes through `quantized_head_matmul`."""

    compute_dtype = None

    def __call__(self, x: mx.array) -> mx.array:
        biases = self.get("biases")
        return dequantize(self["weight"][x], self["scales"][x], None if biases is None else biases[x],
                          self.group_size, self.bits, self.mode, self.compute_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_head_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size,
                                     self.bits, self.mode)


def _as(cls, module: nn.Module) -> nn.Module:
    """A `cls` module holding `module`'s arrays and settings (the subclasses add products, no state)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    dict.update(new, module)
    return new


def use_products(model: nn.Module, compute_dtype: mx.Dtype | None = None) -> None:
    """Put the compact-aware products into the model's tree, as `nn.quantize` puts its quantized layers: every
    quantized linear and embedding becomes a `QuantizedLinear` / `QuantizedEmbedding` and, with `compute_dtype`,
    every float `nn.Linear` / `nn.Embedding` whose weight is stored in another dtype a `CompactLinear` /
    `CompactEmbedding`, holding the same arrays (embeddings then return rows in `compute_dtype`)."""
    swaps = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}
    compact_floats = {nn.Linear: CompactLinear, nn.Embedding: CompactEmbedding}

    def choose(_, module):
        cls = swaps.get(type(module))
        if compute_dtype is not None and type(module) in compact_floats and module.weight.dtype != compute_dtype:
            cls = compact_floats[type(module)]
        if cls is None:
            return module
        new = _as(cls, module)
        if cls in (CompactEmbedding, QuantizedEmbedding) and compute_dtype is not None:
            new.compute_dtype = compute_dtype
        return new

    model.update_modules(tree_map_with_path(choose, model.leaf_modules(), is_leaf=nn.Module.is_module))

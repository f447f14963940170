"""Products with MLX affine-quantized weights, on the backend's fastest path.

On MLX's CPU backend `quantized_matmul` runs at ~1.5-2 GFLOP/s whatever the number of rows, while BLAS sgemm runs
at ~100: from a few rows on, unpacking the 4/8-bit weight to float32 and calling sgemm is faster, even though the
unpacking is paid on every call (a 1408x2816 expert: 0.14 s quantized at 32 rows, 0.02 s unpacked + sgemm;
`benchmarks/backend.py`, RESULTS.md section 1). Products with fewer rows (decode) stay quantized: they are
memory-bound and the packed weight is 1/8 of the bytes. On a GPU the quantized kernels are always used.

`MLX_GEMMA4_UNPACK_ROWS=N` sets the row count from which the CPU unpacks (0 = never).
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn

UNPACK_MIN_ROWS = 8  # measured break-even on CPU is ~5 rows for a 4-bit 1408x2816 matrix


def unpack_min_rows() -> int | None:
    """Rows from which a quantized product is computed as unpack + float matmul, or None for never."""
    if mx.default_device() != mx.cpu:
        return None
    rows = int(os.environ.get("MLX_GEMMA4_UNPACK_ROWS", UNPACK_MIN_ROWS))
    return rows if rows > 0 else None


@functools.lru_cache(maxsize=None)
def _unpacker(bits: int, group_size: int):
    per_word = 32 // bits
    shifts = mx.array([bits * i for i in range(per_word)], dtype=mx.uint32)
    mask = (1 << bits) - 1

    def unpack(w, scales, biases):
        # mx.quantize packs element j of each word at bits * j (little end first); w = scale * q + bias per group.
        q = ((w[..., None] >> shifts) & mask).astype(scales.dtype)
        q = q.reshape(*w.shape[:-1], scales.shape[-1], group_size)
        return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)

    return mx.compile(unpack)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """The float matrix behind an affine-quantized one, in the scales' dtype (same values as `mx.dequantize`,
    ~2.5x faster on the CPU backend)."""
    if 32 % bits:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
    return _unpacker(bits, group_size)(w, scales, biases)


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                     bits: int) -> mx.array:
    """x @ W.T for an affine-quantized W (out, in): unpacked + float matmul when x has enough rows on the CPU."""
    min_rows = unpack_min_rows()
    rows = x.size // x.shape[-1] if x.ndim else 0
    if min_rows is not None and rows >= min_rows:
        weight = dequantize(w, scales, biases, group_size, bits)
        return x @ weight.astype(x.dtype).T
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` (same parameters and file layout) computing through `quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        if getattr(self, "mode", "affine") != "affine":
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


def use_fast_linears(model: nn.Module) -> None:
    """Give every `nn.QuantizedLinear` in the model the backend-aware product (in place, weights shared)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear

"""Quantized products on the backend's fast path: the CPU's unpack + float matmul gives what MLX's own quantized
kernels give, and loaded quantized models use it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4 import quantized
from mlx_gemma4.loading import load


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_mlx(bits, group_size):
    w = mx.random.normal((3, 40, 256), key=mx.random.key(bits + group_size))
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    ours = quantized.dequantize(q, s, b, group_size, bits)
    assert mx.array_equal(ours, mx.dequantize(q, s, b, group_size=group_size, bits=bits))


@pytest.mark.parametrize("rows", [1, 7, 8, 33])
def test_quantized_matmul_paths(rows, monkeypatch):
    """Below UNPACK_MIN_ROWS the product stays quantized (bit-identical to mx.quantized_matmul); from there on the
    CPU unpacks, equal within float32 rounding. MLX_GEMMA4_UNPACK_ROWS=0 turns the unpacking off."""
    w = mx.random.normal((96, 128), key=mx.random.key(1))
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((rows, 128), key=mx.random.key(2))
    want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4)
    got = quantized.quantized_matmul(x, q, s, b, 64, 4)
    if rows < quantized.UNPACK_MIN_ROWS:
        assert mx.array_equal(got, want)
    else:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
        dense = x @ mx.dequantize(q, s, b, group_size=64, bits=4).T
        assert mx.array_equal(got, dense)  # exactly the unpack + matmul path
    monkeypatch.setenv("MLX_GEMMA4_UNPACK_ROWS", "0")
    assert quantized.unpack_min_rows() is None
    assert mx.array_equal(quantized.quantized_matmul(x, q, s, b, 64, 4), want)


def test_loaded_quantized_model_uses_fast_linears(text_checkpoint):
    model, _ = load(text_checkpoint("e2b"), quantize=4)
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert linears and all(type(m) is quantized.QuantizedLinear for m in linears)
    layer = linears[0]
    x = mx.random.normal((2, 9, layer.weight.shape[1] * 32 // layer.bits), key=mx.random.key(3))
    want = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                               group_size=layer.group_size, bits=layer.bits)
    np.testing.assert_allclose(np.array(layer(x)), np.array(want), rtol=1e-4, atol=1e-4)

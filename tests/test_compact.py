"""Quantized products on the backend's fast path: the CPU's unpack + float matmul gives what MLX's own quantized
kernels give, and loaded quantized models use it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4 import compact
from mlx_gemma4.kernels import products
from mlx_gemma4.loading import load


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_mlx(bits, group_size):
    w = mx.random.normal((3, 40, 256), key=mx.random.key(bits + group_size))
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    ours = products.dequantize(q, s, b, group_size, bits)
    assert mx.array_equal(ours, mx.dequantize(q, s, b, group_size=group_size, bits=bits))


@pytest.mark.parametrize("rows", [1, 7, 8, 33])
def test_quantized_matmul_paths(rows):
    """Below UNPACK_MIN_ROWS the product stays quantized (bit-identical to mx.quantized_matmul); from there on the
    CPU unpacks, equal within float32 rounding. use_unpack_rows(0) turns the unpacking off."""
    w = mx.random.normal((96, 128), key=mx.random.key(1))
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((rows, 128), key=mx.random.key(2))
    want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4)
    got = products.quantized_matmul(x, q, s, b, 64, 4)
    if rows < products.UNPACK_MIN_ROWS:
        assert mx.array_equal(got, want)
    else:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
        dense = x @ mx.dequantize(q, s, b, group_size=64, bits=4).T
        assert mx.array_equal(got, dense)  # exactly the unpack + matmul path
    with products.use_unpack_rows(0):
        assert products.unpack_min_rows() is None
        assert mx.array_equal(products.quantized_matmul(x, q, s, b, 64, 4), want)


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 3, 64), ("affine", 6, 32), ("mxfp4", 4, 32),
                                                   ("mxfp8", 8, 32), ("nvfp4", 4, 16)])
@pytest.mark.parametrize("rows", [1, 16])
def test_quantized_matmul_every_mode(mode, bits, group_size, rows):
    """Every MLX quantization mode: the one-row product is MLX's own, the many-row product the unpacked one (the
    floating-point modes have no biases)."""
    w = mx.random.normal((96, 128), key=mx.random.key(bits))
    q, s, *b = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    b = b[0] if b else None
    x = mx.random.normal((rows, 128), key=mx.random.key(2))
    want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group_size, bits=bits, mode=mode)
    got = products.quantized_matmul(x, q, s, b, group_size, bits, mode)
    assert got.dtype == x.dtype
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    layer = nn.Linear(128, 96, bias=False)
    layer.weight = w
    model = nn.Sequential(nn.QuantizedLinear.from_linear(layer, group_size, bits, mode=mode))
    compact.use_products(model)
    assert isinstance(model.layers[0], compact.QuantizedLinear)
    np.testing.assert_allclose(np.array(model(x)), np.array(want), rtol=1e-4, atol=1e-4)


def test_nvfp4_dequantize_of_an_odd_number_of_groups():
    """Rows of 5 nvfp4 groups gathered 3 at a time (a quantized PLE table's lookup): MLX's own dequantize fails
    on an odd number of scales; ours gives the rows of the whole matrix's dequantization."""
    q, s = mx.quantize(mx.random.normal((8, 80), key=mx.random.key(3)), group_size=16, bits=4, mode="nvfp4")[:2]
    full = mx.dequantize(q, s, None, group_size=16, bits=4, mode="nvfp4", dtype=mx.float32)
    ids = mx.array([[1, 6, 3]])
    with pytest.raises(ValueError):  # the MLX behaviour worked around (remove the workaround once this fails)
        mx.eval(mx.dequantize(q[ids], s[ids], None, group_size=16, bits=4, mode="nvfp4"))
    assert mx.array_equal(products.dequantize(q[ids], s[ids], None, 16, 4, "nvfp4"), full[ids])


def test_quant_params_problem(monkeypatch):
    assert products.quant_params_problem(64, 4, "affine") is None
    assert products.quant_params_problem(16, 4, "nvfp4") is None
    assert "unknown quantization mode 'fp3'" in products.quant_params_problem(32, 3, "fp3")
    assert "takes group size 32, got 64" in products.quant_params_problem(64, 4, "mxfp4")
    assert "takes bits 2 or 3 or 4 or 5 or 6 or 8, got 7" in products.quant_params_problem(64, 7, "affine")
    # an MLX without a mode (as before MLX had the floating-point modes): the mode named, not an MLX traceback
    quantize = mx.quantize

    def older_quantize(w, group_size=64, bits=4, mode="affine"):
        if mode == "mxfp8":
            raise ValueError("[quantize] Invalid quantization mode.")
        return quantize(w, group_size=group_size, bits=bits, mode=mode)

    products.mlx_runs_mode.cache_clear()
    monkeypatch.setattr(mx, "quantize", older_quantize)
    try:
        assert "mxfp8 quantization is not supported by the installed MLX" in products.quant_params_problem(32, 8,
                                                                                                          "mxfp8")
        assert products.quant_params_problem(32, 4, "mxfp4") is None
    finally:
        products.mlx_runs_mode.cache_clear()


def test_loaded_quantized_model_uses_fast_linears(text_checkpoint):
    model, _ = load(text_checkpoint("e2b"), quantize=4)
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert linears and all(type(m) is compact.QuantizedLinear for m in linears)
    layer = linears[0]
    x = mx.random.normal((2, 9, layer.weight.shape[1] * 32 // layer.bits), key=mx.random.key(3))
    want = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                               group_size=layer.group_size, bits=layer.bits)
    np.testing.assert_allclose(np.array(layer(x)), np.array(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 8])
def test_compact_matmul_paths(rows):
    """bf16-stored weight under float32 compute: one-row products run in bf16 (half the bytes read), products
    with UNPACK_MIN_ROWS rows or more upcast the weight and run in float32."""
    w = mx.random.normal((48, 64), key=mx.random.key(4)).astype(mx.bfloat16)
    x = mx.random.normal((rows, 64), key=mx.random.key(5))
    got = products.compact_matmul(x, w)
    assert got.dtype == mx.float32
    if rows < products.UNPACK_MIN_ROWS:
        assert mx.array_equal(got, (x.astype(mx.bfloat16) @ w.T).astype(mx.float32))
    else:
        assert mx.array_equal(got, x @ w.astype(mx.float32).T)


def _rounded_reference(path):
    """The float32 model with every decoder weight matrix rounded through bfloat16: what the compact model
    computes on its prefill path."""
    from mlx.utils import tree_flatten

    model, _ = load(path, dtype="float32")
    model.load_weights([(k, w.astype(mx.bfloat16).astype(mx.float32))
                        for k, w in tree_flatten(model.parameters()) if w.ndim >= 2], strict=False)
    return model


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_bf16_weights_under_float32_compute(variant, text_checkpoint):
    from mlx.utils import tree_flatten

    path = text_checkpoint(variant)
    model, _ = load(path, dtype="float32", weights_dtype="bfloat16")
    params = dict(tree_flatten(model.parameters()))
    assert all(w.dtype == (mx.bfloat16 if w.ndim >= 2 else mx.float32) for w in params.values())
    assert model.dtype == mx.float32
    ids = mx.array(np.random.default_rng(0).integers(3, 500, (1, 24)))
    # every product upcast (as prefill products with UNPACK_MIN_ROWS rows are): float32 math on the bf16-rounded
    # weights, whichever way the weight reaches the product (linear, tied head, expert segment or gather)
    ref = _rounded_reference(path)(ids)
    with products.use_unpack_rows(1):
        logits = model(ids)
    assert logits.dtype == mx.float32
    np.testing.assert_allclose(np.array(logits), np.array(ref), rtol=1e-4, atol=1e-4)
    # decode (one row): bf16 products with float32 everywhere else, so no further from the full forward pass than
    # a model computing wholly in bfloat16 is (tiny random models amplify bf16 rounding: both are ~5-10%)
    cache = model.make_cache()
    model(ids[:, :16], cache=cache)
    steps = mx.concatenate([model(ids[:, t:t + 1], cache=cache) for t in range(16, 24)], axis=1)
    want = np.array(ref[:, 16:])
    bf16_model, _ = load(path, dtype="bfloat16")
    err = np.abs(np.array(steps) - want).max() / np.abs(want).max()
    err_bf16 = np.abs(np.array(bf16_model(ids)[:, 16:].astype(mx.float32)) - want).max() / np.abs(want).max()
    assert err <= err_bf16, f"decode vs full forward: {err:.2e} of the logit scale, bf16 model {err_bf16:.2e}"


@pytest.mark.parametrize("source", ["quantize at load", "quantized checkpoint"])
def test_weights_dtype_leaves_quantized_models_alone(source, text_checkpoint, tmp_path):
    """A quantized model is compact already: its scales/biases stay in the compute dtype (the quantized products'
    fast path), with or without weights_dtype."""
    from mlx.utils import tree_flatten

    from mlx_gemma4.convert import convert

    if source == "quantize at load":
        path, kwargs = text_checkpoint("26b"), {"quantize": 4}
    else:
        path, kwargs = convert(text_checkpoint("26b"), tmp_path / "q4", bits=4), {}
    plain, _ = load(path, dtype="float32", **kwargs)
    model, _ = load(path, dtype="float32", weights_dtype="bfloat16", **kwargs)
    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(plain.parameters()))
    assert {k: w.dtype for k, w in got.items()} == {k: w.dtype for k, w in want.items()}
    assert all(w.dtype == mx.float32 for k, w in got.items() if k.endswith(("scales", "biases")))


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32)])
@pytest.mark.parametrize("rows", [1, 16])
def test_tied_quantized_head_in_pieces(monkeypatch, mode, bits, group_size, rows):
    """The tied LM head of a quantized embedding: one row is MLX's own product; many rows are unpacked a piece of
    vocabulary rows at a time (pieces of 40 rows here, the last one short), equal to MLX's product."""
    monkeypatch.setattr(products, "HEAD_ROWS_PER_PIECE", 40)
    table = nn.Embedding(100, 64)
    table.weight = mx.random.normal((100, 64), key=mx.random.key(bits))
    ours = nn.Sequential(nn.QuantizedEmbedding.from_embedding(table, group_size, bits, mode=mode))
    compact.use_products(ours)
    head = ours.layers[0]
    assert isinstance(head, compact.QuantizedEmbedding)
    x = mx.random.normal((rows, 64), key=mx.random.key(5))
    want = nn.QuantizedEmbedding.as_linear(head, x)
    pieces = []
    product = products.quantized_matmul
    monkeypatch.setattr(products, "quantized_matmul", lambda x, w, *a: pieces.append(w.shape[0]) or product(x, w, *a))
    got = head.as_linear(x)
    assert got.shape == (rows, 100)
    assert pieces == ([100] if rows < products.UNPACK_MIN_ROWS else [40, 40, 20])
    if rows < products.UNPACK_MIN_ROWS:
        assert mx.array_equal(got, want)
    else:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)

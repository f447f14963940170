"""The runtime policy (mlx_gemma4.runtime): backend default dtype, arguments over MLX_GEMMA4_* environment defaults
(read when the policy is built, in load(), never later), and the loaded model applying its kernel choices."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import kernels, load
from mlx_gemma4.kernels import products
from mlx_gemma4.runtime import RuntimePolicy

ON_CPU = mx.default_device() == mx.cpu


def test_cpu_backend_computes_in_float32(monkeypatch):
    monkeypatch.delenv("MLX_GEMMA4_DTYPE", raising=False)
    policy = RuntimePolicy.from_arguments()
    assert policy.dtype == (mx.float32 if ON_CPU else mx.bfloat16)
    assert policy.weights_dtype == policy.dtype
    assert "backend default" in policy.describe()


def test_env_and_argument_override(monkeypatch):
    monkeypatch.setenv("MLX_GEMMA4_DTYPE", "bf16")
    assert RuntimePolicy.from_arguments().dtype == mx.bfloat16
    assert RuntimePolicy.from_arguments("float16").dtype == mx.float16  # an explicit argument beats the environment
    assert "compute dtype bfloat16 (MLX_GEMMA4_DTYPE)" in RuntimePolicy.from_arguments().describe()
    monkeypatch.setenv("MLX_GEMMA4_DTYPE", "int4")
    with pytest.raises(ValueError, match="int4"):
        RuntimePolicy.from_arguments()


def test_weights_dtype_resolution(monkeypatch):
    monkeypatch.delenv("MLX_GEMMA4_WEIGHTS_DTYPE", raising=False)
    assert RuntimePolicy.from_arguments("float32").weights_dtype == mx.float32
    assert RuntimePolicy.from_arguments("float32", "bf16").weights_dtype == mx.bfloat16
    monkeypatch.setenv("MLX_GEMMA4_WEIGHTS_DTYPE", "float16")
    assert RuntimePolicy.from_arguments("float32").weights_dtype == mx.float16
    with pytest.raises(ValueError, match="wider than the compute dtype"):
        RuntimePolicy.from_arguments("bfloat16", "float32")
    with pytest.raises(ValueError, match="unsupported weights dtype"):
        RuntimePolicy.from_arguments("float32", "int8")


def test_kernel_backend_and_unpack_rows_come_from_arguments_then_environment(monkeypatch):
    monkeypatch.delenv("MLX_GEMMA4_KERNELS", raising=False)
    monkeypatch.delenv("MLX_GEMMA4_UNPACK_ROWS", raising=False)
    policy = RuntimePolicy.from_arguments()
    assert policy.kernel_backend == "auto" and policy.unpack_min_rows == products.default_unpack_min_rows()
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "mlx")
    monkeypatch.setenv("MLX_GEMMA4_UNPACK_ROWS", "0")
    policy = RuntimePolicy.from_arguments()
    assert policy.kernel_backend == "mlx" and policy.unpack_min_rows is None
    assert RuntimePolicy.from_arguments(kernels="auto").kernel_backend == "auto"
    if ON_CPU:
        assert RuntimePolicy.from_arguments(unpack_rows=3).unpack_min_rows == 3
    # the kernels themselves never read the environment: only a policy (or use_backend) changes their choice
    assert kernels.backend() == ("metal" if not ON_CPU and mx.metal.is_available() else "mlx")
    assert products.unpack_min_rows() == products.default_unpack_min_rows()
    for bad in ("emulate", "cuda"):
        monkeypatch.setenv("MLX_GEMMA4_KERNELS", bad)
        with pytest.raises(ValueError, match=f"MLX_GEMMA4_KERNELS='{bad}': expected one of auto, metal, mlx"):
            RuntimePolicy.from_arguments()
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "mlx")
    monkeypatch.setenv("MLX_GEMMA4_UNPACK_ROWS", "many")
    if ON_CPU:  # only the CPU unpacks, so only there is the row count read
        with pytest.raises(ValueError, match="MLX_GEMMA4_UNPACK_ROWS='many'"):
            RuntimePolicy.from_arguments()


def test_applied_policy_sets_the_kernel_defaults_and_explicit_overrides_win():
    policy = RuntimePolicy.from_arguments("float32", kernels="mlx", unpack_rows=5)
    with policy.applied():
        assert kernels.backend() == "mlx"
        assert products.unpack_min_rows() == (5 if ON_CPU else None)
        with kernels.use_unpack_rows(0):
            assert products.unpack_min_rows() is None
        with kernels.use_backend("auto"):
            assert kernels.backend() == ("metal" if not ON_CPU and mx.metal.is_available() else "mlx")
    assert products.unpack_min_rows() == products.default_unpack_min_rows()


def test_load_builds_the_policy_once_and_the_model_applies_it(text_checkpoint, monkeypatch):
    """load() reads the environment; changing it afterwards changes nothing. The forward pass runs under the
    model's policy (a products spy sees its unpack threshold)."""
    monkeypatch.setenv("MLX_GEMMA4_UNPACK_ROWS", "3")
    model, _ = load(text_checkpoint("e2b"), dtype="float32", weights_dtype="bfloat16", kernels="mlx")
    monkeypatch.setenv("MLX_GEMMA4_UNPACK_ROWS", "7")
    assert model.policy.kernel_backend == "mlx" and model.policy.weights_dtype == mx.bfloat16
    assert model.policy.unpack_min_rows == (3 if ON_CPU else None)
    seen = []
    original = products.unpack_min_rows

    def spy():
        seen.append((kernels.backend(), original()))
        return seen[-1][1]

    monkeypatch.setattr(products, "unpack_min_rows", spy)
    logits = model(mx.array([[5, 6, 7, 8]]))
    assert np.isfinite(np.array(logits)).all()
    assert seen and set(seen) == {("mlx", 3 if ON_CPU else None)}
    assert products.unpack_min_rows() == products.default_unpack_min_rows()  # only inside the forward pass

"""Compute policy: backend default dtype, MLX_GEMMA4_DTYPE and load(dtype=...) overrides, dequantize decision."""

from __future__ import annotations

import pytest

from mlx_gemma4 import backend

import mlx.core as mx

ON_CPU = mx.default_device() == mx.cpu


def test_cpu_backend_computes_in_float32(monkeypatch):
    monkeypatch.delenv("MLX_GEMMA4_DTYPE", raising=False)
    assert backend.resolve_dtype() == (mx.float32 if ON_CPU else mx.bfloat16)
    assert "backend default" in backend.describe_policy()


def test_env_and_argument_override(monkeypatch):
    monkeypatch.setenv("MLX_GEMMA4_DTYPE", "bf16")
    assert backend.resolve_dtype() == mx.bfloat16
    assert backend.resolve_dtype("float16") == mx.float16  # an explicit argument beats the environment
    assert "compute dtype bfloat16 (MLX_GEMMA4_DTYPE)" in backend.describe_policy()
    monkeypatch.setenv("MLX_GEMMA4_DTYPE", "int4")
    with pytest.raises(ValueError, match="int4"):
        backend.resolve_dtype()

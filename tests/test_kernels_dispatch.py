"""Backend selection: MLX_GEMMA4_KERNELS, use_backend, use_emulator."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import kernels
from mlx_gemma4.kernels import ExpertBank, expert_glu, use_backend, use_emulator, windowed_attention


def test_auto_picks_metal_only_when_available(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.backend() == ("metal" if mx.metal.is_available() else "mlx")
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.backend() == ("metal" if mx.metal.is_available() else "mlx")


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "mlx")
    assert kernels.backend() == "mlx"
    monkeypatch.setenv(kernels.ENV_VAR, "emulate")
    assert kernels.backend() == "emulate"
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MLX_GEMMA4_KERNELS='cuda'"):
        kernels.backend()


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the error raised where Metal is absent")
def test_forcing_metal_without_a_metal_device_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "metal")
    with pytest.raises(RuntimeError, match="no Metal device"):
        kernels.backend()
    monkeypatch.delenv(kernels.ENV_VAR)
    with use_backend("metal"), pytest.raises(RuntimeError, match="no Metal device"):
        windowed_attention(mx.zeros((1, 1, 1, 32)), mx.zeros((1, 1, 1, 32)), mx.zeros((1, 1, 1, 32)), scale=1.0,
                           q_start=0, k_start=0, window=None)


def test_context_managers_override_env_and_nest(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "emulate")
    with use_backend("mlx"):
        assert kernels.backend() == "mlx"
        with use_emulator():
            assert kernels.backend() == "emulate"
        assert kernels.backend() == "mlx"
    assert kernels.backend() == "emulate"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with use_backend("gpu"):
            pass


def test_env_emulate_runs_metal_bodies(monkeypatch):
    """MLX_GEMMA4_KERNELS=emulate sends a plain call through the emulator (same numbers as the MLX path)."""
    rng = np.random.default_rng(0)
    gu = ExpertBank(mx.array(rng.standard_normal((4, 64, 32)).astype(np.float32) * 0.2))
    dn = ExpertBank(mx.array(rng.standard_normal((4, 32, 32)).astype(np.float32) * 0.2))
    x = mx.array(rng.standard_normal((2, 32)).astype(np.float32))
    idx = mx.array([[0, 3], [2, 2]], mx.int32)
    w = mx.array([[0.7, 0.3], [0.5, 0.5]])
    monkeypatch.setenv(kernels.ENV_VAR, "mlx")
    want = expert_glu(x, idx, w, gu, dn)
    monkeypatch.setenv(kernels.ENV_VAR, "emulate")
    got = expert_glu(x, idx, w, gu, dn)
    assert kernels._env_emulator is not None and kernels._env_emulator._cache  # the emulator really ran
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)

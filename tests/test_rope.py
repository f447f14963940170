"""RoPE (rope.py) against transformers' Gemma 4 rotary embedding: the per-layer-type inverse frequencies
(default RoPE on sliding layers, proportional p-RoPE on global layers) and the rotation itself at large
positions, on the published configs' head dims and bases."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding, apply_rotary_pos_emb

from mlx_gemma4 import memory
from mlx_gemma4.config import FULL, SLIDING, TextConfig
from mlx_gemma4.rope import RotaryEmbedding, inverse_frequencies


def configs(variant: str) -> tuple[TextConfig, Gemma4TextConfig]:
    text = memory.load_preset(variant)["text_config"]
    return TextConfig.from_dict(text), Gemma4TextConfig(**text)


def head_dim(ours: TextConfig, kind: str) -> int:
    return ours.layer_head_dims[ours.layer_types.index(kind)]


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b", "31b"])
@pytest.mark.parametrize("kind", [SLIDING, FULL])
def test_inverse_frequencies_match_transformers(variant, kind):
    ours, hf = configs(variant)
    reference = getattr(Gemma4TextRotaryEmbedding(hf), f"{kind}_inv_freq").numpy()
    inv = np.array(inverse_frequencies(head_dim(ours, kind), ours.rope[kind]), np.float32)
    assert inv.shape == reference.shape
    np.testing.assert_allclose(inv, reference, rtol=1e-6, atol=0)
    if kind == FULL:  # p-RoPE: a quarter of the pairs rotate, the rest have frequency 0 (identity)
        rotated = int(ours.rope[FULL]["partial_rotary_factor"] * head_dim(ours, FULL) // 2)
        assert (inv[:rotated] > 0).all() and (inv[rotated:] == 0).all() and 0 < rotated < len(inv)


@pytest.mark.parametrize("kind", [SLIDING, FULL])
@pytest.mark.parametrize("offset", [0, 37, 20_000])
def test_rotation_matches_apply_rotary_pos_emb(kind, offset):
    ours, hf = configs("e2b")
    D, L = head_dim(ours, kind), 5
    x = np.random.default_rng(offset).standard_normal((1, 2, L, D)).astype(np.float32)  # (B, H, L, D)
    rope = Gemma4TextRotaryEmbedding(hf)
    positions = torch.arange(offset, offset + L)[None]
    cos, sin = rope(torch.from_numpy(x), positions, kind)
    reference = apply_rotary_pos_emb(torch.from_numpy(x), cos, sin).numpy()
    # the same rotation in float64 (angles exact): at large positions both float32 versions drift from it by
    # about position * float32 epsilon radians, so each is held to that, and to each other at small positions
    angles = np.arange(offset, offset + L)[:, None] * getattr(rope, f"{kind}_inv_freq").double().numpy()
    cos64, sin64 = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    exact = x * cos64 + np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1) * sin64
    out = np.array(RotaryEmbedding(D, ours.rope[kind])(mx.array(x), offset))
    tolerance = 1e-5 + 4 * (offset + L) * np.finfo(np.float32).eps * np.abs(x).max()
    np.testing.assert_allclose(reference, exact, rtol=0, atol=tolerance)
    np.testing.assert_allclose(out, exact, rtol=0, atol=tolerance)
    if offset < 100:
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    if kind == FULL:  # unrotated pairs (j, j + D/2) pass through unchanged
        rotated = int(ours.rope[FULL]["partial_rotary_factor"] * D // 2)
        for half in (slice(rotated, D // 2), slice(D // 2 + rotated, D)):
            np.testing.assert_array_equal(out[..., half], x[..., half])


def test_linear_scaling_divides_every_frequency():
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "factor": 8.0}
    plain = dict(rope, rope_type="default", factor=1.0)
    np.testing.assert_allclose(np.array(inverse_frequencies(16, rope)) * 8, inverse_frequencies(16, plain), rtol=1e-12)

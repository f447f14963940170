"""Rotary position embeddings: standard RoPE (sliding layers) and proportional p-RoPE (global layers).

Both use the rotate-half pairing of transformers (dimension j pairs with j + D/2). Proportional RoPE
(transformers' `_compute_proportional_rope_parameters`) rotates only the first
`partial_rotary_factor * D / 2` frequency pairs, with frequencies computed against the *full* head dim,
and leaves the remaining pairs unrotated (inverse frequency 0). Linear scaling divides all frequencies by
`factor`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def inverse_frequencies(head_dim: int, rope: dict) -> list[float]:
    """Per-pair inverse frequencies (length head_dim/2) for one layer type."""
    base, factor = rope["rope_theta"], rope["factor"]
    half = head_dim // 2
    if rope["rope_type"] == "proportional":
        rotated = int(rope["partial_rotary_factor"] * head_dim // 2)
    else:
        rotated = half
    inv = [1.0 / base ** (2 * i / head_dim) for i in range(rotated)] + [0.0] * (half - rotated)
    return [f / factor for f in inv]


class RotaryEmbedding(nn.Module):
    """Applies RoPE to (B, H, L, D) arrays at positions offset .. offset+L-1."""

    def __init__(self, head_dim: int, rope: dict):
        super().__init__()
        self.head_dim = head_dim
        inv = inverse_frequencies(head_dim, rope)
        # mx.fast.rope takes wavelengths (1 / inverse frequency); an unrotated pair has an infinite one.
        self._wavelengths = mx.array([1.0 / f if f > 0 else math.inf for f in inv], dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._wavelengths)

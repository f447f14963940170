"""RMSNorm as Gemma uses it: y = x / sqrt(mean(x^2) + eps) * (offset + w), computed in float32.

Gemma 4 multiplies by w (offset 0); Gemma 3 by (1 + w) (offset 1); `with_scale=False` has no weight (the
scale-free value norm). Reference: `Gemma4RMSNorm`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6, offset: float = 0.0, with_scale: bool = True):
        super().__init__()
        if with_scale:
            self.weight = mx.ones((dims,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" not in self:
            return mx.fast.rms_norm(x, None, self.eps)
        w = self.weight + self.offset if self.offset else self.weight
        return mx.fast.rms_norm(x, w.astype(x.dtype), self.eps)

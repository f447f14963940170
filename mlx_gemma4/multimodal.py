"""Pieces the vision and audio towers share (transformers' `Gemma4ClippableLinear`,
`Gemma4MultimodalEmbedder`)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


class ClippableLinear(nn.Module):
    """Bias-free linear; with clipping, input and output are clamped to scalar bounds stored in the checkpoint.

    Without clipping (use_clipped_linears false) the bounds don't exist, as in the Hugging Face module."""

    def __init__(self, in_dims: int, out_dims: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> text embedding space: scale-free RMS norm, then a bias-free projection
    (`embed_vision` with the vision hidden size, `embed_audio` with the audio tower's output_proj_dims)."""

    def __init__(self, in_dims: int, text_hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dims, text_hidden_size, bias=False)

    def __call__(self, soft_tokens: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(soft_tokens, None, self.eps))

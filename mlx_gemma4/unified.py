"""Gemma 4 12B ("unified", `gemma4_unified`): the encoder-free front ends.

The 12B has no vision or audio tower. Its decoder is the Gemma 4 decoder of text.py (a configuration without
per-layer embeddings or MoE); what is new is how images and audio become soft tokens:

  image  merged 48x48-pixel patches (processing.unified) -> LayerNorm -> Dense -> LayerNorm
         + factorized 2-D position embedding (a row for x plus a row for y) -> LayerNorm   (`vision_embedder`)
         -> scale-free RMSNorm -> projection to the text width                            (`embed_vision`)
  audio  raw 16 kHz waveform frames of 640 samples -> scale-free RMSNorm -> projection   (`embed_audio`)

Module names follow the published checkpoint (transformers renames `vision_embedder.*` into its own
`embed_vision.*` at load time; we keep the stored names). `embed_vision` / `embed_audio` are the same
MultimodalEmbedder the other Gemma 4 models use after their towers. Padding patches (position (-1, -1)) and
padding audio frames are dropped; the rest replace the prompt's placeholder tokens in order
(model.Gemma4.prepare_inputs).
Reference: transformers' `Gemma4UnifiedVisionEmbedder`, `Gemma4UnifiedMultimodalEmbedder`, `Gemma4UnifiedModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ConfigError
from .multimodal import MultimodalEmbedder

_IGNORED = {"architectures", "dtype", "torch_dtype", "initializer_range", "model_type", "_name_or_path",
            "transformers_version", "output_attentions", "output_hidden_states", "return_dict", "id2label",
            "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder"}


def _fields(d: dict, model_type: str, known: set[str], where: str) -> dict:
    if d.get("model_type", model_type) != model_type:
        raise ConfigError(f"{where}.model_type must be {model_type!r}, got {d.get('model_type')!r}")
    unknown = sorted(set(d) - known - _IGNORED)
    if unknown:
        raise ConfigError(f"{where}: unsupported fields {unknown}")
    return {k: d[k] for k in known if d.get(k) is not None}


@dataclass
class UnifiedVisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @classmethod
    def from_dict(cls, d: dict) -> "UnifiedVisionConfig":
        known = {"patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims",
                 "rms_norm_eps", "model_patch_size"}
        fields = _fields(d, "gemma4_unified_vision", known, "vision_config")
        given_patch = fields.pop("model_patch_size", None)
        cfg = cls(**fields)
        if given_patch is not None and given_patch != cfg.model_patch_size:
            raise ConfigError(f"vision_config.model_patch_size {given_patch} != patch_size * pooling_kernel_size "
                              f"({cfg.model_patch_size})")
        if cfg.output_proj_dims != cfg.mm_embed_dim:
            # the projection reads mm_embed_dim features through an output_proj_dims-wide matrix
            raise ConfigError(f"vision_config.output_proj_dims ({cfg.output_proj_dims}) must equal mm_embed_dim "
                              f"({cfg.mm_embed_dim})")
        return cfg


@dataclass
class UnifiedAudioConfig:
    audio_embed_dim: int = 640  # raw samples per soft token (40 ms at 16 kHz)
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> "UnifiedAudioConfig":
        known = {"audio_embed_dim", "rms_norm_eps", "hidden_size", "output_proj_dims", "audio_samples_per_token"}
        fields = _fields(d, "gemma4_unified_audio", known, "audio_config")
        # transformers exposes the one width under four names; all must agree
        widths = {fields.pop(k) for k in ("audio_embed_dim", "hidden_size", "output_proj_dims",
                                          "audio_samples_per_token") if k in fields}
        if len(widths) > 1:
            raise ConfigError(f"audio_config gives different frame widths {sorted(widths)}")
        return cls(audio_embed_dim=widths.pop() if widths else 640, **fields)


def valid_rows(mask) -> mx.array:
    """Flat indices of the True entries of a host (B, N) mask: the rows kept after dropping padding."""
    return mx.array(np.flatnonzero(np.asarray(mask).reshape(-1)).astype(np.int32))


def _mean(x: mx.array) -> mx.array:
    """Mean over the last axis in two levels (sqrt(n)-sized partial sums): a float32 row of 6912 pixel values
    is summed ~6x more accurately than by one running sum (what MLX's CPU reduction does)."""
    n = x.shape[-1]
    block = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return x.reshape(*x.shape[:-1], n // block, block).mean(axis=-1).mean(axis=-1, keepdims=True)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm's numbers on wide rows: mean and variance (around the mean) from two-level sums,
    where mx.fast.layer_norm's statistics are off by ~1e-5 relative on the 6912 raw pixel values of a patch."""

    def __call__(self, x: mx.array) -> mx.array:
        centered = x - _mean(x)
        normed = centered * mx.rsqrt(_mean(mx.square(centered)) + self.eps)
        return normed * self.weight.astype(x.dtype) + self.bias.astype(x.dtype)


class VisionEmbedder(nn.Module):
    """`vision_embedder` of the 12B: merged raw patches -> mm_embed_dim features (in place of a vision tower)."""

    def __init__(self, config: UnifiedVisionConfig):
        super().__init__()
        patch_dim = 3 * config.model_patch_size**2
        width = config.mm_embed_dim
        self.patch_ln1 = LayerNorm(patch_dim)
        self.patch_dense = nn.Linear(patch_dim, width)
        self.patch_ln2 = LayerNorm(width)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, width))  # row x: [:, 0], row y: [:, 1]
        self.pos_norm = LayerNorm(width)
        self.posemb_size = config.mm_posemb_size

    def embed_patches(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """(B, N, patch_dim) pixels and (B, N, 2) integer (x, y) positions -> (B, N, mm_embed_dim)."""
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values.astype(self.patch_dense.weight.dtype))))
        valid = (positions != -1).astype(h.dtype)[..., None]  # per axis: padding adds no position
        at = mx.maximum(positions, 0)
        table = self.pos_embedding.astype(h.dtype)
        h = h + table[at[..., 0], 0] * valid[..., 0, :] + table[at[..., 1], 1] * valid[..., 1, :]
        return self.pos_norm(h)

    def __call__(self, pixel_values, positions) -> mx.array:
        """(total real patches, mm_embed_dim): padding patches dropped, images in order."""
        positions = np.asarray(positions)
        if positions.size and positions.max() >= self.posemb_size:
            raise ValueError(f"image patch position {int(positions.max())} is outside the position table "
                             f"({self.posemb_size} rows); use a smaller image budget")
        out = self.embed_patches(mx.array(pixel_values), mx.array(positions))
        return out.reshape(-1, out.shape[-1])[valid_rows((positions != -1).all(-1))]


def audio_soft_tokens(embedder: MultimodalEmbedder, frames, mask=None) -> mx.array:
    """(total real frames, text_hidden): raw waveform frames projected, padding frames dropped."""
    frames = mx.array(frames)
    out = embedder(frames).reshape(-1, embedder.embedding_projection.weight.shape[0])
    return out if mask is None else out[valid_rows(mask)]

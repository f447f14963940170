"""Gemma 4 vision tower and its projection into the text embedding space, in MLX.

Two sizes share this code: the small tower of E2B/E4B (16 layers x 768, clipped linears) and the large one
of 26B/31B (27 layers x 1152, `standardize`). Module and parameter names equal transformers' under
`model.vision_tower.*` (Gemma4VisionModel) and `model.embed_vision.*` (Gemma4MultimodalEmbedder), so a
checkpoint tensor `model.vision_tower.X` loads into `VisionTower.X` and `model.embed_vision.Y` into
`MultimodalEmbedder.Y` unchanged.

Contract (what the top-level model calls):

    features = ImageProcessor()(images, max_soft_tokens=280)          # mlx_gemma4.processing.image
    soft = vision_tower(mx.array(features.pixel_values),              # (B, P, 3*16*16) float in [0, 1]
                        mx.array(features.position_ids))              # (B, P, 2) int, (-1, -1) = padding
    # soft: (sum(features.num_soft_tokens), vision hidden) -- the valid soft tokens of every image,
    #       image after image, in row-major order of 3x3 cells (padding cells dropped, as transformers does)
    embeds = embed_vision(soft)                                       # (N, text hidden)

`embeds[i]` replaces the embedding of the i-th `<|image|>` token (image_token_id) of the prompt, in prompt
order; P = 9 * budget and each image contributes exactly num_soft_tokens rows. One call takes one budget
(all images padded to the same P); images at different budgets need one call each. Video frames
(mlx_gemma4.processing.video) go through the same two modules, frames as the batch, and replace the
`<|video|>` tokens (video_token_id) in order.

Wiring in the top-level model (Gemma4Model.forward in transformers):
  - token ids of image/video/audio placeholders are replaced by pad_token_id before the embedding lookup,
    and the per-layer (PLE) inputs of E2B/E4B are computed from those pad ids, not the placeholder ids;
  - the soft tokens then overwrite the placeholder positions (masked_scatter), count-checked;
  - with `use_bidirectional_attention == "vision"` (26B/31B) tokens of one image (a maximal run of
    image/video placeholder tokens, mm_token_type_ids 1/2) see each other: sliding layers use
    (causal OR same block) AND kv > q - window; full-attention layers stay purely causal.

Forward pass (modeling_gemma4.py, Gemma4VisionModel):
  patch embedding  x -> input_proj(2x - 1) + table[0][pos_x] + table[1][pos_y] (zero on padding patches)
  encoder layers   pre/post-norm attention and gated-GELU MLP (both post-normed, plain residuals);
                   q/k RMS norms with weights, v RMS norm without, attention scale 1, padding keys masked;
                   2-D axial RoPE: first half of each head rotated by the x position, second half by y
  pooling          mean over each 3x3 cell of patches (by position), times sqrt(hidden)
  standardize      (h - std_bias) * std_scale, large tower only
Clipped linears (small tower) clamp the input to [input_min, input_max] and the output to
[output_min, output_max], four scalars per linear stored in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN_SIZE, MAX_INTERMEDIATE_SIZE, MAX_LAYERS, check_float,
                     check_int)
from .errors import ConfigError
from .multimodal import ClippableLinear, MultimodalEmbedder
from .norm import RMSNorm


@dataclass
class VisionConfig:
    """The `vision_config` block of a Gemma 4 config.json (defaults: E2B/E4B's tower)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10240
    use_clipped_linears: bool = False
    standardize: bool = False
    default_output_length: int = 280

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """Parse an HF `vision_config` dict; unknown bookkeeping keys are ignored, unsupported values raise."""
        model_type = d.get("model_type", "gemma4_vision")
        if model_type != "gemma4_vision":
            raise ConfigError(f"vision_config.model_type must be 'gemma4_vision', got {model_type!r}")
        if d.get("attention_bias"):
            raise ConfigError("vision_config.attention_bias=True is not supported (Gemma 4 has no attention biases)")
        if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(f"Unsupported vision hidden_activation {d['hidden_activation']!r} "
                             "(only 'gelu_pytorch_tanh' is implemented)")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError("config field vision_config.rope_parameters must be a JSON object")
        # transformers reads rope_type "default" in a vision config as "axial"
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ConfigError(f"Unsupported vision rope_type {rope['rope_type']!r} (only axial 2-D RoPE)")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Every field range-checked (ConfigError naming the field and its allowed range)."""
        name = "vision_config."
        for key, lo, hi in (("hidden_size", 1, MAX_HIDDEN_SIZE), ("intermediate_size", 1, MAX_INTERMEDIATE_SIZE),
                            ("num_hidden_layers", 1, MAX_LAYERS), ("num_attention_heads", 1, MAX_HEADS),
                            ("num_key_value_heads", 1, MAX_HEADS), ("head_dim", 4, MAX_HEAD_DIM),
                            ("pooling_kernel_size", 1, 64), ("patch_size", 1, 1024),
                            ("position_embedding_size", 1, 1 << 20), ("default_output_length", 1, 1 << 16)):
            setattr(self, key, check_int(name + key, getattr(self, key), lo, hi))
        self.rms_norm_eps = check_float(name + "rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, lo_open=True)
        self.rope_theta = check_float(name + "rope_theta", self.rope_theta, 0.0, None, lo_open=True)
        for key in ("use_clipped_linears", "standardize"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"config field {name}{key} must be true or false, got {getattr(self, key)!r}")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config.head_dim must be divisible by 4 for 2-D RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"vision_config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")


def axial_rope_angles(position_ids: mx.array, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos, sin of shape (B, P, 1, head_dim): [x-angles twice | y-angles twice], head_dim/4 frequencies each.

    Gemma4VisionRotaryEmbedding: inv_freq = theta^(-2i/(head_dim/2)), i < head_dim/4, shared by both axes."""
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, spatial_dim, 2, dtype=mx.float32) / spatial_dim))
    angles = position_ids.astype(mx.float32)[..., None] * inv_freq  # (B, P, 2, head_dim/4)
    ax, ay = angles[..., 0, :], angles[..., 1, :]
    angles = mx.concatenate([ax, ax, ay, ay], axis=-1)[:, :, None, :]
    return mx.cos(angles), mx.sin(angles)


def apply_axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x: (B, P, heads, head_dim). Each half of the head is rotated (rotate-half style) on its own axis."""
    half = x.shape[-1] // 2
    quarter = half // 2

    def rotate_half(part):
        return mx.concatenate([-part[..., quarter:], part[..., :quarter]], axis=-1)

    rotated = mx.concatenate([rotate_half(x[..., :half]), rotate_half(x[..., half:])], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, clipped = config.hidden_size, config.use_clipped_linears
        self.q_proj = ClippableLinear(hidden, self.num_heads * self.head_dim, clipped)
        self.k_proj = ClippableLinear(hidden, self.num_kv_heads * self.head_dim, clipped)
        self.v_proj = ClippableLinear(hidden, self.num_kv_heads * self.head_dim, clipped)
        self.o_proj = ClippableLinear(self.num_heads * self.head_dim, hidden, clipped)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        B, P, _ = x.shape  # x (B images, P patches, hidden)
        q = self.q_norm(self.q_proj(x).reshape(B, P, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(B, P, self.num_kv_heads, self.head_dim))
        v = self.v_norm(self.v_proj(x).reshape(B, P, self.num_kv_heads, self.head_dim))
        q = apply_axial_rope(q, cos, sin).transpose(0, 2, 1, 3)  # (B, heads, P, D)
        k = apply_axial_rope(k, cos, sin).transpose(0, 2, 1, 3)  # (B, kv_heads, P, D)
        v = v.transpose(0, 2, 1, 3)  # (B, kv_heads, P, D)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)  # (B, heads, P, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, P, -1))  # (B, P, hidden)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, inter, clipped = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(hidden, inter, clipped)
        self.up_proj = ClippableLinear(hidden, inter, clipped)
        self.down_proj = ClippableLinear(inter, hidden, clipped)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dims, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(dims, eps)
        self.post_attention_layernorm = RMSNorm(dims, eps)
        self.pre_feedforward_layernorm = RMSNorm(dims, eps)
        self.post_feedforward_layernorm = RMSNorm(dims, eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array, position_ids: mx.array, valid: mx.array) -> mx.array:
        cos, sin = axial_rope_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        mask = valid[:, None, None, :]  # every query attends to all real patches of its image
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, config.position_embedding_size, config.hidden_size))

    def __call__(self, pixel_values: mx.array, position_ids: mx.array, valid: mx.array) -> mx.array:
        dtype = self.input_proj.weight.dtype
        if not mx.issubdtype(dtype, mx.floating):  # quantized projection: keep the activations' dtype
            dtype = pixel_values.dtype
        x = self.input_proj((2 * (pixel_values - 0.5)).astype(dtype))
        positions = mx.maximum(position_ids, 0)
        table = self.position_embedding_table
        pos = table[0][positions[..., 0]] + table[1][positions[..., 1]]
        return x + mx.where(valid[..., None], pos, 0).astype(x.dtype)


def _check_inputs(pixel_values: mx.array, position_ids: mx.array, config: VisionConfig) -> None:
    patch_dims = 3 * config.patch_size**2
    if pixel_values.ndim != 3 or pixel_values.shape[-1] != patch_dims:
        raise ValueError(f"pixel_values must be (images, patches, {patch_dims}), got {tuple(pixel_values.shape)}")
    if tuple(position_ids.shape) != (*pixel_values.shape[:2], 2):
        raise ValueError(f"position_ids must be (images, patches, 2) = {(*pixel_values.shape[:2], 2)}, "
                         f"got {tuple(position_ids.shape)}")
    cells = config.pooling_kernel_size**2
    if pixel_values.shape[1] % cells:
        raise ValueError(f"The number of patches ({pixel_values.shape[1]}) must be a multiple of {cells}")
    top = int(mx.max(position_ids).item())
    if top >= config.position_embedding_size:
        raise ValueError(f"Patch position {top} exceeds the position table ({config.position_embedding_size})")


class VisionTower(nn.Module):
    """Gemma4VisionModel: pixels -> soft tokens (vision hidden size). See the module docstring."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = Encoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))

    def pool(self, h: mx.array, position_ids: mx.array, valid: mx.array) -> tuple[mx.array, mx.array]:
        """Average each k x k cell of patches (k = pooling kernel) by position -> (B, P/k^2, H) float32 and
        the per-cell count of patches (0 = padding cell). Gemma4VisionPooler._avg_pool_by_positions."""
        B, P, H = h.shape
        k = self.config.pooling_kernel_size
        length = P // k**2
        h = mx.where(valid[..., None], h, 0).astype(mx.float32)
        positions = mx.maximum(position_ids, 0)
        cells_per_row = (mx.max(positions[..., 0], axis=-1, keepdims=True) + 1) // k
        cell = positions[..., 0] // k + cells_per_row * (positions[..., 1] // k)  # (B, P)
        if int(mx.max(cell).item()) >= length:
            raise ValueError(f"Patch positions span more than {length} pooling cells: they do not come from "
                             "the image processor (positions must form a grid of whole k x k cells)")
        flat = (cell + mx.arange(B)[:, None] * length).reshape(-1)
        sums = mx.zeros((B * length, H), mx.float32).at[flat].add(h.reshape(-1, H))
        counts = mx.zeros((B * length,), mx.int32).at[flat].add(mx.ones(flat.shape, mx.int32))
        return (sums / k**2).reshape(B, length, H), counts.reshape(B, length)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """(B, P, 3*p*p) pixels in [0, 1], (B, P, 2) positions -> (total soft tokens, hidden)."""
        _check_inputs(pixel_values, position_ids, self.config)
        valid = mx.logical_not(mx.all(position_ids == -1, axis=-1))  # (B, P): real patch, not padding
        x = self.patch_embedder(pixel_values, position_ids, valid)  # (B, P, hidden)
        x = self.encoder(x, position_ids, valid)  # (B, P, hidden)
        pooled, counts = self.pool(x, position_ids, valid)  # (B, P / k^2, hidden), (B, P / k^2)
        pooled = pooled * math.sqrt(self.config.hidden_size)
        # Drop padding cells (data-dependent shape: gather the indices of the cells that received patches).
        keep = np.flatnonzero(np.array(counts).reshape(-1) > 0)
        soft = pooled.reshape(-1, pooled.shape[-1])[mx.array(keep)]  # (soft tokens of all images, hidden)
        if self.config.standardize:
            soft = (soft - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return soft.astype(x.dtype)


def soft_tokens_per_image(position_ids: np.ndarray | mx.array, pooling_kernel_size: int = 3) -> list[int]:
    """Soft tokens each image yields: its real (non-padding) patches / k^2 (get_image_features' split sizes)."""
    positions = np.asarray(position_ids)
    real = (positions != -1).any(axis=-1).sum(axis=-1)
    return [int(n) // pooling_kernel_size**2 for n in real]



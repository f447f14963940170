"""Gemma 4 audio tower (USM-style conformer) and its projection into the text embedding space, in MLX.

Reference: transformers `Gemma4AudioModel`, `Gemma4MultimodalEmbedder` (modeling_gemma4.py). Parameter names
are exactly Hugging Face's below `model.audio_tower.` / `model.embed_audio.`, so a checkpoint's
`model.audio_tower.X` loads into `AudioTower` as `X` (our top-level model holds it as `audio_tower.X`).

Contract
  tower = AudioTower(AudioConfig.from_dict(hf_config["audio_config"]))
  hidden, mask = tower(features, feature_mask)
      features      (B, T, 128) float log-mel frames from `processing.audio.AudioFeatureExtractor`
      feature_mask  (B, T) bool, True = real frame (None: all real)
      hidden        (B, T', output_proj_dims), T' = ceil(ceil(T / 2) / 2) (two stride-2 convolutions)
      mask          (B, T') bool, True = a real soft token; row b has exactly
                    `processing.audio.num_audio_soft_tokens(samples_b)` True entries, all at the start
  embedder = MultimodalEmbedder(config.output_proj_dims, text_hidden_size, config.rms_norm_eps)
  embeds = embedder(hidden)   (B, T', text_hidden_size): RMS-normalized (no scale), then linear
  audio_soft_tokens(tower, embedder, features, feature_mask) -> (sum of valid tokens, text_hidden_size):
      the valid rows in batch order, i.e. what replaces the `<|audio|>` placeholders of the prompt in order.

Weight layout: MLX convolutions keep channels last. `sanitize(weights)` converts Hugging Face (torch) tensors:
  subsample_conv_projection.layer{0,1}.conv.weight  torch (out, in, 3, 3) -> MLX (out, 3, 3, in)
  layers.{i}.lconv1d.depthwise_conv1d.weight         torch (H, 1, K)      -> MLX (H, K, 1)
Already-converted tensors are recognised by shape and left alone. All other tensors load unchanged;
the non-persistent buffers (`rel_pos_enc.inv_timescales`, `self_attn.softcap`) are recomputed, not loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import MAX_HEADS, MAX_HIDDEN_SIZE, MAX_LAYERS, check_float, check_int
from .errors import ConfigError
from .multimodal import ClippableLinear, MultimodalEmbedder
from .norm import RMSNorm

_ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}

# Config keys that carry no meaning for inference.
_IGNORED_KEYS = {
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label", "label2id",
    "initializer_range", "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states",
    "problem_type", "return_dict", "transformers_version", "use_return_dict", "tie_word_embeddings",
    "_attn_implementation_autoset", "pruned_heads", "torchscript", "tf_legacy_loss", "finetuning_task", "prefix",
    "num_labels", "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class", "use_cache",
}


@dataclass
class AudioConfig:
    """Hugging Face `Gemma4AudioConfig` (the `audio_config` block of an E2B/E4B config.json)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: list[int] = field(default_factory=lambda: [128, 32])
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AudioConfig":
        d = dict(d)
        model_type = d.get("model_type", "gemma4_audio")
        if model_type != "gemma4_audio":
            raise ConfigError(f"audio_config.model_type {model_type!r} is not supported (expected 'gemma4_audio')")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - _IGNORED_KEYS
        if unknown:
            raise ConfigError(f"audio_config has unsupported settings: {sorted(unknown)}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if not isinstance(cfg.subsampling_conv_channels, (list, tuple)):
            raise ConfigError("audio_config.subsampling_conv_channels must be a list of 2 channel counts")
        cfg.subsampling_conv_channels = list(cfg.subsampling_conv_channels)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every field range-checked (ConfigError naming the field and its allowed range)."""
        name = "audio_config."
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"{name}hidden_act {self.hidden_act!r} is not supported (supported: "
                              f"{sorted(_ACTIVATIONS)})")
        for key, lo, hi in (("hidden_size", 2, MAX_HIDDEN_SIZE), ("num_hidden_layers", 0, MAX_LAYERS),
                            ("num_attention_heads", 1, MAX_HEADS), ("conv_kernel_size", 1, 1024),
                            ("attention_chunk_size", 1, 4096), ("attention_context_left", 1, 4096),
                            ("attention_context_right", 0, 4096), ("output_proj_dims", 1, MAX_HIDDEN_SIZE)):
            setattr(self, key, check_int(name + key, getattr(self, key), lo, hi))
        for key, lo in (("attention_logit_cap", 0.0), ("rms_norm_eps", 0.0), ("gradient_clipping", 0.0)):
            setattr(self, key, check_float(name + key, getattr(self, key), lo, 1.0 if key == "rms_norm_eps" else None,
                                           lo_open=True))
        for key in ("residual_weight", "attention_invalid_logits_value"):
            setattr(self, key, check_float(name + key, getattr(self, key)))
        if not isinstance(self.use_clipped_linears, bool):
            raise ConfigError(f"config field {name}use_clipped_linears must be true or false")
        channels = self.subsampling_conv_channels
        if len(channels) != 2:
            raise ConfigError(f"{name}subsampling_conv_channels must have 2 entries; got {channels}")
        self.subsampling_conv_channels = [check_int(f"{name}subsampling_conv_channels[{i}]", c, 1, MAX_HIDDEN_SIZE)
                                          for i, c in enumerate(channels)]
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{name}hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.hidden_size % 2:
            raise ConfigError(f"{name}hidden_size {self.hidden_size} must be even (sinusoidal relative positions)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _clip_bound(x: mx.array, config: AudioConfig) -> float:
    """The conformer's "gradient clipping" clamp: config value, but no more than the dtype's largest finite."""
    return min(config.gradient_clipping, float(mx.finfo(x.dtype).max))


class SubSampleLayer(nn.Module):
    """Stride-2 3x3 conv over (time, frequency), LayerNorm over channels (no bias), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, affine=True, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        # x: (B, T, F, C); padded frames are zeroed before the convolution sees them.
        x = x * mask[:, :, None, None].astype(x.dtype)
        x = nn.relu(self.norm(self.conv(x)))
        return x, mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    """Two SubSampleLayers (4x fewer frames, 4x fewer frequency bins), then flatten (freq, channel) and project."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubSampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubSampleLayer(c0, c1, config.rms_norm_eps)
        # HF sizes this as (c0 // 4) * c1, which equals ceil(n_mels / 4) * c1 for 128 mel bins and c0 = 128.
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, mask = self.layer0(features[..., None], mask)  # (B, T, 128 mel bins, 1) -> (B, T/2, 64, c0)
        x, mask = self.layer1(x, mask)  # (B, T/4, 32, c1)
        b, t, f, c = x.shape
        if f * c != self.input_proj_linear.weight.shape[1]:
            raise ValueError(
                f"audio features have {features.shape[-1]} mel bins, which the tower reduces to {f} x {c} = {f * c} "
                f"values per frame, but input_proj_linear expects {self.input_proj_linear.weight.shape[1]}"
            )
        return self.input_proj_linear(x.reshape(b, t, f * c)), mask


def relative_position_embeddings(config: AudioConfig, dtype=mx.float32) -> mx.array:
    """(L, hidden) sinusoidal embeddings of relative distances L-1, ..., 1, 0 (L = context // 2 + 1),
    [sin | cos] halves with timescales 1 .. 10^4 (`Gemma4AudioRelPositionalEncoding`)."""
    context = config.attention_chunk_size + config.attention_context_left - 1 + config.attention_context_right
    n = config.hidden_size // 2
    inv_timescales = mx.exp(mx.arange(n, dtype=mx.float32) * -(math.log(1.0e4) / max(n - 1, 1)))
    distances = mx.arange(context // 2, -1, -1, dtype=mx.float32)
    scaled = distances[:, None] * inv_timescales[None, :]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1).astype(dtype)


class ChunkedAttention(nn.Module):
    """Local self-attention in blocks of `chunk` queries, each seeing `left - 1` frames back and `right` ahead,
    with Transformer-XL relative position logits, tanh logit cap and learned per-dimension query scale
    (`Gemma4AudioAttention`)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        h, n = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim = n, config.head_dim
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        self.context = self.chunk + self.past + self.future
        clipped = config.use_clipped_linears
        self.q_proj = ClippableLinear(h, h, clipped)
        self.k_proj = ClippableLinear(h, h, clipped)
        self.v_proj = ClippableLinear(h, h, clipped)
        self.post = ClippableLinear(h, h, clipped)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))
        # Scales in base 2 (the original model's softmax convention), folded into q and k.
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)

    def _blocks(self, x: mx.array) -> mx.array:
        """(B, T, N, D) -> (B, nb, chunk, N, D), zero-padded at the end."""
        b, t = x.shape[:2]
        nb = -(-t // self.chunk)
        x = mx.pad(x, [(0, 0), (0, nb * self.chunk - t), (0, 0), (0, 0)])
        return x.reshape(b, nb, self.chunk, *x.shape[2:])

    def context_indices(self, t: int) -> np.ndarray:
        """(nb, context) frame index of each block's key/value window (may be < 0 or >= t: padding)."""
        nb = -(-t // self.chunk)
        return np.arange(nb)[:, None] * self.chunk + np.arange(self.context)[None, :] - self.past

    def _windows(self, x: mx.array) -> mx.array:
        """(B, T, N, D) -> (B, nb, context, N, D): overlapping key/value windows, zeros outside [0, T)."""
        t = x.shape[1]
        x = mx.pad(x, [(0, 0), (self.past, self.future + self.chunk - 1), (0, 0), (0, 0)])
        return x[:, mx.array(self.context_indices(t) + self.past)]

    def _rel_shift(self, x: mx.array) -> mx.array:
        """(B, N, nb, chunk, L) logits per relative distance -> (B, N, nb, chunk, context) per window slot:
        pad to context+1 columns, reflow the rows, drop the tail (Transformer-XL appendix B)."""
        b, n, nb, c, length = x.shape
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (0, 0), (0, self.context + 1 - length)])
        x = x.reshape(b, n, nb, c * (self.context + 1))[..., : c * self.context]
        return x.reshape(b, n, nb, c, self.context)

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        """x: (B, T, H); positions: (L, H) relative position embeddings; mask: (B, 1, nb, chunk, context) bool."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).astype(mx.float32).reshape(shape)
        k = self.k_proj(x).astype(mx.float32).reshape(shape)
        v = self.v_proj(x).astype(mx.float32).reshape(shape)
        q = q * (self.q_scale * nn.softplus(self.per_dim_scale.astype(mx.float32)))
        k = k * self.k_scale

        q = self._blocks(q).transpose(0, 3, 1, 2, 4)  # (B, N, nb, chunk, D)
        k = self._windows(k).transpose(0, 3, 1, 4, 2)  # (B, N, nb, D, context)
        v = self._windows(v).transpose(0, 3, 1, 2, 4)  # (B, N, nb, context, D)
        nb = q.shape[2]

        content = q @ k
        rel_k = self.relative_k_proj(positions).astype(mx.float32)
        rel_k = rel_k.reshape(-1, self.num_heads, self.head_dim).transpose(1, 2, 0)  # (N, D, L)
        position = (q.reshape(b, self.num_heads, nb * self.chunk, self.head_dim) @ rel_k)
        position = self._rel_shift(position.reshape(b, self.num_heads, nb, self.chunk, -1))

        cap = self.config.attention_logit_cap
        logits = mx.tanh((content + position) / cap) * cap
        logits = mx.where(mask, logits, mx.array(self.config.attention_invalid_logits_value, mx.float32))
        weights = mx.softmax(logits, axis=-1, precise=True)
        out = (weights @ v).transpose(0, 2, 3, 1, 4).reshape(b, nb * self.chunk, -1)[:, :t]
        return self.post(out.astype(x.dtype))


class FeedForward(nn.Module):
    """Macaron half-step feed-forward: x + residual_weight * norm(W2 act(W1 norm(x)))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        h, clipped = config.hidden_size, config.use_clipped_linears
        self.config = config
        self.ffw_layer_1 = ClippableLinear(h, 4 * h, clipped)
        self.ffw_layer_2 = ClippableLinear(4 * h, h, clipped)
        self.pre_layer_norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.post_layer_norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        bound = _clip_bound(x, self.config)
        y = self.pre_layer_norm(mx.clip(x, -bound, bound))
        y = self.ffw_layer_2(self.act(self.ffw_layer_1(y)))
        y = self.post_layer_norm(mx.clip(y, -bound, bound))
        return x + y * self.config.residual_weight


class LightConv1d(nn.Module):
    """GLU, causal depthwise conv over time, norm, activation, linear; plus residual (`Gemma4AudioLightConv1d`)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        h, clipped = config.hidden_size, config.use_clipped_linears
        self.config = config
        self.linear_start = ClippableLinear(h, 2 * h, clipped)
        self.linear_end = ClippableLinear(h, h, clipped)
        self.depthwise_conv1d = nn.Conv1d(h, h, config.conv_kernel_size, groups=h, bias=False)
        self.pre_layer_norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.conv_norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear_start(self.pre_layer_norm(x))
        a, gate = mx.split(y, 2, axis=-1)
        y = a * mx.sigmoid(gate)
        y = mx.pad(y, [(0, 0), (self.config.conv_kernel_size - 1, 0), (0, 0)])  # causal: pad the past only
        y = self.depthwise_conv1d(y)
        bound = _clip_bound(y, self.config)
        y = self.act(self.conv_norm(mx.clip(y, -bound, bound)))
        return x + self.linear_end(y)


class ConformerLayer(nn.Module):
    """feed-forward/2, attention, light conv, feed-forward/2, output norm (`Gemma4AudioLayer`)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = ChunkedAttention(config)
        self.lconv1d = LightConv1d(config)
        self.norm_pre_attn = RMSNorm(h, eps=config.rms_norm_eps)
        self.norm_post_attn = RMSNorm(h, eps=config.rms_norm_eps)
        self.norm_out = RMSNorm(h, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        bound = _clip_bound(x, self.config)
        x = self.feed_forward1(x)
        y = self.self_attn(self.norm_pre_attn(mx.clip(x, -bound, bound)), positions, mask)
        x = x + self.norm_post_attn(mx.clip(y, -bound, bound))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(mx.clip(x, -bound, bound))


class AudioTower(nn.Module):
    """Gemma 4 audio encoder (`Gemma4AudioModel`): log-mel (B, T, 128) -> (B, ceil(T/4), output_proj_dims)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.layers = [ConformerLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def attention_mask(self, valid: mx.array) -> mx.array:
        """(B, T) valid frames -> (B, 1, nb, chunk, context) bool: key in [0, T), real, and within the sliding
        window 0 <= query - key < left - 1 or 0 < key - query < right (`sliding_window_mask_function`)."""
        attn = self.layers[0].self_attn if self.layers else ChunkedAttention(self.config)
        b, t = valid.shape
        keys = attn.context_indices(t)  # (nb, context)
        queries = np.arange(keys.shape[0])[:, None] * attn.chunk + np.arange(attn.chunk)[None, :]  # (nb, chunk)
        dist = queries[:, :, None] - keys[:, None, :]
        in_window = ((dist >= 0) & (dist < attn.past)) | ((dist < 0) & (-dist < attn.future))
        in_range = (keys >= 0) & (keys < t)
        key_valid = mx.pad(valid, [(0, 0), (attn.past, attn.future + attn.chunk - 1)])
        key_valid = key_valid[:, mx.array(np.clip(keys + attn.past, 0, None))]  # (B, nb, context)
        allowed = mx.array(in_window & in_range[:, None, :])[None] & key_valid[:, :, None, :]
        return allowed[:, None]

    def __call__(self, features: mx.array, feature_mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
        if features.ndim != 3:
            raise ValueError(f"audio features must be (batch, frames, mel bins); got shape {tuple(features.shape)}")
        b, t, _ = features.shape
        if t == 0:
            raise ValueError("audio features have zero frames")
        if feature_mask is None:
            feature_mask = mx.ones((b, t), dtype=mx.bool_)
        elif tuple(feature_mask.shape) != (b, t):
            raise ValueError(f"feature_mask shape {tuple(feature_mask.shape)} does not match features {(b, t)}")
        # x (B, T', hidden) with T' = ceil(T / 4) frames after subsampling; mask (B, T') real frames
        x, mask = self.subsample_conv_projection(features, feature_mask.astype(mx.bool_))
        positions = relative_position_embeddings(self.config, x.dtype)  # (context // 2 + 1, hidden)
        attn_mask = self.attention_mask(mask)  # (B, 1, blocks, chunk, context)
        for layer in self.layers:
            x = layer(x, positions, attn_mask)  # (B, T', hidden)
        return self.output_proj(x), mask  # (B, T', output_proj_dims), (B, T')

    @staticmethod
    def sanitize(weights: dict[str, Any]) -> dict[str, Any]:
        """See the module-level `sanitize`."""
        return sanitize(weights)


def audio_soft_tokens(tower: AudioTower, embedder: MultimodalEmbedder, features, feature_mask=None) -> mx.array:
    """Encode and project a batch of clips -> (total valid soft tokens, text_hidden) in clip order: the rows
    that replace the prompt's `<|audio|>` placeholders, first clip first (`Gemma4Model.get_audio_features`
    followed by the `[audio_mask]` selection in `Gemma4Model.forward`)."""
    features = mx.array(features)
    if feature_mask is not None:
        feature_mask = mx.array(feature_mask)
    hidden, mask = tower(features, feature_mask)
    rows = np.flatnonzero(np.array(mask).reshape(-1))
    embeds = embedder(hidden)
    return embeds.reshape(-1, embeds.shape[-1])[mx.array(rows)]


_CONV2D_SUFFIXES = ("subsample_conv_projection.layer0.conv.weight", "subsample_conv_projection.layer1.conv.weight")
_DEPTHWISE_SUFFIX = "lconv1d.depthwise_conv1d.weight"
_NON_PERSISTENT_SUFFIXES = ("rel_pos_enc.inv_timescales", "self_attn.softcap")


def sanitize(weights: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face audio-tower tensors (any key prefix) -> MLX layout; other entries pass through.

    conv2d (out, in, 3, 3) -> (out, 3, 3, in); depthwise conv1d (H, 1, K) -> (H, K, 1). A tensor already in MLX
    layout (channels last: in != 3 at the end, resp. K at axis 1) is left as is. Non-persistent buffers are dropped."""
    out = {}
    for key, w in weights.items():
        if key.endswith(_NON_PERSISTENT_SUFFIXES):
            continue
        if key.endswith(_CONV2D_SUFFIXES) and w.ndim == 4 and w.shape[-1] == 3 and w.shape[-2] == 3:
            w = w.transpose(0, 2, 3, 1)
        elif key.endswith(_DEPTHWISE_SUFFIX) and w.ndim == 3 and w.shape[1] == 1 and w.shape[2] != 1:
            w = w.transpose(0, 2, 1)
        out[key] = w
    return out

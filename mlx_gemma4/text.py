"""The Gemma 4 text decoder: scaled embeddings, per-layer embeddings (PLE), hybrid sliding/global decoder
layers with optional MoE, final norm, tied LM head and logit soft-capping.

Forward pass, in call order (B batch, L new tokens, H hidden size, V vocabulary):

  model.py       Gemma4.__call__(ids (B, L)) -> logits (B, L, V). With images/audio, prepare_inputs first runs
                 vision.py / audio.py and multimodal.py's embedders and puts their soft tokens in the embeddings.
  text.py        TextModel.__call__: scaled token embeddings (B, L, H) and PLE inputs (B, L, layers, P), then
                 each DecoderLayer: norm -> attention -> norm, residual -> MLP (+ MoE) -> norm, residual
                 -> PLE gate -> layer_scalar; final norm. Gemma4.logits: tied LM head, soft-capping.
  attention.py   Attention: q/k/v projections, q/k/v norms (norm.py), RoPE (rope.py), the layer's KV cache
                 (cache.py; KV-shared layers read their producer's keys/values), kernels/ windowed_attention.
  mlp.py         MLP: the dense GeGLU feed-forward.
  moe.py         Router (top-k of the experts per token) and Experts (kernels/ expert_glu over the bank).

Reference: transformers' `Gemma4TextModel`, `Gemma4TextDecoderLayer`, `Gemma4ForCausalLM`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention, AttentionInputs
from .cache import QUANTIZED_KV_UNSUPPORTED, KVCache, RotatingKVCache, is_native
from .config import SLIDING, TextConfig
from .mlp import MLP
from .moe import Experts, Router
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        H, eps, off = config.hidden_size, config.rms_norm_eps, config.norm_offset
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(H, config.mlp_width(layer))
        self.input_layernorm = RMSNorm(H, eps, off)
        self.post_attention_layernorm = RMSNorm(H, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(H, eps, off)
        self.post_feedforward_layernorm = RMSNorm(H, eps, off)
        if config.use_layer_scalar:
            self.layer_scalar = mx.ones((1,))
        self.ple_dim = config.hidden_size_per_layer_input
        if self.ple_dim:
            self.per_layer_input_gate = nn.Linear(H, self.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(self.ple_dim, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps, off)
        self.has_moe = config.enable_moe_block
        if self.has_moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps, off)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps, off)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps, off)

    def feed_forward(self, x: mx.array) -> mx.array:
        """Dense MLP, plus (MoE layers) the routed experts added after their own norms."""
        h = self.mlp(self.pre_feedforward_layernorm(x))  # (B, L, H)
        if not self.has_moe:
            return h
        flat = x.reshape(-1, x.shape[-1])  # (T, H), T = B * L tokens
        indices, weights = self.router(flat)  # (T, k) expert ids, (T, k) float32 weights
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), indices, weights).reshape(x.shape)
        return self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)

    def __call__(self, x, step: AttentionInputs, cache, per_layer_input=None, shared_kv=None):
        h, kv = self.self_attn(self.input_layernorm(x), step, cache, shared_kv)  # h (B, L, H)
        x = x + self.post_attention_layernorm(h)
        x = x + self.post_feedforward_layernorm(self.feed_forward(x))
        if self.ple_dim:
            gate = nn.gelu_approx(self.per_layer_input_gate(x)) * per_layer_input  # (B, L, P)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        if "layer_scalar" in self:
            x = x * self.layer_scalar.astype(x.dtype)
        return x, kv


def scaled_embedding(table: nn.Module, ids: mx.array, scale: float) -> mx.array:
    """Embedding lookup times a constant rounded to the table's dtype, as transformers does
    (`Gemma4TextScaledWordEmbedding`: sqrt(3072) becomes 55.5 in bfloat16)."""
    x = table(ids)
    return x * mx.array(scale, dtype=x.dtype)


class TextModel(nn.Module):
    """Decoder stack; `language_model.*` in our parameter tree."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(H, config.rms_norm_eps, config.norm_offset)
        self.ple_dim = config.hidden_size_per_layer_input
        if self.ple_dim:
            n = config.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, n * self.ple_dim)
            self.per_layer_model_projection = nn.Linear(H, n * self.ple_dim, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.ple_dim, config.rms_norm_eps, config.norm_offset)

    def embed(self, ids: mx.array) -> mx.array:
        return scaled_embedding(self.embed_tokens, ids, self.config.hidden_size**0.5)

    def per_layer_inputs(self, ids: mx.array, embeds: mx.array) -> mx.array:
        """PLE (transformers' get_per_layer_inputs + project_per_layer_inputs): (B, L, layers, ple_dim)."""
        B, L = ids.shape
        n = self.config.num_hidden_layers
        token_part = scaled_embedding(self.embed_tokens_per_layer, ids, self.ple_dim**0.5)
        token_part = token_part.astype(embeds.dtype).reshape(B, L, n, self.ple_dim)
        context = self.per_layer_model_projection(embeds) * (self.config.hidden_size**-0.5)
        context = self.per_layer_projection_norm(context.reshape(B, L, n, self.ple_dim))
        return (context + token_part) * (2.0**-0.5)

    def __call__(self, ids: mx.array, cache=None, inputs_embeds: mx.array | None = None,
                 block_ids: mx.array | None = None, last_only: bool = False) -> mx.array:
        """ids (B, L) token ids (multimodal placeholders already replaced by pad for the PLE lookup);
        inputs_embeds optionally overrides the token embeddings (merged image/audio features).
        cache: per-layer caches as `make_cache()` makes them (KV-shared layers have none; a full-length list
        with None there works too), or any caches speaking mlx-lm's protocol (e.g. its batch caches).
        Returns final-normed hidden states (B, L, H), or (B, 1, H) with last_only."""
        cfg = self.config
        x = self.embed(ids) if inputs_embeds is None else inputs_embeds  # (B, L, H)
        ple = self.per_layer_inputs(ids, x) if self.ple_dim else None  # (B, L, layers, P)
        L = x.shape[1]
        caches = list(cache or []) + [None] * (len(self.layers) - len(cache or []))
        step = self._step_inputs(caches, L, block_ids)

        produced: dict[int, tuple] = {}
        for i, layer in enumerate(self.layers):
            shared = None
            if cfg.is_kv_shared(i):
                shared = produced[cfg.kv_producer(i)]
                if last_only and x.shape[1] > 1:
                    # KV-shared layers write no cache, so only the last position is needed from here on.
                    x = x[:, -1:]
                    ple = ple[:, -1:] if ple is not None else None
                    step = last_query(step, L)
            x, kv = layer(x, step, caches[i], None if ple is None else ple[:, :, i], shared)
            produced[i] = kv
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    def _step_inputs(self, caches: list, L: int, block_ids) -> AttentionInputs:
        """Positions (and, for caches other than ours, each layer type's mask) of the L new tokens."""
        cfg = self.config
        present = [c for c in caches if c is not None]
        offset = present[0].offset if present else 0
        if isinstance(offset, int) and offset + L > cfg.max_position_embeddings:
            raise ValueError(f"context too long: {offset} cached + {L} new tokens exceed the model's "
                             f"context length of {cfg.max_position_embeddings} tokens (fewer or smaller images, "
                             "a shorter prompt, or a new conversation)")
        if all(is_native(c) for c in present):
            return AttentionInputs(offset=offset, block_ids=block_ids)
        # The mask path: mlx-lm's caches (its batch caches with left padding and per-row positions, or what
        # its prompt-cache loader rebuilds). Masks come from each layer type's cache before it is updated.
        if block_ids is not None:
            raise ValueError("prompts with images attend bidirectionally within each image; run them through "
                             "this model's own caches (model.make_cache()), not mlx-lm's")
        if any(hasattr(c, "bits") for c in present):
            raise ValueError(QUANTIZED_KV_UNSUPPORTED)
        masks = {}
        for i, kind in enumerate(cfg.layer_types[: cfg.first_kv_shared_layer]):
            if kind not in masks and caches[i] is not None:
                window = cfg.sliding_window if kind == SLIDING else None
                masks[kind] = caches[i].make_mask(L, return_array=False, window_size=window)
        return AttentionInputs(offset=offset, masks=masks)

    def make_cache(self) -> list:
        """One cache per layer that computes keys and values; KV-shared layers (always the last ones) read
        their producer's and get none, so the list is shorter than the layers (mlx-lm's convention)."""
        cfg = self.config
        return [RotatingKVCache(cfg.sliding_window) if t == SLIDING else KVCache()
                for t in cfg.layer_types[: cfg.first_kv_shared_layer]]


def last_query(step: AttentionInputs, L: int) -> AttentionInputs:
    """The inputs of the last of L queries alone."""
    masks = None
    if step.masks is not None:
        # one query sees every key it may (a causal mask's last row is all True)
        masks = {k: m[..., -1:, :] if isinstance(m, mx.array) else None for k, m in step.masks.items()}
    return AttentionInputs(offset=step.offset + L - 1, masks=masks,
                           block_ids=None if step.block_ids is None else step.block_ids[-1:])

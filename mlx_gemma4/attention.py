"""Gemma 4 self-attention: q/k/v projections, q/k RMSNorm, scale-free v norm, k=v on full layers,
per-layer-type head dim and KV-head count, sliding window vs global, dual RoPE, KV sharing.

Reference: transformers' `Gemma4TextAttention.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import FULL, SLIDING, TextConfig
from .kernels import windowed_attention
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class AttentionInputs:
    """What one forward step shares between layers: positions, image-block ids for the vision mask, and, on
    the mask path (mlx-lm's caches, batches with per-row positions), the attention mask of each layer type."""

    offset: int | mx.array  # absolute position of the first query token; (B,) per row on the mask path
    block_ids: mx.array | None = None  # (L,) int32 image-block id per query token (-1 = text), or None
    masks: dict | None = None  # layer type -> mask from the cache's make_mask (None, "causal" or boolean array)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.layer_type = config.layer_types[layer]
        self.head_dim = config.layer_head_dims[layer]
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.layer_kv_heads[layer]
        self.scale = config.attention_scale
        self.window = config.sliding_window if self.layer_type == SLIDING else None
        self.is_kv_shared = config.is_kv_shared(layer)
        self.vision_blocks_on_all_layers = config.vision_blocks_on_all_layers
        self.use_value_norm = config.use_value_norm
        self.eps = config.rms_norm_eps
        hidden, bias, eps, off = config.hidden_size, config.attention_bias, config.rms_norm_eps, config.norm_offset

        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps, offset=off)
        if not self.is_kv_shared:
            self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            if config.has_value_proj(layer):
                self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, eps, offset=off)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, config.rope[self.layer_type])

    def project_kv(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array]:
        """Keys and values for new tokens, (B, Hkv, L, D) each, RoPE'd and normalized."""
        B, L, _ = x.shape
        shape = (B, L, self.n_kv_heads, self.head_dim)
        k = self.k_proj(x).reshape(shape)
        # k=v layers: values are the raw key projection (before k_norm and RoPE).
        v = self.v_proj(x).reshape(shape) if "v_proj" in self else k
        k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset)
        if self.use_value_norm:
            v = mx.fast.rms_norm(v, None, self.eps)
        return k, v.transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, step: AttentionInputs, cache, shared_kv=None):
        """Returns (output, kv) where kv = (keys, values, k_start) is what this layer attended over,
        so KV-shared layers can reuse it."""
        B, L, _ = x.shape  # x (B, L, H)
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        q = self.rope(self.q_norm(q).transpose(0, 2, 1, 3), step.offset)  # (B, n_heads, L, D)

        # keys, values (B, n_kv_heads, S, D): the S positions attended over, the first at absolute position k_start
        if shared_kv is not None:
            keys, values, k_start = shared_kv
        else:
            k, v = self.project_kv(x, step.offset)  # (B, n_kv_heads, L, D) each
            if step.masks is not None:
                keys, values = cache.update_and_fetch(k, v)
                k_start = None
            elif cache is not None:
                keys, values, k_start = cache.update(k, v)
            else:
                keys, values, k_start = k, v, step.offset

        if step.masks is not None:
            # mlx-lm's caches (batches: left padding, per-row positions, rotated ring buffers) say through
            # their mask which of the keys each query sees.
            out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale,
                                                       mask=step.masks[self.layer_type])
            out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
            return self.o_proj(out), (keys, values, k_start)

        window, block_ids = self.window, None
        if L == 1 and self.window is not None and keys.shape[2] <= self.window:
            window = None  # every key the cache returned is inside the window
        if step.block_ids is not None and (self.window is not None or self.vision_blocks_on_all_layers):
            # Keys from earlier chunks never share an image block with this chunk (images are never split).
            pad = step.offset - k_start
            block_ids = step.block_ids
            if pad:
                block_ids = mx.concatenate([mx.full((pad,), -1, mx.int32), block_ids])
        attend = windowed_attention
        if block_ids is not None and window is not None and self.vision_blocks_on_all_layers:
            attend = window_or_block_attention
        out = attend(q, keys, values, scale=self.scale, q_start=step.offset, k_start=k_start, window=window,
                     block_ids=block_ids)  # (B, n_heads, L, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, n_heads * D)
        return self.o_proj(out), (keys, values, k_start)  # (B, L, H)


def window_or_block_attention(q, k, v, *, scale: float, q_start: int, k_start: int, window: int,
                              block_ids: mx.array) -> mx.array:
    """A key is visible iff (causal and inside the window) or in the query's image block: the 12B's sliding
    layers over a chunk holding images (transformers ORs its block overlay after the window, as Gemma 3 does;
    windowed_attention keeps the window, as Gemma 4 does). Dense mask: only prefill chunks with images come here."""
    L, S = q.shape[2], k.shape[2]
    q_pos = mx.arange(q_start, q_start + L)[:, None]
    k_pos = mx.arange(k_start, k_start + S)[None, :]
    q_ids, k_ids = block_ids[q_start - k_start:][:, None], block_ids[None, :]
    visible = ((k_pos <= q_pos) & (q_pos - k_pos < window)) | ((q_ids == k_ids) & (q_ids >= 0))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible)

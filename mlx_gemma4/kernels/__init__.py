"""Kernel dispatch (placeholder until the Metal kernels land): pure-MLX reference paths."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


def attention_mask(q_len: int, k_len: int, q_start: int, k_start: int, window: int | None,
                   block_ids: mx.array | None = None) -> mx.array:
    """Boolean (q_len, k_len) visibility: (causal or same image block) and inside the window."""
    qpos = mx.arange(q_start, q_start + q_len)[:, None]
    kpos = mx.arange(k_start, k_start + k_len)[None, :]
    visible = kpos <= qpos
    if block_ids is not None:
        qb = block_ids[q_start - k_start : q_start - k_start + q_len][:, None]
        kb = block_ids[None, :]
        visible = visible | ((qb == kb) & (qb >= 0))
    if window is not None:
        visible = visible & (qpos - kpos < window)
    return visible


def windowed_attention(q, k, v, *, scale: float, q_start: int, k_start: int, window: int | None,
                       block_ids: mx.array | None = None) -> mx.array:
    L, S = q.shape[2], k.shape[2]
    mask = attention_mask(L, S, q_start, k_start, window, block_ids)
    if L == 1 and window is None and block_ids is None:
        mask = None
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@dataclass
class ExpertBank:
    """One stacked expert matrix in HF layout (E, out, in); packed uint32 + scales/biases when quantized."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int | None = None
    group_size: int | None = None

    def dense(self) -> mx.array:
        if self.scales is None:
            return self.weight
        return mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)


def expert_glu(x, indices, weights, gate_up: ExpertBank, down: ExpertBank):
    """out[t] = sum_k w[t,k] * down[e] @ (gelu_tanh(gate[e] x) * up[e] x), e = indices[t,k]."""
    gu = mx.take(gate_up.dense(), indices, axis=0)  # (T, K, 2I, H)
    h = (gu @ x[:, None, :, None]).squeeze(-1)  # (T, K, 2I)
    inter = h.shape[-1] // 2
    a = nn.gelu_approx(h[..., :inter]) * h[..., inter:]
    d = mx.take(down.dense(), indices, axis=0)  # (T, K, H, I)
    y = (d @ a[..., None]).squeeze(-1)  # (T, K, H)
    return (y * weights[..., None].astype(y.dtype)).sum(axis=1)

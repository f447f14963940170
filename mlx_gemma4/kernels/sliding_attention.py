"""Windowed (sliding / full) attention with Gemma 4's bidirectional image-block mask.

Query i sits at absolute position q_start + i, key j at k_start + j. Key j is visible to query i iff
    (kpos <= qpos  or  same image block)  and  (window is None  or  qpos - kpos < window)
where a position's block id is block_ids[pos - k_start] (-1 = text) and "same block" means equal ids >= 0. This is
transformers' sliding mask for `use_bidirectional_attention="vision"` (modeling_gemma4.py: the sliding-window
mask AND-ed with causal OR-ed with the vision block mask); full-attention layers pass window=None and no
block ids. Block ids come from a cumulative count of image starts, so each id is one contiguous run (the MLX
path checks it): the last key a query can see is therefore its own position or the end of its image, whichever
is later.

The MLX path (`windowed_attention_mlx`, softmax in float32): query blocks of `block_q` rows each attend only to
the key range their window allows (`attention_plan`), through `mx.fast.scaled_dot_product_attention` with an
explicit boolean mask. Cost O(L * (block_q + window)) instead of O(L * S) for sliding layers. Prefill always
takes it (MLX's tiled attention kernels); the Metal decode kernel (`decode_attention.py`) serves a few queries.
GQA: query head h uses key/value head h // (Hq // Hkv).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


MLX_BLOCK_Q = 128  # query rows per block in the MLX path (sliding layers)
MLX_BLOCK_Q_GLOBAL = 256  # ... for layers without a window (causal only)


def validate_inputs(q, k, v, scale, q_start, k_start, window, block_ids) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D); got {q.shape}, {k.shape}, {v.shape}")
    B, Hq, L, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v batch and head dim must match q: q {q.shape}, k {k.shape}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if q.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"q must be float32/float16/bfloat16, got {q.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    off = q_start - k_start
    if off < 0 or off + L > S:
        raise ValueError(f"queries at positions [{q_start}, {q_start + L}) must lie inside the keys' positions "
                         f"[{k_start}, {k_start + S}) (every query attends to its own key)")
    if block_ids is not None and (block_ids.ndim != 1 or block_ids.shape[0] != S):
        raise ValueError(f"block_ids must have shape ({S},) (one id per key position), got {block_ids.shape}")


def key_ends(L: int, S: int, offset: int, block_ids) -> np.ndarray:
    """kend[i]: one past the last key index query i may see (its own key, or the end of its image block)."""
    own = np.arange(L, dtype=np.int64) + offset + 1
    if block_ids is None:
        return own
    ids = np.asarray(block_ids, dtype=np.int64)
    # end of each contiguous run of equal ids: reverse running minimum over the run boundaries
    boundary = np.append(ids[1:] != ids[:-1], True)
    image_runs = ids[boundary][ids[boundary] >= 0]
    if len(np.unique(image_runs)) != len(image_runs):
        raise ValueError("block_ids: an image id occurs in two separate runs; each image's tokens must be "
                         "contiguous (ids as made by a cumulative count of image starts)")
    run_end = np.minimum.accumulate(np.where(boundary, np.arange(S), S)[::-1])[::-1] + 1
    q_ids = ids[offset:offset + L]
    return np.where(q_ids >= 0, np.maximum(own, run_end[offset:offset + L]), own)


@dataclass(frozen=True)
class Block:
    q0: int
    q1: int
    k0: int
    k1: int


def attention_plan(L: int, S: int, q_start: int, k_start: int, window: int | None, block_ids=None,
                   block_q: int | None = None) -> list[Block]:
    """Query blocks and the key range each must visit: [first key of the first query's window, last visible
    key of the block's queries]. Every key in that range is visible to at least one query of the block."""
    if block_q is None:
        block_q = MLX_BLOCK_Q if window is not None else MLX_BLOCK_Q_GLOBAL
    off = q_start - k_start
    ends = key_ends(L, S, off, block_ids)
    plan = []
    for q0 in range(0, L, block_q):
        q1 = min(L, q0 + block_q)
        k0 = 0 if window is None else max(0, q0 + off - window + 1)
        plan.append(Block(q0, q1, k0, int(ends[q1 - 1])))
    return plan


def visibility(q_pos: mx.array, k_pos: mx.array, window: int | None, q_ids=None, k_ids=None) -> mx.array:
    """Boolean (Lq, Lk) mask from absolute positions (and block ids)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    seen = kp <= qp
    if q_ids is not None:
        seen = seen | ((q_ids[:, None] == k_ids[None, :]) & (q_ids[:, None] >= 0))
    if window is not None:
        seen = seen & (qp - kp < window)
    return seen


def windowed_attention_mlx(q, k, v, *, scale, q_start, k_start, window, block_ids=None,
                           block_q: int | None = None) -> mx.array:
    L, S = q.shape[2], k.shape[2]
    off = q_start - k_start
    plan = attention_plan(L, S, q_start, k_start, window, block_ids, block_q)
    outs = []
    for b in plan:
        q_pos = mx.arange(q_start + b.q0, q_start + b.q1)
        k_pos = mx.arange(k_start + b.k0, k_start + b.k1)
        ids = (block_ids[off + b.q0:off + b.q1], block_ids[b.k0:b.k1]) if block_ids is not None else (None, None)
        # a single query sees every key of its range (the range is exactly its visible span): no mask
        mask = None if b.q1 - b.q0 == 1 else visibility(q_pos, k_pos, window, *ids)
        outs.append(mx.fast.scaled_dot_product_attention(
            q[:, :, b.q0:b.q1], k[:, :, b.k0:b.k1], v[:, :, b.k0:b.k1], scale=scale, mask=mask))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def dense_attention_mlx(q, k, v, *, scale, q_start, k_start, window, block_ids=None) -> mx.array:
    """Masked attention over all S keys (what mlx-lm does); the reference the blockwise path must equal."""
    L, S = q.shape[2], k.shape[2]
    off = q_start - k_start
    ids = (block_ids[off:off + L], block_ids) if block_ids is not None else (None, None)
    mask = visibility(mx.arange(q_start, q_start + L), mx.arange(k_start, k_start + S), window, *ids)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

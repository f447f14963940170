"""Windowed (sliding / full) attention with Gemma 4's bidirectional image-block mask.

Query i sits at absolute position q_start + i, key j at k_start + j. Key j is visible to query i iff
    (kpos <= qpos  or  same image block)  and  (window is None  or  qpos - kpos < window)
where a position's block id is block_ids[pos - k_start] (-1 = text) and "same block" means equal ids >= 0. This is
transformers' sliding mask for `use_bidirectional_attention="vision"` (modeling_gemma4.py: the sliding-window
mask AND-ed with causal OR-ed with the vision block mask); full-attention layers pass window=None and no
block ids. Block ids come from a cumulative count of image starts, so each id is one contiguous run (the MLX
path checks it): the last key a query can see is therefore its own position or the end of its image, whichever
is later.

Implementations (all softmax in float32):
  * `windowed_attention_mlx`: query blocks of `block_q` rows each attend only to the key range their window
    allows (`attention_plan`), through `mx.fast.scaled_dot_product_attention` with an explicit boolean mask.
    Cost O(L * (block_q + window)) instead of O(L * S) for sliding layers.
  * Metal prefill (flash style): a threadgroup owns BQ queries of one (batch, head); key/value tiles of BK keys
    are staged in threadgroup memory and only tiles in [first key of the first query's window, last visible key
    of the last query) are visited; one simdgroup per query keeps a running max / sum / accumulator (lanes
    split the head dim). It also writes how many key tiles each threadgroup visited.
  * Metal decode (few queries): one threadgroup per query; its simdgroups take interleaved keys of the visible
    range, then merge their partial softmax states through threadgroup memory.
GQA: query head h uses key/value head h // (Hq // Hkv).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ._metal import KernelSpec

MLX_BLOCK_Q = 128  # query rows per block in the MLX path (sliding layers)
MLX_BLOCK_Q_GLOBAL = 256  # ... for layers without a window (causal only)
DECODE_MAX_QUERIES = 8  # the Metal decode kernel serves up to this many queries
PREFILL_BQ = 8  # queries (simdgroups) per prefill threadgroup
DECODE_SIMDGROUPS = 8  # simdgroups per decode threadgroup
TILE_BYTES = 16384  # threadgroup memory for one K tile plus one V tile


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


# --------------------------------------------------------------------------------------------- Metal path

_HEADER = """
inline bool key_visible(int qpos, int kpos, int q_id, int k_id, int window) {
  const bool same_block = q_id >= 0 && q_id == k_id;
  return (kpos <= qpos || same_block) && (window <= 0 || qpos - kpos < window);
}
"""

# params: [L, S, q_start, k_start, window (0 = none), Hq, Hkv, has_blocks]
# grid (32, ceil(L / BQ) * BQ, B * Hq), threadgroup (32, BQ, 1): simdgroup = query, threadgroup = query block.
# The grid is padded to whole threadgroups so cooperative tile loads never depend on the size Metal reports
# for a partial edge threadgroup.
_PREFILL = """
  threadgroup T k_tile[BK * D];
  threadgroup T v_tile[BK * D];
  const int L = params[0], S = params[1], q_start = params[2], k_start = params[3];
  const int window = params[4], Hq = params[5], Hkv = params[6], has_blocks = params[7];
  constexpr int DPL = (D + 31) / 32;
  const int lane = int(thread_index_in_simdgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int nth = 32 * BQ;  // the grid is padded to whole threadgroups
  const int i = int(thread_position_in_grid.y);
  const bool active = i < L;  // padding simdgroups help load tiles and meet barriers, nothing else
  const int bh = int(thread_position_in_grid.z);
  const int hq = bh % Hq;
  const int bk = (bh / Hq) * Hkv + hq / (Hq / Hkv);
  const int qb = int(threadgroup_position_in_grid.y);
  const int q0 = qb * BQ;
  const int q_last = min(L, q0 + BQ) - 1;
  const int off = q_start - k_start;
  // keys this block may see: from the first query's window start to the last query's last visible key
  const int k_lo = window > 0 ? max(0, q0 + off - window + 1) : 0;
  int k_hi = q_last + off + 1;
  if (has_blocks != 0) {
    const int last_id = block_ids[q_last + off];
    if (last_id >= 0) {
      while (k_hi < S && block_ids[k_hi] == last_id) {
        k_hi++;
      }
    }
  }
  const int qpos = q_start + i;
  const int q_id = (active && has_blocks != 0) ? block_ids[i + off] : -1;
  const ulong q_row = (ulong(bh) * ulong(L) + ulong(i)) * ulong(D);
  float qv[DPL];
  for (int c = 0; c < DPL; ++c) {
    const int d = lane + 32 * c;
    qv[c] = (active && d < D) ? float(q[q_row + d]) * scale : 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  float acc[DPL];
  for (int c = 0; c < DPL; ++c) {
    acc[c] = 0.0f;
  }
  int tiles = 0;
  for (int t0 = (k_lo / BK) * BK; t0 < k_hi; t0 += BK) {
    for (int n = tid; n < BK * D; n += nth) {
      const int kk = t0 + n / D;
      const ulong src = (ulong(bk) * ulong(S) + ulong(kk)) * ulong(D) + ulong(n % D);
      k_tile[n] = kk < S ? k[src] : T(0);
      v_tile[n] = kk < S ? v[src] : T(0);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = 0; j < BK && active; ++j) {
      const int kk = t0 + j;
      if (kk < k_lo || kk >= k_hi) {
        continue;
      }
      const int k_id = has_blocks != 0 ? block_ids[kk] : -1;
      if (!key_visible(qpos, k_start + kk, q_id, k_id, window)) {
        continue;
      }
      float part = 0.0f;
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        part += d < D ? qv[c] * float(k_tile[j * D + d]) : 0.0f;
      }
      const float s = simd_sum(part);
      const float m_new = max(m, s);
      const float corr = exp(m - m_new);
      const float p = exp(s - m_new);
      l = l * corr + p;
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        acc[c] = acc[c] * corr + (d < D ? p * float(v_tile[j * D + d]) : 0.0f);
      }
      m = m_new;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tiles++;
  }
  const float inv_l = 1.0f / l;
  for (int c = 0; c < DPL; ++c) {
    const int d = lane + 32 * c;
    if (active && d < D) {
      out[q_row + d] = T(acc[c] * inv_l);
    }
  }
  if (tid == 0) {
    tiles_visited[bh * int(threadgroups_per_grid.y) + qb] = tiles;
  }
"""

_DECODE = """
  threadgroup float part_m[NSG];
  threadgroup float part_l[NSG];
  threadgroup float part_acc[NSG * D];
  const int L = params[0], S = params[1], q_start = params[2], k_start = params[3];
  const int window = params[4], Hq = params[5], Hkv = params[6], has_blocks = params[7];
  constexpr int DPL = (D + 31) / 32;
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int nth = int(threads_per_threadgroup.x);
  const int i = int(threadgroup_position_in_grid.y);
  const int bh = int(threadgroup_position_in_grid.z);
  const int hq = bh % Hq;
  const int bk = (bh / Hq) * Hkv + hq / (Hq / Hkv);
  const int off = q_start - k_start;
  const int qpos = q_start + i;
  const int q_id = has_blocks != 0 ? block_ids[i + off] : -1;
  const int k_lo = window > 0 ? max(0, i + off - window + 1) : 0;
  int k_hi = i + off + 1;
  if (q_id >= 0) {
    while (k_hi < S && block_ids[k_hi] == q_id) {
      k_hi++;
    }
  }
  const ulong q_row = (ulong(bh) * ulong(L) + ulong(i)) * ulong(D);
  float qv[DPL];
  for (int c = 0; c < DPL; ++c) {
    const int d = lane + 32 * c;
    qv[c] = d < D ? float(q[q_row + d]) * scale : 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  float acc[DPL];
  for (int c = 0; c < DPL; ++c) {
    acc[c] = 0.0f;
  }
  for (int kk = k_lo + sg; kk < k_hi; kk += NSG) {
    const int k_id = has_blocks != 0 ? block_ids[kk] : -1;
    if (!key_visible(qpos, k_start + kk, q_id, k_id, window)) {
      continue;
    }
    const ulong k_row = (ulong(bk) * ulong(S) + ulong(kk)) * ulong(D);
    float part = 0.0f;
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      part += d < D ? qv[c] * float(k[k_row + d]) : 0.0f;
    }
    const float s = simd_sum(part);
    const float m_new = max(m, s);
    const float corr = exp(m - m_new);
    const float p = exp(s - m_new);
    l = l * corr + p;
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      acc[c] = acc[c] * corr + (d < D ? p * float(v[k_row + d]) : 0.0f);
    }
    m = m_new;
  }
  for (int c = 0; c < DPL; ++c) {
    const int d = lane + 32 * c;
    if (d < D) {
      part_acc[sg * D + d] = acc[c];
    }
  }
  if (lane == 0) {
    part_m[sg] = m;
    part_l[sg] = l;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float m_all = -INFINITY;
  for (int s = 0; s < NSG; ++s) {
    m_all = max(m_all, part_m[s]);
  }
  float l_all = 0.0f;
  for (int s = 0; s < NSG; ++s) {
    l_all += part_m[s] == -INFINITY ? 0.0f : part_l[s] * exp(part_m[s] - m_all);
  }
  for (int d = tid; d < D; d += nth) {
    float num = 0.0f;
    for (int s = 0; s < NSG; ++s) {
      num += part_m[s] == -INFINITY ? 0.0f : part_acc[s * D + d] * exp(part_m[s] - m_all);
    }
    out[q_row + d] = T(num / l_all);
  }
"""

PREFILL = KernelSpec("gemma4_window_attention_prefill", ("q", "k", "v", "block_ids", "scale", "params"),
                     ("out", "tiles_visited"), _PREFILL, _HEADER)
DECODE = KernelSpec("gemma4_window_attention_decode", ("q", "k", "v", "block_ids", "scale", "params"), ("out",),
                    _DECODE, _HEADER)
SPECS = (PREFILL, DECODE)


def prefill_tile_keys(head_dim: int, dtype) -> int:
    """BK: keys per K/V tile so that both tiles fit TILE_BYTES of threadgroup memory."""
    bk = TILE_BYTES // (2 * head_dim * dtype.size)
    return max(1, min(32, bk))


def _common_inputs(q, k, v, scale, q_start, k_start, window, block_ids):
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    has_blocks = block_ids is not None
    ids = block_ids.astype(mx.int32) if has_blocks else mx.full((8,), -1, mx.int32)
    params = mx.array([L, S, q_start, k_start, window or 0, Hq, Hkv, int(has_blocks)], mx.int32)
    return [q, k.astype(q.dtype), v.astype(q.dtype), ids, mx.array(scale, mx.float32), params]


def windowed_attention_metal(runner, q, k, v, *, scale, q_start, k_start, window, block_ids=None,
                             return_tiles: bool = False):
    B, Hq, L, D = q.shape
    inputs = _common_inputs(q, k, v, scale, q_start, k_start, window, block_ids)
    if L <= DECODE_MAX_QUERIES and not return_tiles:
        (out,) = runner.kernel(DECODE)(
            inputs=inputs, template=[("T", q.dtype), ("D", D), ("NSG", DECODE_SIMDGROUPS)],
            grid=(32 * DECODE_SIMDGROUPS, L, B * Hq), threadgroup=(32 * DECODE_SIMDGROUPS, 1, 1),
            output_shapes=[q.shape], output_dtypes=[q.dtype])
        return out
    bk = prefill_tile_keys(D, q.dtype)
    n_qblocks = -(-L // PREFILL_BQ)
    out, tiles = runner.kernel(PREFILL)(
        inputs=inputs, template=[("T", q.dtype), ("D", D), ("BQ", PREFILL_BQ), ("BK", bk)],
        grid=(32, n_qblocks * PREFILL_BQ, B * Hq), threadgroup=(32, PREFILL_BQ, 1),
        output_shapes=[q.shape, (B * Hq, n_qblocks)], output_dtypes=[q.dtype, mx.int32])
    return (out, tiles) if return_tiles else out

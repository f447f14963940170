"""Metal decode attention: a few queries (decode, speculative verification) over a long K/V cache.

Decode attention is bound by memory bandwidth: every visible key and value is read once per step, so the kernel
is laid out around reading each K/V byte exactly once, from many threadgroups at the same time.

  * Split-K, two passes. The visible key range is cut into `blocks` of `block_keys` keys; pass 1 runs one
    threadgroup per (batch, KV head, key block, row group) and keeps a partial softmax per query row (running
    max m, sum l, output o = sum p v / l); pass 2 merges the blocks' partials per row. A single block skips
    pass 2 (pass 1 then writes the normalized output).
  * One threadgroup serves every query row of one KV head: the G = Hq / Hkv query heads that share it times the
    L queries (rows = G * L, up to 16 per threadgroup; more rows take more row groups). Each key/value tile is
    staged once in threadgroup memory and used by all of them, so K/V are read once per KV head.
  * K and V are read through their strides (`ensure_row_contiguous=False`): the cache's slice of its buffer
    goes in as it is, without MLX's copy of the whole cache before every step.
  * Per row and tile, one max, one rescale and one exp per visible key (not two exps per key); lanes split the
    head dim (head dims 256 and 512, and any other), one simd_sum per visible key.
  * Visibility is computed, never read from a mask: query i (position q_start + i) sees key j (position
    k_start + j) iff k_lo(i) <= j < k_hi(i) and (j <= i + offset or j is in the query's image block), where
    k_lo applies the sliding window. A sliding layer's keys come from the rotating cache oldest first
    (`k_start` is the position of the first), so the window is an index range.

The block size keeps pass 2's extra reads small: each block's partial output (rows x D in the input dtype)
and the query rows it reloads stay under 1/20 of the block's K/V bytes (`MIN_BLOCK_KEYS_PER_ROW`), while the
number of blocks aims at `TARGET_THREADGROUPS` threadgroups in all (enough for a 40-core GPU at long context).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._metal import KernelSpec
from .sliding_attention import windowed_attention_mlx
from .verdicts import Check, KernelClass, source_hash

MAX_QUERIES = 8  # the decode kernel serves up to this many queries per call
TARGET_THREADGROUPS = 256  # pass-1 threadgroups to aim for (B * Hkv * row groups * blocks)
MAX_BLOCKS = 1024  # pass 2 keeps one weight per block in threadgroup memory
MIN_BLOCK_KEYS_PER_ROW = 20  # block_keys >= 20 * rows: partials + q reloads <= 1/20 of the block's K/V bytes
TILE_BYTES = 16384  # threadgroup memory for one K tile plus one V tile
MAX_SIMDGROUPS = 8
MAX_ROWS_PER_SIMDGROUP = 2
TIMING_CONTEXT = 4096  # keys in the cache when the self-check times the kernel against MLX
CHECK_CONTEXT = 96  # keys of the small agreement check: one block of 96 keys, and three of 32


@dataclass(frozen=True)
class DecodePlan:
    """How a decode attention call is cut: see the module docstring."""

    rows: int  # G * L query rows per KV head
    simdgroups: int  # per threadgroup
    rows_per_simdgroup: int
    row_groups: int  # threadgroups along the rows of one KV head
    tile_keys: int  # keys per K/V tile in threadgroup memory
    key_lo: int  # first key index any query sees
    key_hi: int  # one past the last
    block_keys: int
    blocks: int

    @property
    def rows_per_threadgroup(self) -> int:
        return self.simdgroups * self.rows_per_simdgroup

    def threadgroups(self, batch: int, kv_heads: int) -> int:
        """Pass-1 threadgroups (pass 2 adds one per query row when blocks > 1)."""
        return batch * kv_heads * self.row_groups * self.blocks


def tile_keys(head_dim: int, dtype: mx.Dtype) -> int:
    """Keys per tile: the largest power of two (<= 32) whose K and V tiles fit TILE_BYTES."""
    keys = TILE_BYTES // (2 * head_dim * dtype.size)
    return max(1, min(32, 1 << (max(keys, 1).bit_length() - 1)))


def plan(batch: int, q_heads: int, kv_heads: int, queries: int, keys: int, head_dim: int, dtype: mx.Dtype, *,
         offset: int, window: int | None, has_blocks: bool, block_keys: int | None = None) -> DecodePlan:
    """The cut for q (batch, q_heads, queries, D) over `keys` keys; offset = q_start - k_start. `block_keys`
    overrides the block size (a multiple of the tile; tests use it to run the cut of a full model on fewer
    heads or keys)."""
    rows = (q_heads // kv_heads) * queries
    rps = 1 if rows <= MAX_SIMDGROUPS else MAX_ROWS_PER_SIMDGROUP
    nsg = min(MAX_SIMDGROUPS, -(-rows // rps))
    row_groups = -(-rows // (nsg * rps))
    bk = tile_keys(head_dim, dtype)
    key_lo = max(0, offset - window + 1) if window is not None else 0
    key_hi = keys if has_blocks else offset + queries  # image blocks may extend visibility to their end
    span = max(1, key_hi - key_lo)
    if block_keys is None:
        min_keys = MIN_BLOCK_KEYS_PER_ROW * min(rows, nsg * rps)
        target = -(-TARGET_THREADGROUPS // (batch * kv_heads * row_groups))
        blocks = max(1, min(target, span // min_keys, MAX_BLOCKS))
        block_keys = -(-span // blocks)
    block_keys = max(-(-block_keys // bk) * bk, -(-span // MAX_BLOCKS))
    return DecodePlan(rows, nsg, rps, row_groups, bk, key_lo, key_hi, block_keys, -(-span // block_keys))


# dims: [L, S, Hq, Hkv, blocks, block_keys, has_blocks]; pos: [q_start - k_start, window (0 = none), key_lo,
# key_hi]. Both have fewer than 8 elements, so MLX passes them in the constant address space.
# grid (32 * NSG, blocks, B * Hkv * row_groups), threadgroup (32 * NSG, 1, 1).
_PASS1_CORE = """
  threadgroup T k_tile[BK * D];
  threadgroup T v_tile[BK * D];
  constexpr int DPL = (D + 31) / 32;
  const int L = dims[0], Hq = dims[2], Hkv = dims[3], NB = dims[4], BLK = dims[5], has_blocks = dims[6];
  const int S = dims[1];
  const int off = pos[0], window = pos[1], key_lo = pos[2], key_hi = pos[3];
  const int G = Hq / Hkv;
  const int R = G * L;
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int NT = 32 * NSG;
  const int blk = int(threadgroup_position_in_grid.y);
  const int z = int(threadgroup_position_in_grid.z);
  const int RG = (R + NSG * RPS - 1) / (NSG * RPS);
  const int rg = z % RG;
  const int b = (z / RG) / Hkv;
  const int kvh = (z / RG) % Hkv;
  const int k0 = key_lo + blk * BLK;
  const int k1 = min(key_hi, k0 + BLK);
  const ulong kb = ulong(b) * ulong(k_strides[0]) + ulong(kvh) * ulong(k_strides[1]);
  const ulong vb = ulong(b) * ulong(v_strides[0]) + ulong(kvh) * ulong(v_strides[1]);
  const ulong ks = ulong(k_strides[2]), kd = ulong(k_strides[3]), vs = ulong(v_strides[2]), vd = ulong(v_strides[3]);

  // this simdgroup's query rows: row r = (g, i), query head kvh * G + g, query i
  int row[RPS], qi[RPS], q_id[RPS], lo[RPS], hi[RPS];
  float qv[RPS][DPL], acc[RPS][DPL], m[RPS], l[RPS];
  for (int j = 0; j < RPS; ++j) {
    row[j] = rg * NSG * RPS + sg * RPS + j;
    const bool valid = row[j] < R;
    const int g = valid ? row[j] / L : 0;
    qi[j] = valid ? row[j] % L : 0;
    const ulong qrow = ulong(b) * ulong(q_strides[0]) + ulong(kvh * G + g) * ulong(q_strides[1]) +
                       ulong(qi[j]) * ulong(q_strides[2]);
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      qv[j][c] = (valid && d < D) ? float(q[qrow + ulong(d) * ulong(q_strides[3])]) * scale : 0.0f;
      acc[j][c] = 0.0f;
    }
    m[j] = -INFINITY;
    l[j] = 0.0f;
    q_id[j] = (valid && has_blocks != 0) ? block_ids[qi[j] + off] : -1;
    lo[j] = window > 0 ? max(0, qi[j] + off - window + 1) : 0;
    hi[j] = valid ? qi[j] + off + 1 : 0;
    if (q_id[j] >= 0) {
      while (hi[j] < S && block_ids[hi[j]] == q_id[j]) {
        hi[j]++;
      }
    }
  }

  for (int t0 = k0; t0 < k1; t0 += BK) {
    const int nk = min(BK, k1 - t0);
    for (int n = tid; n < BK * D; n += NT) {
      const int j = n / D, d = n % D;
      if (j < nk) {
        k_tile[n] = k[kb + ulong(t0 + j) * ks + ulong(d) * kd];
        v_tile[n] = v[vb + ulong(t0 + j) * vs + ulong(d) * vd];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = 0; j < RPS; ++j) {
      if (t0 >= hi[j] || t0 + nk <= lo[j]) {
        continue;  // no key of this tile is visible to this row (uniform over the simdgroup)
      }
      float s[BK];
      float m_tile = -INFINITY;
      for (int kk = 0; kk < nk; ++kk) {
        const int key = t0 + kk;
        const bool visible = key >= lo[j] && key < hi[j] &&
                             (key <= qi[j] + off || (q_id[j] >= 0 && block_ids[key] == q_id[j]));
        s[kk] = -INFINITY;
        if (visible) {
          float part = 0.0f;
          for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            part += d < D ? qv[j][c] * float(k_tile[kk * D + d]) : 0.0f;
          }
          s[kk] = simd_sum(part);
          m_tile = max(m_tile, s[kk]);
        }
      }
      if (m_tile == -INFINITY) {
        continue;
      }
      const float m_new = max(m[j], m_tile);
      const float corr = exp(m[j] - m_new);
      l[j] *= corr;
      for (int c = 0; c < DPL; ++c) {
        acc[j][c] *= corr;
      }
      for (int kk = 0; kk < nk; ++kk) {
        if (s[kk] == -INFINITY) {
          continue;
        }
        const float p = exp(s[kk] - m_new);
        l[j] += p;
        for (int c = 0; c < DPL; ++c) {
          const int d = lane + 32 * c;
          acc[j][c] += d < D ? p * float(v_tile[kk * D + d]) : 0.0f;
        }
      }
      m[j] = m_new;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
"""

# one block: the normalized output, out (B, Hq, L, D) contiguous; row index (b * Hq + head) * L + i
_PASS1_SINGLE = _PASS1_CORE + """
  for (int j = 0; j < RPS; ++j) {
    if (row[j] >= R) {
      continue;
    }
    const ulong o_row = (ulong(b * Hq + kvh * G + row[j] / L) * ulong(L) + ulong(qi[j])) * ulong(D);
    const float inv_l = 1.0f / l[j];
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d < D) {
        out[o_row + d] = T(acc[j][c] * inv_l);
      }
    }
  }
"""

# several blocks: per (row, block) the block's normalized output (input dtype), max and sum (float32)
_PASS1_SPLIT = _PASS1_CORE + """
  for (int j = 0; j < RPS; ++j) {
    if (row[j] >= R) {
      continue;
    }
    const ulong r = ulong(b * Hq + kvh * G + row[j] / L) * ulong(L) + ulong(qi[j]);
    const ulong p = r * ulong(NB) + ulong(blk);
    const float inv_l = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d < D) {
        part_o[p * ulong(D) + d] = T(acc[j][c] * inv_l);
      }
    }
    if (lane == 0) {
      part_m[p] = m[j];
      part_l[p] = l[j];
    }
  }
"""

# Pass 2: grid (32, 1, rows), threadgroup (32, 1, 1): one simdgroup per query row merges its blocks.
# o = sum_n w_n o_n / sum_n w_n with w_n = l_n exp(m_n - max m).
_PASS2 = """
  threadgroup float w[MAX_NB];
  constexpr int DPL = (D + 31) / 32;
  const int NB = dims[4];
  const int lane = int(thread_index_in_simdgroup);
  const ulong r = ulong(threadgroup_position_in_grid.z);
  float m_all = -INFINITY;
  for (int n = lane; n < NB; n += 32) {
    m_all = max(m_all, part_m[r * ulong(NB) + n]);
  }
  m_all = simd_max(m_all);
  float den = 0.0f;
  for (int n = lane; n < NB; n += 32) {
    const float mn = part_m[r * ulong(NB) + n];
    const float wn = mn == -INFINITY ? 0.0f : part_l[r * ulong(NB) + n] * exp(mn - m_all);
    w[n] = wn;
    den += wn;
  }
  den = simd_sum(den);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float o[DPL];
  for (int c = 0; c < DPL; ++c) {
    o[c] = 0.0f;
  }
  for (int n = 0; n < NB; ++n) {
    const float wn = w[n];
    if (wn == 0.0f) {
      continue;
    }
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      o[c] += d < D ? wn * float(part_o[(r * ulong(NB) + ulong(n)) * ulong(D) + d]) : 0.0f;
    }
  }
  for (int c = 0; c < DPL; ++c) {
    const int d = lane + 32 * c;
    if (d < D) {
      out[r * ulong(D) + d] = T(o[c] / den);
    }
  }
"""

_INPUTS = ("q", "k", "v", "block_ids", "scale", "dims", "pos")
PASS1_SINGLE = KernelSpec("gemma4_decode_attention_single", _INPUTS, ("out",), _PASS1_SINGLE,
                          ensure_row_contiguous=False)
PASS1_SPLIT = KernelSpec("gemma4_decode_attention_split", _INPUTS, ("part_o", "part_m", "part_l"), _PASS1_SPLIT,
                         ensure_row_contiguous=False)
PASS2 = KernelSpec("gemma4_decode_attention_merge", ("part_o", "part_m", "part_l", "dims"), ("out",), _PASS2)
SPECS = (PASS1_SINGLE, PASS1_SPLIT, PASS2)
_SOURCE_HASH = source_hash(*SPECS)  # part of every verdict key: a changed kernel is checked again


def decode_attention_metal(runner, q, k, v, *, scale, q_start, k_start, window, block_ids=None,
                           block_keys: int | None = None) -> mx.array:
    """Attention of q (B, Hq, L <= MAX_QUERIES, D) over k, v (B, Hkv, S, D), read in place through their strides.
    Same visibility and result as `sliding_attention.windowed_attention_mlx`."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    off = q_start - k_start
    p = plan(B, Hq, Hkv, L, S, D, q.dtype, offset=off, window=window, has_blocks=block_ids is not None,
             block_keys=block_keys)
    k = k if k.dtype == q.dtype else k.astype(q.dtype)
    v = v if v.dtype == q.dtype else v.astype(q.dtype)
    ids = mx.contiguous(block_ids.astype(mx.int32)) if block_ids is not None else mx.full((8,), -1, mx.int32)
    dims = mx.array([L, S, Hq, Hkv, p.blocks, p.block_keys, int(block_ids is not None)], mx.int32)
    pos = mx.array([off, window or 0, p.key_lo, p.key_hi], mx.int32)
    inputs = [q, k, v, ids, mx.array(scale, mx.float32), dims, pos]
    template = [("T", q.dtype), ("D", D), ("BK", p.tile_keys), ("NSG", p.simdgroups),
                ("RPS", p.rows_per_simdgroup)]
    grid = (32 * p.simdgroups, p.blocks, B * Hkv * p.row_groups)
    threadgroup = (32 * p.simdgroups, 1, 1)
    if p.blocks == 1:
        (out,) = runner.kernel(PASS1_SINGLE)(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                                             output_shapes=[q.shape], output_dtypes=[q.dtype])
        return out
    rows = B * Hq * L
    part_o, part_m, part_l = runner.kernel(PASS1_SPLIT)(
        inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
        output_shapes=[(rows, p.blocks, D), (rows, p.blocks), (rows, p.blocks)],
        output_dtypes=[q.dtype, mx.float32, mx.float32])
    (out,) = runner.kernel(PASS2)(
        inputs=[part_o, part_m, part_l, dims], template=[("T", q.dtype), ("D", D), ("MAX_NB", MAX_BLOCKS)],
        grid=(32, 1, rows), threadgroup=(32, 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype])
    return out


def minimum_bytes(q: mx.array, k: mx.array, *, q_start: int, k_start: int, window: int | None) -> int:
    """Bytes decode attention must read at least: q once and the visible keys and values once per KV head
    (no image blocks)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    off = q_start - k_start
    key_lo = max(0, off - window + 1) if window is not None else 0
    visible = off + L - key_lo
    return q.size * q.dtype.size + 2 * B * Hkv * visible * D * k.dtype.size



def kernel_class(q: mx.array, k: mx.array) -> KernelClass:
    """Calls that share a verdict: same dtype, head dim and query heads per KV head."""
    detail = (("dtype", str(q.dtype).split(".")[-1]), ("head_dim", q.shape[-1]), ("groups", q.shape[1] // k.shape[1]))
    return KernelClass("decode_attention", detail, _SOURCE_HASH)


def check(runner, q: mx.array, k: mx.array, *, window: int | None) -> Check:
    """The self-check of `kernel_class(q, k)`: agreement with the float32 MLX path on CHECK_CONTEXT keys (as one
    block and as three, so every kernel of the class runs), then one decode step timed at TIMING_CONTEXT keys with
    the call's KV heads and window."""
    D, groups, kv_heads, dtype = q.shape[-1], q.shape[1] // k.shape[1], k.shape[1], q.dtype
    scale = D**-0.5

    def inputs(kv_heads: int, keys: int, seed: int):
        q_key, k_key, v_key = mx.random.split(mx.random.key(seed), 3)
        return (mx.random.normal((1, kv_heads * groups, 1, D), key=q_key).astype(dtype),
                mx.random.normal((1, kv_heads, keys, D), key=k_key).astype(dtype),
                mx.random.normal((1, kv_heads, keys, D), key=v_key).astype(dtype))

    small = inputs(1, CHECK_CONTEXT, 0)
    small_kw = dict(scale=scale, q_start=CHECK_CONTEXT - 1, k_start=0,
                    window=None if window is None else min(window, CHECK_CONTEXT // 2))

    def real():
        q, k, v = inputs(kv_heads, TIMING_CONTEXT, 1)
        kw = dict(scale=scale, q_start=TIMING_CONTEXT - 1, k_start=0, window=window)
        return (lambda: decode_attention_metal(runner, q, k, v, **kw),
                lambda: windowed_attention_mlx(q, k, v, **kw))

    def kernel():
        return mx.stack([decode_attention_metal(runner, *small, block_keys=n, **small_kw) for n in (96, 32)])

    def reference():
        return mx.stack([windowed_attention_mlx(*(a.astype(mx.float32) for a in small), **small_kw)] * 2)

    return Check(kernel, reference, real, dtype)

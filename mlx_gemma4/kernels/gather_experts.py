"""Top-k expert GeGLU for the 26B A4B MoE: out[t] = sum_k w[t,k] * down[e] @ (gelu(gate[e] @ x[t]) * (up[e] @ x[t])).

Semantics follow transformers' `Gemma4TextExperts.forward` (modeling_gemma4.py): `gate_up_proj[e]` is (2I, H)
with gate rows [:I] and up rows [I:], activation gelu with the tanh approximation, `down_proj[e]` is (H, I), and
each expert's output is scaled by its routing weight before the per-token sum.

Two implementations that must agree:
  * `expert_glu_mlx`: MLX ops. Few tokens: `gather_mm`/`gather_qmm` straight on the (T, K) indices; many tokens:
    (token, slot) pairs sorted by expert so the gathered matmuls run over contiguous expert segments
    (`sorted_indices=True`), then the pairs are put back in token order and summed. On the CPU backend many
    tokens take `expert_glu_segments` instead: one BLAS matmul per expert segment.
  * `expert_glu_metal`: Metal kernels that read the stacked expert bank in place (plain or MLX-affine-quantized).
      decode  (T <= DECODE_MAX_TOKENS): one simdgroup per output row, lanes stride the row (matrix-vector per
              expert); kernel 1 writes h = gelu(gate x) * (up x) per pair, kernel 2 sums the K down projections
              with their routing weights.
      prefill: pairs sorted by expert; a threadgroup owns a tile of BM consecutive sorted pairs and one output row
              per simdgroup; within the tile, pairs of the same expert share each dequantized weight row (grouped
              matrix-matrix product). The same body serves gate/up (GLU=true) and down (GLU=false, scaled by the
              routing weight); the per-token sum over K is a final gather + sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ._metal import KernelSpec
from .products import compact_matmul, quantized_matmul

DECODE_MAX_TOKENS = 8  # token counts up to this use the matrix-vector kernels
SORT_MIN_PAIRS = 64  # the MLX path sorts (token, slot) pairs by expert from this many pairs on
PREFILL_TILE_PAIRS = 8  # BM: sorted pairs per prefill threadgroup
PREFILL_CHUNK = 128  # input columns staged in threadgroup memory per step (multiple of 8)
PREFILL_ROWS = 8  # output rows (simdgroups) per prefill threadgroup
DECODE_ROWS = 4  # simdgroups (output rows) per decode threadgroup


@dataclass
class ExpertBank:
    """One stacked expert matrix in Hugging Face layout (E, out, in), read in place.

    weight: float (E, out, in), or uint32 (E, out, in * bits // 32) packed by `mx.quantize` (affine mode), in
    which case scales/biases are (E, out, in // group_size)."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int | None = None
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def in_dim(self) -> int:
        return self.weight.shape[2] * 32 // self.bits if self.quantized else self.weight.shape[2]

    def validate(self, what: str) -> None:
        if self.weight.ndim != 3:
            raise ValueError(f"{what}: expert weight must be 3-D (E, out, in), got shape {self.weight.shape}")
        if self.quantized:
            if self.bits not in (4, 8):
                raise ValueError(f"{what}: bits must be 4 or 8, got {self.bits}")
            if self.group_size not in (32, 64, 128):
                raise ValueError(f"{what}: group_size must be 32, 64 or 128, got {self.group_size}")
            if self.weight.dtype != mx.uint32:
                raise ValueError(f"{what}: quantized weight must be uint32, got {self.weight.dtype}")
            if self.scales is None or self.biases is None:
                raise ValueError(f"{what}: quantized weight needs scales and biases (affine mode)")
            want = (*self.weight.shape[:2], self.in_dim // self.group_size)
            if tuple(self.scales.shape) != want or tuple(self.biases.shape) != want:
                raise ValueError(f"{what}: scales/biases must have shape {want}, got {self.scales.shape} "
                                 f"and {self.biases.shape}")
        else:
            if self.weight.dtype not in (mx.float32, mx.float16, mx.bfloat16):
                raise ValueError(f"{what}: weight dtype {self.weight.dtype} is not a float type; pass bits/"
                                 "group_size/scales/biases for a quantized bank")
            if self.scales is not None or self.biases is not None or self.group_size is not None:
                raise ValueError(f"{what}: scales/biases/group_size given without bits")


def validate_inputs(x, indices, weights, gate_up: ExpertBank, down: ExpertBank) -> None:
    gate_up.validate("gate_up")
    down.validate("down")
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {x.shape}")
    if x.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    if indices.ndim != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must be (tokens, k) with tokens={x.shape[0]}, got shape {indices.shape}")
    if indices.dtype not in (mx.int32, mx.uint32):
        raise ValueError(f"indices must be int32, got {indices.dtype}")
    if tuple(weights.shape) != tuple(indices.shape):
        raise ValueError(f"weights shape {weights.shape} must equal indices shape {indices.shape}")
    H = x.shape[1]
    if gate_up.in_dim != H:
        raise ValueError(f"gate_up input dim {gate_up.in_dim} != hidden size {H}")
    if gate_up.out_dim % 2:
        raise ValueError(f"gate_up out dim {gate_up.out_dim} must be even (gate rows then up rows)")
    inter = gate_up.out_dim // 2
    if down.out_dim != H or down.in_dim != inter:
        raise ValueError(f"down must be (E, {H}, {inter}), got out={down.out_dim}, in={down.in_dim}")
    if down.num_experts != gate_up.num_experts:
        raise ValueError(f"gate_up has {gate_up.num_experts} experts but down has {down.num_experts}")


# ----------------------------------------------------------------------------------------------- MLX path


def gelu_tanh(x: mx.array) -> mx.array:
    """gelu with the tanh approximation (transformers' `gelu_pytorch_tanh`)."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _gather_matmul(x: mx.array, bank: ExpertBank, experts: mx.array, sorted_indices: bool) -> mx.array:
    """x (..., 1, in) times bank[experts].T -> (..., 1, out); experts broadcast against x's batch dims."""
    if bank.quantized:
        return mx.gather_qmm(x, bank.weight, bank.scales, bank.biases, rhs_indices=experts, transpose=True,
                             group_size=bank.group_size, bits=bank.bits, sorted_indices=sorted_indices)
    w = bank.weight
    if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
        # MLX's CPU gather_mm is float32-only: with fewer (token, slot) pairs than experts, take just the
        # selected experts' matrices (the rows a matrix-vector product reads anyway); else upcast the bank.
        if experts.size < bank.num_experts:
            return compact_matmul(x, w[experts])
        x, w = x.astype(mx.float32), w.astype(mx.float32)
    elif w.dtype != x.dtype:
        w = w.astype(x.dtype)
    return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=sorted_indices)


def _expert_matmul(x: mx.array, bank: ExpertBank, e: int) -> mx.array:
    """x (rows, in) times expert e's matrix transposed -> (rows, out)."""
    if bank.quantized:
        return quantized_matmul(x, bank.weight[e], bank.scales[e], bank.biases[e], bank.group_size, bank.bits)
    return compact_matmul(x, bank.weight[e])


def expert_glu_segments(x, indices, weights, gate_up: ExpertBank, down: ExpertBank) -> mx.array:
    """The CPU prefill path: (token, slot) pairs sorted by expert, then one plain matmul per expert over its
    contiguous segment of rows (BLAS sgemm; compact weights unpacked, see `mlx_gemma4.compact`).

    MLX's CPU gather_mm runs at ~5 GFLOP/s on these shapes, a per-expert sgemm at ~30 (T=512, 26B dims: 6.2 s
    vs 1.2 s for the gate/up bank). Needs the routing on the host: one synchronization per MoE layer."""
    T, K = indices.shape
    inter = gate_up.out_dim // 2
    flat = indices.reshape(-1)
    order = mx.argsort(flat)  # sorted pair -> original pair (t * K + k)
    counts = np.bincount(np.array(flat), minlength=gate_up.num_experts).tolist()
    h = x[order // K].astype(mx.float32)
    outputs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            gu = _expert_matmul(h[start:start + n], gate_up, e)
            outputs.append(_expert_matmul(gelu_tanh(gu[:, :inter]) * gu[:, inter:], down, e))
            start += n
    y = mx.concatenate(outputs)[mx.argsort(order)].reshape(T, K, -1)
    out = (y * weights.astype(mx.float32)[..., None]).sum(axis=1)
    return out.astype(x.dtype)


def expert_glu_gathered(x, indices, weights, gate_up: ExpertBank, down: ExpertBank, sort: bool) -> mx.array:
    """`gather_mm`/`gather_qmm` on the bank in place; with `sort`, over (token, slot) pairs sorted by expert."""
    T, K = indices.shape
    inter = gate_up.out_dim // 2
    indices = indices.astype(mx.uint32)
    if sort:
        flat = indices.reshape(-1)
        order = mx.argsort(flat)  # sorted pair -> original pair (t * K + k)
        experts = flat[order]
        h = x[order // K][:, None, :]  # (N, 1, H): activation rows only, the expert bank is read in place
    else:
        experts = indices
        h = x[:, None, None, :]  # (T, 1, 1, H) broadcast against (T, K)
    gu = _gather_matmul(h, gate_up, experts, sorted_indices=sort)
    h = gelu_tanh(gu[..., :inter]) * gu[..., inter:]
    y = _gather_matmul(h, down, experts, sorted_indices=sort).squeeze(-2)
    if sort:
        y = y[mx.argsort(order)].reshape(T, K, -1)
    out = (y.astype(mx.float32) * weights.astype(mx.float32)[..., None]).sum(axis=1)
    return out.astype(x.dtype)


def expert_glu_mlx(x, indices, weights, gate_up: ExpertBank, down: ExpertBank) -> mx.array:
    """The MLX-ops path: per-expert segments on the CPU from SORT_MIN_PAIRS pairs on, else gathered matmuls."""
    many = indices.size >= SORT_MIN_PAIRS
    if many and mx.default_device() == mx.cpu:
        return expert_glu_segments(x, indices, weights, gate_up, down)
    return expert_glu_gathered(x, indices, weights, gate_up, down, sort=many)


# --------------------------------------------------------------------------------------------- Metal path

# Weight access shared by all expert kernels. A "unit" is one storage word of a weight row: one element of a
# float bank, or one uint32 holding 32/BITS quantized values (little-end first, as mx.quantize packs them)
# whose group's scale and bias turn q into scale * q + bias. Pointer types are template parameters so the
# helpers accept device and constant buffers alike.
_HEADER = """
template <typename WT, typename ST, int BITS, int GS>
struct WeightUnits {
  static constant constexpr const int N = 32 / BITS;
  static inline int per_row(int in_dim) { return in_dim / N; }
  template <typename PW, typename PS>
  static inline void load(PW w, PS scales, PS biases, ulong row, int in_dim, int u, thread float* v) {
    const uint word = w[row * ulong(in_dim / N) + u];
    const ulong g = row * ulong(in_dim / GS) + ulong((u * N) / GS);
    const float s = float(scales[g]);
    const float b = float(biases[g]);
    for (int i = 0; i < N; ++i) {
      v[i] = s * float((word >> (BITS * i)) & ((1u << BITS) - 1u)) + b;
    }
  }
};

template <typename WT, typename ST, int GS>
struct WeightUnits<WT, ST, 0, GS> {
  static constant constexpr const int N = 1;
  static inline int per_row(int in_dim) { return in_dim; }
  template <typename PW, typename PS>
  static inline void load(PW w, PS scales, PS biases, ulong row, int in_dim, int u, thread float* v) {
    v[0] = float(w[row * ulong(in_dim) + u]);
  }
};

inline float gelu_tanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + metal::precise::tanh(c * (x + 0.044715f * x * x * x)));
}
"""

# Decode kernel 1: h[p, i] = gelu(gate[e] . x[t]) * (up[e] . x[t]) for pair p = t*K + k, e = indices[p].
# grid (32, I, T*K), threadgroup (32, DECODE_ROWS, 1): one simdgroup per (row i, pair p).
_DECODE_GATE_UP = """
  const int H = params[0], I = params[1], K = params[2];
  const uint lane = thread_index_in_simdgroup;
  const int i = int(thread_position_in_grid.y);
  const int p = int(thread_position_in_grid.z);
  const int t = p / K;
  typedef WeightUnits<WT, ST, BITS, GS> U;
  const ulong e = ulong(indices[p]);
  const ulong row_gate = e * ulong(2 * I) + ulong(i);
  const ulong row_up = row_gate + ulong(I);
  float acc_gate = 0.0f, acc_up = 0.0f;
  float vg[U::N], vu[U::N];
  for (int u = int(lane); u < U::per_row(H); u += 32) {
    U::load(w, scales, biases, row_gate, H, u, vg);
    U::load(w, scales, biases, row_up, H, u, vu);
    for (int j = 0; j < U::N; ++j) {
      const float xv = float(x[t * H + u * U::N + j]);
      acc_gate += vg[j] * xv;
      acc_up += vu[j] * xv;
    }
  }
  acc_gate = simd_sum(acc_gate);
  acc_up = simd_sum(acc_up);
  if (lane == 0) {
    h[p * I + i] = gelu_tanh(acc_gate) * acc_up;
  }
"""

# Decode kernel 2: out[t, r] = sum_k weights[t, k] * (down[e_k, r] . h[t*K + k]).
# grid (32, H, T), threadgroup (32, DECODE_ROWS, 1): one simdgroup per output element.
_DECODE_DOWN = """
  const int H = params[0], I = params[1], K = params[2];
  const uint lane = thread_index_in_simdgroup;
  const int r = int(thread_position_in_grid.y);
  const int t = int(thread_position_in_grid.z);
  typedef WeightUnits<WT, ST, BITS, GS> U;
  float acc = 0.0f;
  float v[U::N];
  for (int k = 0; k < K; ++k) {
    const int p = t * K + k;
    const ulong row = ulong(indices[p]) * ulong(H) + ulong(r);
    float part = 0.0f;
    for (int u = int(lane); u < U::per_row(I); u += 32) {
      U::load(w, scales, biases, row, I, u, v);
      for (int j = 0; j < U::N; ++j) {
        part += v[j] * h[p * I + u * U::N + j];
      }
    }
    acc += float(weights[p]) * part;
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    out[t * H + r] = OutT(acc);
  }
"""

# Prefill: grouped product over pairs sorted by expert. A threadgroup of RSG simdgroups owns the sorted pairs
# [tile * BM, tile * BM + BM) and RSG output rows, one per simdgroup; lanes stride a row's storage words (so a
# simdgroup reads a weight row contiguously, as in decode) and keep BM accumulators. Input columns are staged
# in threadgroup memory CHUNK at a time; within the tile each run of pairs with the same expert reads its
# weight row once for all of its pairs (the grouped matrix-matrix product).
#   GLU=true : input row of pair j is x[order[j] / K] (in = H), output rows o < I of y = gelu(gate) * up
#   GLU=false: input row of pair j is x[j] (h in sorted order, in = I), y = weights[order[j]] * (down . x)
# grid (32, ceil(OUT / RSG) * RSG, n_tiles), threadgroup (32, RSG, 1). The grid is padded to whole
# threadgroups so the cooperative staging loop never depends on the size Metal reports for a partial
# threadgroup; padding simdgroups stage inputs and meet barriers, nothing else.
_PREFILL = """
  threadgroup float xs[BM * CHUNK];
  const int IN = params[0], OUT = params[1], K = params[2], N = params[3];
  const int lane = int(thread_index_in_simdgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int nth = 32 * RSG;
  const int o = int(thread_position_in_grid.y);
  const bool active = o < OUT;
  const int j0 = int(threadgroup_position_in_grid.z) * BM;
  const int nj = min(BM, N - j0);
  typedef WeightUnits<WT, ST, BITS, GS> U;
  float acc_a[BM], acc_b[BM];
  for (int j = 0; j < BM; ++j) {
    acc_a[j] = 0.0f;
    acc_b[j] = 0.0f;
  }
  float va[U::N], vb[U::N];
  for (int c0 = 0; c0 < IN; c0 += CHUNK) {
    const int nc = min(CHUNK, IN - c0);
    for (int q = tid; q < BM * CHUNK; q += nth) {
      const int j = q / CHUNK, c = q % CHUNK;
      float val = 0.0f;
      if (j < nj && c < nc) {
        const int src = GLU ? order[j0 + j] / K : j0 + j;
        val = float(x[ulong(src) * ulong(IN) + ulong(c0 + c)]);
      }
      xs[q] = val;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    int run = 0;
    while (active && run < nj) {
      const int e = sorted_experts[j0 + run];
      int run_end = run + 1;
      while (run_end < nj && sorted_experts[j0 + run_end] == e) {
        run_end++;
      }
      const ulong row_a = GLU ? ulong(e) * ulong(2 * OUT) + ulong(o) : ulong(e) * ulong(OUT) + ulong(o);
      const ulong row_b = row_a + ulong(OUT);
      for (int u = c0 / U::N + lane; u < (c0 + nc) / U::N; u += 32) {
        U::load(w, scales, biases, row_a, IN, u, va);
        if (GLU) {
          U::load(w, scales, biases, row_b, IN, u, vb);
        }
        const int c = u * U::N - c0;
        for (int j = 0; j < BM; ++j) {
          if (j >= run && j < run_end) {
            for (int n = 0; n < U::N; ++n) {
              const float xv = xs[j * CHUNK + c + n];
              acc_a[j] += va[n] * xv;
              if (GLU) {
                acc_b[j] += vb[n] * xv;
              }
            }
          }
        }
      }
      run = run_end;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (active) {
    for (int j = 0; j < BM; ++j) {
      if (j < nj) {
        const float a = simd_sum(acc_a[j]);
        const float b = GLU ? simd_sum(acc_b[j]) : 0.0f;
        if (lane == 0) {
          const float val = GLU ? gelu_tanh(a) * b : float(weights[order[j0 + j]]) * a;
          y[ulong(j0 + j) * ulong(OUT) + ulong(o)] = val;
        }
      }
    }
  }
"""

DECODE_GATE_UP = KernelSpec("gemma4_experts_decode_gate_up",
                            ("x", "indices", "w", "scales", "biases", "params"), ("h",), _DECODE_GATE_UP, _HEADER)
DECODE_DOWN = KernelSpec("gemma4_experts_decode_down",
                         ("h", "indices", "weights", "w", "scales", "biases", "params"), ("out",), _DECODE_DOWN,
                         _HEADER)
PREFILL = KernelSpec("gemma4_experts_prefill",
                     ("x", "order", "sorted_experts", "weights", "w", "scales", "biases", "params"), ("y",),
                     _PREFILL, _HEADER)
SPECS = (DECODE_GATE_UP, DECODE_DOWN, PREFILL)

_DUMMY = None


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bank_args(bank: ExpertBank):
    """(inputs w, scales, biases) and template args (WT, ST, BITS, GS) for a bank."""
    global _DUMMY
    if bank.quantized:
        return ([bank.weight, bank.scales, bank.biases],
                [("WT", mx.uint32), ("ST", bank.scales.dtype), ("BITS", bank.bits), ("GS", bank.group_size)])
    if _DUMMY is None:
        # >= 8 elements so MLX puts it in the device address space like real scales (see write_signature)
        _DUMMY = mx.zeros((8,), mx.float32)
    return ([bank.weight, _DUMMY, _DUMMY],
            [("WT", bank.weight.dtype), ("ST", mx.float32), ("BITS", 0), ("GS", 32)])


def expert_glu_metal(runner, x, indices, weights, gate_up: ExpertBank, down: ExpertBank) -> mx.array:
    T, K = indices.shape
    H = x.shape[1]
    inter = gate_up.out_dim // 2
    indices = indices.astype(mx.int32)
    weights = weights.astype(mx.float32)
    gu_in, gu_t = _bank_args(gate_up)
    dn_in, dn_t = _bank_args(down)
    if T <= DECODE_MAX_TOKENS:
        params = mx.array([H, inter, K, 0, 0, 0, 0, 0], mx.int32)
        (h,) = runner.kernel(DECODE_GATE_UP)(
            inputs=[x, indices.reshape(-1), *gu_in, params], template=gu_t,
            grid=(32, inter, T * K), threadgroup=(32, DECODE_ROWS, 1),
            output_shapes=[(T * K, inter)], output_dtypes=[mx.float32])
        (out,) = runner.kernel(DECODE_DOWN)(
            inputs=[h, indices.reshape(-1), weights.reshape(-1), *dn_in, params], template=[*dn_t, ("OutT", x.dtype)],
            grid=(32, H, T), threadgroup=(32, DECODE_ROWS, 1),
            output_shapes=[(T, H)], output_dtypes=[x.dtype])
        return out
    n = T * K
    flat = indices.reshape(-1)
    order = mx.argsort(flat).astype(mx.int32)
    sorted_experts = flat[order]
    flat_w = weights.reshape(-1)
    tiles = -(-n // PREFILL_TILE_PAIRS)
    common = [("BM", PREFILL_TILE_PAIRS), ("CHUNK", PREFILL_CHUNK), ("RSG", PREFILL_ROWS)]
    (h,) = runner.kernel(PREFILL)(
        inputs=[x, order, sorted_experts, flat_w, *gu_in, mx.array([H, inter, K, n, 0, 0, 0, 0], mx.int32)],
        template=[*gu_t, *common, ("GLU", True)], grid=(32, _padded(inter, PREFILL_ROWS), tiles),
        threadgroup=(32, PREFILL_ROWS, 1),
        output_shapes=[(n, inter)], output_dtypes=[mx.float32])
    (y,) = runner.kernel(PREFILL)(
        inputs=[h, order, sorted_experts, flat_w, *dn_in, mx.array([inter, H, K, n, 0, 0, 0, 0], mx.int32)],
        template=[*dn_t, *common, ("GLU", False)], grid=(32, _padded(H, PREFILL_ROWS), tiles),
        threadgroup=(32, PREFILL_ROWS, 1),
        output_shapes=[(n, H)], output_dtypes=[mx.float32])
    # y is already scaled by the routing weights; put the pairs back in token order and sum over k.
    return y[mx.argsort(order)].reshape(T, K, H).sum(axis=1).astype(x.dtype)

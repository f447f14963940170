"""Metal expert decode: the top-k expert GeGLU of a few tokens (T <= 8), reading each selected expert once.

Decode with a mixture of experts is bound by memory bandwidth: a step reads the selected experts' packed
weights, scales and biases. The kernels are laid out so that those bytes are read once per step.

  * (token, slot) pairs are sorted by expert. A threadgroup owns one expert's run of pairs (every token that
    selected that expert) and a block of its output rows; threadgroups at other positions of the same run
    exit at once. Each weight row is read once for all the tokens of the run (up to `NT` = T at a time).
  * Lanes own rows (`RPL` rows per lane, 256 lanes per threadgroup) and stream them in 16-byte units (32
    values at 4 bits, 16 at 8 bits); the inputs of the run are staged in threadgroup memory, `CHUNK`
    columns at a time, and read from there by every lane (the same address: a broadcast).
  * Dequantization is factored per scale group: a unit's contribution is `scale * dot(q, x) + bias * sum(x)`,
    with sum(x) over the unit's columns computed once per staged chunk, instead of `(scale * q + bias) * x`
    per element.
  * Rows per threadgroup are chosen so that the staged inputs (read once per threadgroup) stay near
    `INPUT_SHARE` of the weight bytes the threadgroup reads, within `ACCUMULATORS` floats per lane.

Two launches: gate/up (GLU=true: h[p] = gelu(gate_e . x[t]) * (up_e . x[t]) for pair p = t*K + k, e = the
expert of p, h in x's dtype) and down (GLU=false: y[p] = w[p] * (down_e . h[p]), float32); the sum over the k
slots of each token is an MLX reduction of y (T*K*H floats).
"""

from __future__ import annotations

import math

import mlx.core as mx

from ._metal import KernelSpec
from .gather_experts import ExpertBank, expert_glu_mlx
from .verdicts import Check, KernelClass, source_hash

MAX_TOKENS = 8  # token counts up to this use the decode kernels
THREADS = 256  # lanes per threadgroup (8 simdgroups), one or more rows each
CHUNK = 512  # input columns staged per step (a multiple of every group size and unit)
ACCUMULATORS = 48  # float accumulators per lane: rows per lane * tokens (* 2 for gate and up)
INPUT_SHARE = 0.02  # staged input bytes per threadgroup / its weight bytes, at most (when ACCUMULATORS allow)
CHECK_DIMS = dict(experts=8, hidden=256, inter=128, top_k=4, tokens=3)  # the small agreement check

_HEADER = """
// One 16-byte unit of a weight row and its dot product with its 32 (4-bit), 16 (8-bit), 8 (16-bit float) or
// 4 (float32) staged input values.
template <typename WT, int BITS> struct Unit {  // quantized: 32 / BITS values per word, little end first
  static constant constexpr const int N = 128 / BITS;
  static inline float dot(uint4 w, const threadgroup float* x) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint MASK = (1u << BITS) - 1u;
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) {
      const uint v = w[k];
      for (int i = 0; i < PER_WORD; ++i) {
        s += float((v >> (BITS * i)) & MASK) * x[PER_WORD * k + i];
      }
    }
    return s;
  }
};

// float banks (BITS = 0): 16 bytes hold 4 float32 or 8 float16/bfloat16 values
inline float unit_value(float, uint v, int half_index) { return as_type<float>(v); }
inline float unit_value(half, uint v, int half_index) {
  return float(as_type<half>(ushort(half_index ? v >> 16 : v & 0xFFFFu)));
}
inline float unit_value(bfloat16_t, uint v, int half_index) {
  return as_type<float>(half_index ? v & 0xFFFF0000u : v << 16);
}

template <typename WT> struct Unit<WT, 0> {
  static constant constexpr const int N = 16 / sizeof(WT);
  static inline float dot(uint4 w, const threadgroup float* x) {
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) {
      for (int i = 0; i < N / 4; ++i) {
        s += unit_value(WT(0), w[k], i) * x[(N / 4) * k + i];
      }
    }
    return s;
  }
};

inline float gelu_tanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + metal::precise::tanh(c * (x + 0.044715f * x * x * x)));
}
"""

# params: [IN, OUT, K, NP = T*K pairs, GS] (constant address space).
# grid (THREADS, row blocks, NP), threadgroup (THREADS, 1, 1): z = a position in the expert-sorted pairs.
# GLU: inputs x (T, IN), output (NP, OUT) in x's dtype; rows o < OUT of gate, OUT + o of up.
# down: inputs h (NP, IN), output (NP, OUT) float32 scaled by the pair's routing weight.
_BODY = """
  threadgroup float xs[NT * CHUNK];
  threadgroup float xsum[NT * (CHUNK / Unit<WT, BITS>::N)];
  threadgroup int run_info[2];
  threadgroup int pairs[NT];
  threadgroup float pair_weight[NT];
  typedef Unit<WT, BITS> U;
  constexpr int UPC = CHUNK / U::N;  // units per staged chunk
  const int IN = params[0], OUT = params[1], K = params[2], NP = params[3], GS = params[4];
  const int tid = int(thread_index_in_threadgroup);
  const int j0 = int(threadgroup_position_in_grid.z);
  const int rb = int(threadgroup_position_in_grid.y);
  if (tid == 0) {
    const int e0 = sorted_experts[j0];
    int n = 0;
    if (j0 == 0 || sorted_experts[j0 - 1] != e0) {
      n = 1;
      while (j0 + n < NP && sorted_experts[j0 + n] == e0) {
        n++;
      }
    }
    run_info[0] = e0;
    run_info[1] = n;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int e = run_info[0], run = run_info[1];
  if (run == 0) {
    return;  // not the first position of its expert's run: that position's threadgroup serves the run
  }
  const int upg = GS / U::N;  // units per scale group (quantized banks)
  const ulong upr = ulong(IN / U::N);  // units per weight row
  const device uint4* w4 = (const device uint4*)w;
  for (int base = 0; base < run; base += NT) {
    const int nt = min(NT, run - base);
    if (tid < nt) {
      pairs[tid] = order[j0 + base + tid];
      pair_weight[tid] = GLU ? 1.0f : float(weights[pairs[tid]]);
    }
    float acc_a[RPL][NT], acc_b[RPL][NT];
    for (int i = 0; i < RPL; ++i) {
      for (int t = 0; t < NT; ++t) {
        acc_a[i][t] = 0.0f;
        acc_b[i][t] = 0.0f;
      }
    }
    for (int c0 = 0; c0 < IN; c0 += CHUNK) {
      const int nc = min(CHUNK, IN - c0);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int n = tid; n < nt * CHUNK; n += THREADS) {
        const int t = n / CHUNK, c = n % CHUNK;
        const ulong src = GLU ? ulong(pairs[t] / K) : ulong(pairs[t]);
        xs[n] = c < nc ? float(x[src * ulong(IN) + ulong(c0 + c)]) : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int n = tid; n < nt * UPC; n += THREADS) {
        float s = 0.0f;
        for (int i = 0; i < U::N; ++i) {
          s += xs[(n / UPC) * CHUNK + (n % UPC) * U::N + i];
        }
        xsum[n] = s;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int i = 0; i < RPL; ++i) {
        const int row = (rb * RPL + i) * THREADS + tid;
        if (row >= OUT) {
          continue;
        }
        const ulong ra = GLU ? ulong(e) * ulong(2 * OUT) + ulong(row) : ulong(e) * ulong(OUT) + ulong(row);
        const ulong rb2 = ra + ulong(OUT);
        float sa = 1.0f, ba = 0.0f, sb = 1.0f, bb = 0.0f;
        for (int u = 0; u < nc / U::N; ++u) {
          const int gu = c0 / U::N + u;
          if (BITS != 0 && gu % upg == 0) {  // a new scale group (chunks start on group boundaries)
            const ulong ga = ra * ulong(IN / GS) + ulong(gu / upg);
            sa = float(scales[ga]);
            ba = float(biases[ga]);
            if (GLU) {
              const ulong gb = rb2 * ulong(IN / GS) + ulong(gu / upg);
              sb = float(scales[gb]);
              bb = float(biases[gb]);
            }
          }
          const uint4 wa = w4[ra * upr + ulong(gu)];
          for (int t = 0; t < NT; ++t) {
            if (t < nt) {
              const float d = U::dot(wa, &xs[t * CHUNK + u * U::N]);
              acc_a[i][t] += BITS != 0 ? sa * d + ba * xsum[t * UPC + u] : d;
            }
          }
          if (GLU) {
            const uint4 wb = w4[rb2 * upr + ulong(gu)];
            for (int t = 0; t < NT; ++t) {
              if (t < nt) {
                const float d = U::dot(wb, &xs[t * CHUNK + u * U::N]);
                acc_b[i][t] += BITS != 0 ? sb * d + bb * xsum[t * UPC + u] : d;
              }
            }
          }
        }
      }
    }
    for (int i = 0; i < RPL; ++i) {
      const int row = (rb * RPL + i) * THREADS + tid;
      for (int t = 0; t < NT; ++t) {
        if (t < nt && row < OUT) {
          const ulong dst = ulong(pairs[t]) * ulong(OUT) + ulong(row);
          if (GLU) {
            y[dst] = XT(gelu_tanh(acc_a[i][t]) * acc_b[i][t]);
          } else {
            y[dst] = YT(pair_weight[t] * acc_a[i][t]);
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
"""

SPEC = KernelSpec("gemma4_expert_decode", ("x", "order", "sorted_experts", "weights", "w", "scales", "biases",
                                           "params"), ("y",), _BODY, _HEADER)
SPECS = (SPEC,)
_SOURCE_HASH = source_hash(*SPECS)  # part of every verdict key: a changed kernel is checked again


def token_slots(tokens: int) -> int:
    """NT: tokens a threadgroup serves per pass over its weights (T rounded up to a power of two)."""
    return 1 << max(0, (tokens - 1).bit_length())


def weight_bytes_per_value(bank) -> float:
    if bank.quantized:
        return bank.bits / 8 + 2 * bank.scales.dtype.size / bank.group_size
    return bank.weight.dtype.size


def rows_per_lane(tokens: int, input_dtype: mx.Dtype, bank, glu: bool) -> int:
    """RPL: enough rows per threadgroup that the staged inputs stay near INPUT_SHARE of its weight bytes, within
    ACCUMULATORS floats per lane."""
    nt = token_slots(tokens)
    rows_per_value = 2 if glu else 1  # a gate/up lane reads a gate row and an up row
    want_rows = nt * input_dtype.size / (INPUT_SHARE * rows_per_value * weight_bytes_per_value(bank))
    budget = max(1, ACCUMULATORS // (nt * rows_per_value))
    return max(1, min(math.ceil(want_rows / THREADS), budget))


def reads(bank) -> bool:
    """Whether the kernel reads this bank: float, or affine-quantized with 4 or 8 bits (group size 32, 64 or 128;
    other modes and bit widths take the MLX path), in rows of whole 16-byte units that never straddle a scale
    group."""
    if bank.quantized and not (bank.mode == "affine" and bank.bits in (4, 8) and bank.group_size in (32, 64, 128)):
        return False
    in_bytes = bank.in_dim * (bank.bits / 8 if bank.quantized else bank.weight.dtype.size)
    if in_bytes % 16:
        return False
    return not bank.quantized or bank.group_size % (128 // bank.bits) == 0


def _bank_args(bank, dummy):
    if bank.quantized:
        return [bank.weight, bank.scales, bank.biases], [("WT", mx.uint32), ("ST", bank.scales.dtype),
                                                         ("BITS", bank.bits)], bank.group_size
    return [bank.weight, dummy, dummy], [("WT", bank.weight.dtype), ("ST", mx.float32), ("BITS", 0)], 32


def launch(runner, x, order, sorted_experts, weights, bank, out_rows, k, glu, out_dtype):
    """One launch over one bank: gate/up (glu, x (T, IN)) or down (x = h (T*K, IN)); pairs sorted by expert."""
    tokens = x.shape[0] if glu else x.shape[0] // k
    nt = token_slots(tokens)
    rpl = rows_per_lane(tokens, x.dtype, bank, glu)
    dummy = mx.zeros((8,), mx.float32)  # >= 8 elements: device address space, like real scales
    bank_inputs, bank_template, group_size = _bank_args(bank, dummy)
    pairs = order.size
    params = mx.array([x.shape[1], out_rows, k, pairs, group_size], mx.int32)
    template = [("XT", x.dtype), *bank_template, ("NT", nt), ("RPL", rpl), ("THREADS", THREADS),
                ("CHUNK", CHUNK), ("GLU", glu), ("YT", out_dtype)]
    (y,) = runner.kernel(SPEC)(
        inputs=[x, order, sorted_experts, weights, *bank_inputs, params], template=template,
        grid=(THREADS, -(-out_rows // (rpl * THREADS)), pairs), threadgroup=(THREADS, 1, 1),
        output_shapes=[(pairs, out_rows)], output_dtypes=[out_dtype])
    return y


def expert_decode_metal(runner, x, indices, weights, gate_up, down) -> mx.array:
    """expert_glu for T <= MAX_TOKENS tokens (see gather_experts.expert_glu_mlx for the semantics)."""
    T, K = indices.shape
    H = x.shape[1]
    inter = gate_up.out_dim // 2
    flat = indices.reshape(-1).astype(mx.int32)
    order = mx.argsort(flat).astype(mx.int32)
    sorted_experts = flat[order]
    w = weights.reshape(-1).astype(mx.float32)
    h = launch(runner, x, order, sorted_experts, w, gate_up, inter, K, True, x.dtype)
    y = launch(runner, h, order, sorted_experts, w, down, H, K, False, mx.float32)
    return y.reshape(T, K, H).sum(axis=1).astype(x.dtype)


def minimum_bytes(indices, *banks) -> int:
    """Bytes expert decode must read at least: each selected expert's packed weights, scales and biases once."""
    experts = len(set(mx.array(indices).reshape(-1).tolist()))
    per_expert = 0
    for bank in banks:
        arrays = [bank.weight] + ([bank.scales, bank.biases] if bank.quantized else [])
        per_expert += sum(a.nbytes // a.shape[0] for a in arrays)
    return experts * per_expert


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def kernel_class(x: mx.array, bank: ExpertBank) -> KernelClass:
    """Calls that share a verdict: same input dtype and bank storage (bits, group size, scales dtype)."""
    if bank.quantized:
        storage = (("bits", bank.bits), ("group_size", bank.group_size), ("scales", _dtype_name(bank.scales.dtype)))
    else:
        storage = (("weights", _dtype_name(bank.weight.dtype)),)
    return KernelClass("expert_decode", (("dtype", _dtype_name(x.dtype)), *storage), _SOURCE_HASH)


def _float32(bank: ExpertBank) -> ExpertBank:
    """The same bank computing in float32 (the packed weights shared; scales, biases or weights upcast)."""
    if not bank.quantized:
        return ExpertBank(bank.weight.astype(mx.float32))
    return ExpertBank(bank.weight, bank.scales.astype(mx.float32), bank.biases.astype(mx.float32), bits=bank.bits,
                      group_size=bank.group_size)


def _like(bank: ExpertBank, experts: int, out_dim: int, in_dim: int, key) -> ExpertBank:
    """A random bank stored like `bank`, of another shape."""
    w = mx.random.normal((experts, out_dim, in_dim), key=key) * in_dim**-0.5
    if not bank.quantized:
        return ExpertBank(w.astype(bank.weight.dtype))
    q, scales, biases = mx.quantize(w, group_size=bank.group_size, bits=bank.bits)
    dtype = bank.scales.dtype
    return ExpertBank(q, scales.astype(dtype), biases.astype(dtype), bits=bank.bits, group_size=bank.group_size)


def _routing(tokens: int, top_k: int, experts: int, key):
    """Distinct top-k experts per token and positive weights summing to 1, like the router's."""
    scores = mx.random.uniform(shape=(tokens, experts), key=key)
    indices = mx.argsort(scores, axis=-1)[:, :top_k].astype(mx.int32)
    weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1), axis=-1)
    return indices, weights


def check(runner, x: mx.array, top_k: int, gate_up: ExpertBank, down: ExpertBank) -> Check:
    """The self-check of `kernel_class(x, gate_up)`: agreement with the float32 MLX path on a small bank stored
    the same way (CHECK_DIMS), then one decode step (one token, top_k experts) timed on the model's own banks."""
    d = CHECK_DIMS
    keys = mx.random.split(mx.random.key(0), 5)
    small_gu = _like(gate_up, d["experts"], 2 * d["inter"], d["hidden"], keys[0])
    small_dn = _like(down, d["experts"], d["hidden"], d["inter"], keys[1])
    small_x = mx.random.normal((d["tokens"], d["hidden"]), key=keys[2]).astype(x.dtype)
    small = (small_x, *_routing(d["tokens"], d["top_k"], d["experts"], keys[3]), small_gu, small_dn)

    def real():
        xr = mx.random.normal((1, x.shape[1]), key=keys[4]).astype(x.dtype)
        args = (xr, *_routing(1, top_k, gate_up.num_experts, keys[4]), gate_up, down)
        return lambda: expert_decode_metal(runner, *args), lambda: expert_glu_mlx(*args)

    def reference():
        x, indices, weights, gu, dn = small
        return expert_glu_mlx(x.astype(mx.float32), indices, weights, _float32(gu), _float32(dn))

    return Check(lambda: expert_decode_metal(runner, *small), reference, real, x.dtype)

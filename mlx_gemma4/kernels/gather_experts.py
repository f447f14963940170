"""Top-k expert GeGLU for the 26B A4B MoE: out[t] = sum_k w[t,k] * down[e] @ (gelu(gate[e] @ x[t]) * (up[e] @ x[t])).

Semantics follow transformers' `Gemma4TextExperts.forward` (modeling_gemma4.py): `gate_up_proj[e]` is (2I, H)
with gate rows [:I] and up rows [I:], activation gelu with the tanh approximation, `down_proj[e]` is (H, I), and
each expert's output is scaled by its routing weight before the per-token sum.

The MLX path (`expert_glu_mlx`): few tokens take `gather_mm`/`gather_qmm` straight on the (T, K) indices; many
tokens have their (token, slot) pairs sorted by expert so the gathered matmuls run over contiguous expert
segments (`sorted_indices=True`), then the pairs are put back in token order and summed. On the CPU backend many
tokens take `expert_glu_segments` instead: one BLAS matmul per expert segment. The Metal decode kernels
(`expert_decode.py`) must agree with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .products import compact_matmul, quant_params_problem, quantized_matmul

SORT_MIN_PAIRS = 64  # the MLX path sorts (token, slot) pairs by expert from this many pairs on


@dataclass
class ExpertBank:
    """One stacked expert matrix in Hugging Face layout (E, out, in), read in place.

    weight: float (E, out, in), or uint32 (E, out, in * bits // 32) packed by `mx.quantize` in `mode`, in which
    case scales are (E, out, in // group_size) and biases (affine mode only) the same."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"

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
            problem = quant_params_problem(self.group_size, self.bits, self.mode)
            if problem:
                raise ValueError(f"{what}: {problem}")
            if self.weight.dtype != mx.uint32:
                raise ValueError(f"{what}: quantized weight must be uint32, got {self.weight.dtype}")
            affine = self.mode == "affine"
            if self.scales is None or (self.biases is None) == affine:
                raise ValueError(f"{what}: {self.mode} quantized weight needs scales" +
                                 (" and biases" if affine else " and no biases"))
            want = (*self.weight.shape[:2], self.in_dim // self.group_size)
            if tuple(self.scales.shape) != want or (affine and tuple(self.biases.shape) != want):
                raise ValueError(f"{what}: scales/biases must have shape {want}, got {self.scales.shape}"
                                 + (f" and {self.biases.shape}" if affine else ""))
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
                             group_size=bank.group_size, bits=bank.bits, mode=bank.mode,
                             sorted_indices=sorted_indices)
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
        biases = None if bank.biases is None else bank.biases[e]
        return quantized_matmul(x, bank.weight[e], bank.scales[e], biases, bank.group_size, bank.bits, bank.mode)
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

"""MLX's affine quantization with each group's scale and bias fitted to minimize the squared error.

MLX stores a quantized matrix as `bits`-bit codes q (a little-endian bit stream packed into uint32 words) and, per
group of `group_size` consecutive inputs of a row, a scale s and a bias b: w ≈ s·q + b, q in [0, 2^bits - 1].
`mx.quantize` takes s and b from the group's minimum and maximum. Here they minimize

    err(s, b) = Σ_i a_i (w_i - s·q_i - b)²      q_i = clip(round((w_i - b) / s), 0, 2^bits - 1)

where a_i is an optional importance per input column (the mean square of the activations that multiply it, from a
calibration set: then the error is the expected squared error of the layer's output, for uncorrelated inputs).
For fixed codes the best (s, b) is a 2x2 weighted least-squares solution; the search tries a grid of step sizes
(anchored at the group's minimum: fewer levels than 2^bits recover a coarser grid exactly, more clip the top),
solves the least squares for each, keeps the best per group, then alternates rounding and least squares a few
times. Everything is elementwise or a per-group sum, vectorized over the whole matrix in MLX.

The output is exactly what `mx.quantize` returns (packed codes, scales, biases), so checkpoints stay loadable by
anything that reads MLX's affine format (mlx-lm, mlx-vlm).
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

# Candidate step sizes, as multiples of the min/max step (max - min) / (2^bits - 1), for each bit width: the
# reciprocals of n/(2^bits - 1) for n levels from 2^bits - 1 down (so a group that uses only n levels of some
# coarser grid is recovered exactly), and a few steps finer than min/max (clipping the group's largest values).
def _step_multipliers(bits: int, levels_down: int, clip_steps: int) -> tuple[float, ...]:
    nmax = (1 << bits) - 1
    coarser = [nmax / (nmax - k) for k in range(0, min(levels_down, nmax - 1) + 1)]
    finer = [1.0 - 0.035 * (k + 1) for k in range(clip_steps)]
    return tuple(sorted(set(coarser + finer)))


SEARCH = {  # bits -> (coarser grids, clipping steps): 4 bits tries 15/14 and two clipped steps besides min/max
    2: (1, 2), 3: (1, 2), 4: (1, 2), 5: (2, 1), 6: (2, 1), 8: (2, 0),
}
REFINE_STEPS = 2  # rounding / least-squares alternations after the grid search


def _wsum(a, x):
    """Σ a·x over each group (a None: unweighted)."""
    return (x if a is None else a * x).sum(-1)


def _least_squares(w, a, q, Sa, Saw, Saww):
    """Best (s, b) for fixed codes q, and the error they leave. Sums over the last axis (one group)."""
    aq = q if a is None else a * q
    Saq, Saqq, Saqw = aq.sum(-1), (aq * q).sum(-1), (aq * w).sum(-1)
    det = Sa * Saqq - Saq * Saq
    ok = det > 1e-12 * (Sa * Saqq + 1e-30)
    det = mx.where(ok, det, 1.0)
    s = mx.where(ok, (Sa * Saqw - Saq * Saw) / det, 0.0)
    b = mx.where(ok, (Saqq * Saw - Saq * Saqw) / det, Saw / Sa)
    err = Saww - 2 * s * Saqw - 2 * b * Saw + s * s * Saqq + 2 * s * b * Saq + b * b * Sa
    return s, b, mx.maximum(err, 0.0)


def codes(w, s, b, nmax):
    safe = mx.where(s == 0, 1.0, s)
    return mx.clip(mx.round((w - b[..., None]) * (1.0 / safe)[..., None]), 0, nmax)


@lru_cache(maxsize=None)
def _fitter(bits: int, weighted: bool):
    nmax = (1 << bits) - 1
    multipliers = _step_multipliers(bits, *SEARCH.get(bits, (2, 2)))

    def fit(w, a):
        # w: (..., groups, group_size) float32; a: importance broadcastable to w (unused when not weighted)
        a = a if weighted else None
        lo, hi = w.min(-1), w.max(-1)
        step = (hi - lo) / nmax
        # 1) grid search: each candidate step anchored at the group's minimum, scored as it is
        best_s, best_b, best_err = None, lo, None
        for m in multipliers:
            s = step * m
            r = w - codes(w, s, lo, nmax) * s[..., None] - lo[..., None]
            err = _wsum(a, r * r)
            if best_err is None:
                best_s, best_err = s, err
            else:
                better = err < best_err
                best_s, best_err = mx.where(better, s, best_s), mx.where(better, err, best_err)
        # 2) least squares for the chosen codes, then alternate rounding and least squares
        Sa = mx.full(lo.shape, w.shape[-1], mx.float32) if a is None else _wsum(a, mx.ones_like(w))
        Saw, Saww = _wsum(a, w), _wsum(a, w * w)
        for _ in range(REFINE_STEPS):
            s, b, err = _least_squares(w, a, codes(w, best_s, best_b, nmax), Sa, Saw, Saww)
            better = err < best_err
            best_s, best_b = mx.where(better, s, best_s), mx.where(better, b, best_b)
            best_err = mx.where(better, err, best_err)
        # a group whose values are all equal: any scale dequantizes it exactly; keep a non-zero one
        best_s = mx.where(best_s == 0, mx.maximum(step, 1e-8), best_s)
        return best_s, best_b

    return mx.compile(fit)


def fit_scales(w: mx.array, bits: int, group_size: int, importance: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Per-group (scales, biases), float32, shape (..., in / group_size), minimizing the (weighted) error."""
    g = w.astype(mx.float32).reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    if importance is None:
        return _fitter(bits, False)(g, mx.zeros((1,), mx.float32))
    a = importance.astype(mx.float32)
    a = a + 1e-3 * a.mean(-1, keepdims=True) + 1e-20  # every weight counts a little
    a = a.reshape(*a.shape[:-1], a.shape[-1] // group_size, group_size)
    return _fitter(bits, True)(g, a)


def pack(q: mx.array, bits: int) -> mx.array:
    """Codes (..., n) in [0, 2^bits) -> MLX's packed uint32 layout (a little-endian bit stream per row)."""
    q = q.astype(mx.uint32)
    n = q.shape[-1]
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        return (q.reshape(*q.shape[:-1], n // per_word, per_word) << shifts).sum(-1).astype(mx.uint32)
    block_bits = bits * 32 // math.gcd(bits, 32)  # lcm(bits, 32): whole elements in whole words
    per_block, words = block_bits // bits, block_bits // 32
    blocks = q.reshape(*q.shape[:-1], n // per_block, per_block)
    out = [mx.zeros(blocks.shape[:-1], mx.uint32) for _ in range(words)]
    for i in range(per_block):
        word, shift = divmod(i * bits, 32)
        out[word] = out[word] | (blocks[..., i] << shift)
        if shift + bits > 32:
            out[word + 1] = out[word + 1] | (blocks[..., i] >> (32 - shift))
    return mx.stack(out, axis=-1).reshape(*q.shape[:-1], n * bits // 32)


CHUNK_ELEMENTS = 1 << 22  # weights fitted per evaluated piece: the search's float32 temporaries stay ~100 MB


def _row_chunks(w: mx.array, importance: mx.array | None):
    """(rows of w, their importance) in pieces of about CHUNK_ELEMENTS, walking leading axes (experts) first;
    importance broadcasts against w (its leading axes 1 or w's)."""
    if w.ndim > 2:
        for i in range(w.shape[0]):
            a = importance if importance is None or importance.ndim < w.ndim or importance.shape[0] == 1 \
                else importance[i]
            yield from _row_chunks(w[i], a if a is None or a.ndim < w.ndim else a[0])
        return
    step = max(1, CHUNK_ELEMENTS // w.shape[-1])
    for start in range(0, w.shape[0], step):
        yield w[start:start + step], importance


def _stacked(pieces: list[mx.array], shape: tuple[int, ...]) -> mx.array:
    return mx.concatenate(pieces, axis=0).reshape(*shape[:-1], -1)


def quantize(w: mx.array, group_size: int = 64, bits: int = 4, importance: mx.array | None = None,
             dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Drop-in for `mx.quantize(w, group_size, bits)` (affine mode) with fitted scales and biases.

    importance: optional (..., in) weights per input column (broadcast over rows); dtype: of the returned scales
    and biases (default w's); the codes are rounded against the stored (rounded) scales and biases. Large
    matrices are fitted a piece of rows at a time (each piece evaluated before the next)."""
    if w.ndim < 2 or w.shape[-1] % group_size:
        raise ValueError(f"cannot quantize a {tuple(w.shape)} matrix with group size {group_size}: the last "
                         "dimension must be a multiple of it")
    if importance is not None and importance.shape[-1] != w.shape[-1]:
        raise ValueError(f"importance has {importance.shape[-1]} columns, the matrix {w.shape[-1]}")
    dtype = dtype or w.dtype
    packed, all_scales, all_biases = [], [], []
    for rows, a in _row_chunks(w, importance):
        scales, biases = fit_scales(rows, bits, group_size, a)
        scales, biases = scales.astype(dtype), biases.astype(dtype)
        g = rows.astype(mx.float32).reshape(*scales.shape, group_size)
        q = codes(g, scales.astype(mx.float32), biases.astype(mx.float32), (1 << bits) - 1)
        piece = (pack(q.reshape(rows.shape), bits), scales, biases)
        mx.eval(piece)
        for out, x in zip((packed, all_scales, all_biases), piece):
            out.append(x)
    return tuple(_stacked(x, w.shape) for x in (packed, all_scales, all_biases))


def fake_quantize(w: mx.array, group_size: int, bits: int, importance: mx.array | None = None) -> mx.array:
    """What `quantize` would store, dequantized back to a float32 matrix of w's shape."""
    pieces = []
    for rows, a in _row_chunks(w, importance):
        scales, biases = fit_scales(rows, bits, group_size, a)
        g = rows.astype(mx.float32).reshape(*scales.shape, group_size)
        pieces.append((codes(g, scales, biases, (1 << bits) - 1) * scales[..., None] + biases[..., None])
                      .reshape(rows.shape))
        mx.eval(pieces[-1])
    return _stacked(pieces, w.shape)

"""Windowed attention: the Metal decode kernel (msim emulator, race checks + guards) and the blockwise MLX path,
against a float64 numpy reference with transformers' sliding + bidirectional-vision mask."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.kernels import attention_plan, use_backend, windowed_attention
from mlx_gemma4.kernels import decode_attention as da
from mlx_gemma4.kernels import sliding_attention as sa
from mlx_gemma4.kernels.verdicts import TOLERANCE


def visible(L, S, q_start, k_start, window, ids):
    qp = q_start + np.arange(L)[:, None]
    kp = k_start + np.arange(S)[None, :]
    vis = kp <= qp
    if ids is not None:
        q_ids = ids[q_start - k_start + np.arange(L)][:, None]
        vis = vis | ((q_ids == ids[None, :]) & (q_ids >= 0))
    if window is not None:
        vis = vis & (qp - kp < window)
    return vis


def reference(q, k, v, scale, q_start, k_start, window, ids):
    """float64 numpy attention with GQA and the dense mask."""
    L, S = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    s = np.einsum("bhld,bhsd->bhls", q, k) * scale
    s = np.where(visible(L, S, q_start, k_start, window, ids), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhls,bhsd->bhld", p / p.sum(-1, keepdims=True), v)


def image_ids(S, runs):
    ids = -np.ones(S, np.int32)
    for n, (a, b) in enumerate(runs):
        ids[a:b] = n
    return ids


def make_qkv(rng, B, Hq, Hkv, L, S, D, dtype, capacity=None):
    """q (B, Hq, L, D) and k, v (B, Hkv, S, D); with `capacity`, k and v are views of the first S positions of
    (B, Hkv, capacity, D) buffers, as a KV cache hands them out."""
    def arr(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    if capacity is None:
        return arr(B, Hq, L, D), arr(B, Hkv, S, D), arr(B, Hkv, S, D)
    return arr(B, Hq, L, D), arr(B, Hkv, capacity, D)[:, :, :S], arr(B, Hkv, capacity, D)[:, :, :S]


def f64(a):
    return np.array(a.astype(mx.float32), np.float64)


# name, (Hq, Hkv), D, dtype, L, S, q_start, k_start, window, image runs (key indices), keys per block (None: planned)
DECODE_CASES = [
    ("e2b-sliding-ring", (8, 1), 256, mx.float16, 1, 8, 40, 33, 8, None, None),
    ("e4b-global-split", (8, 2), 512, mx.bfloat16, 1, 30, 29, 0, None, None, 8),
    ("26b-sliding-3-queries-image", (16, 8), 256, mx.float32, 3, 12, 9, 0, 6, [(2, 11)], 8),
    ("31b-global-2-queries", (32, 4), 512, mx.float32, 2, 7, 5, 0, None, None, None),
    ("8-queries-2-row-groups", (8, 1), 32, mx.float32, 8, 40, 32, 0, None, None, 32),
    ("window-cuts-blocks", (4, 2), 64, mx.float32, 4, 50, 146, 100, 9, None, 4),
    ("first-step-one-key", (4, 2), 64, mx.float32, 1, 1, 0, 0, None, None, None),
    ("window-1-sees-itself", (4, 1), 64, mx.float16, 2, 10, 8, 0, 1, None, 4),
    ("8-queries-at-the-limit", (16, 8), 256, mx.bfloat16, 8, 8, 0, 0, 4, [(3, 7)], None),
]
# prefill (more than MAX_QUERIES queries) takes the MLX path whatever the backend
PREFILL_CASES = [
    ("e2b-sliding-prefill", (8, 1), 256, mx.float32, 21, 21, 0, 0, 8, None),
    ("26b-sliding-images", (16, 8), 256, mx.float16, 17, 23, 6, 0, 5, [(8, 15), (18, 21)]),
    ("31b-global-prefill", (32, 4), 512, mx.bfloat16, 9, 9, 0, 0, None, None),
]
# mx.fast.scaled_dot_product_attention on the CPU keeps scores and the weighted sum in the input dtype
TOL_MLX = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 3e-2}


def _check_against_float64(q, k, v, out, kw, ids, tol):
    ref = reference(f64(q), f64(k), f64(v), kw["scale"], kw["q_start"], kw["k_start"], kw["window"], ids)
    assert out.dtype == q.dtype and out.shape == q.shape
    err = np.abs(f64(out) - ref).max() / np.abs(ref).max()
    assert err < tol, f"max rel error {err:.2e}"


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_kernel_matches_float64(case, metal_emulator):
    """Strided K/V (a cache's view of its buffer), split-K with several blocks and one, up to 8 queries (two
    row groups), windows that start inside a block, image blocks."""
    name, (Hq, Hkv), D, dtype, L, S, q_start, k_start, window, runs, block_keys = case
    rng = np.random.default_rng(len(name) * 31 + L)
    q, k, v = make_qkv(rng, 1, Hq, Hkv, L, S, D, dtype, capacity=S + 5)
    ids = image_ids(S, runs) if runs else None
    kw = dict(scale=D**-0.5, q_start=q_start, k_start=k_start, window=window)
    with metal_emulator() as runner:
        out = da.decode_attention_metal(runner, q, k, v, **kw, block_ids=mx.array(ids) if runs else None,
                                        block_keys=block_keys)
    used = da.plan(1, Hq, Hkv, L, S, D, dtype, offset=q_start - k_start, window=window, has_blocks=runs is not None,
                   block_keys=block_keys)
    assert runner.compiled == ({da.PASS1_SPLIT.name, da.PASS2.name} if used.blocks > 1 else {da.PASS1_SINGLE.name})
    _check_against_float64(q, k, v, out, kw, ids, TOLERANCE[dtype])


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_takes_the_mlx_path(case, metal_emulator):
    name, (Hq, Hkv), D, dtype, L, S, q_start, k_start, window, runs = case
    rng = np.random.default_rng(len(name) * 31 + L)
    q, k, v = make_qkv(rng, 1, Hq, Hkv, L, S, D, dtype)
    ids = image_ids(S, runs) if runs else None
    kw = dict(scale=D**-0.5, q_start=q_start, k_start=k_start, window=window)
    with metal_emulator() as runner:
        out = windowed_attention(q, k, v, **kw, block_ids=mx.array(ids) if runs else None)
    assert not runner.compiled
    _check_against_float64(q, k, v, out, kw, ids, TOL_MLX[dtype])


def test_batch_and_tiny_head_dim(metal_emulator):
    """Batch > 1 and head dims that are not multiples of 32 (the tiny test checkpoints use 16 and 32), through the
    dispatcher (forced Metal) and the MLX path."""
    rng = np.random.default_rng(5)
    for D, L in ((16, 1), (48, 2)):
        q, k, v = make_qkv(rng, 2, 4, 2, L, 14, D, mx.float32)
        kw = dict(scale=0.3, q_start=14 - L, k_start=0, window=5)
        ref = reference(f64(q), f64(k), f64(v), 0.3, 14 - L, 0, 5, None)
        with metal_emulator() as runner:
            np.testing.assert_allclose(f64(windowed_attention(q, k, v, **kw)), ref, atol=1e-5)
        assert runner.compiled
        with use_backend("mlx"):
            np.testing.assert_allclose(f64(windowed_attention(q, k, v, **kw)), ref, atol=1e-5)


def test_decode_plan_splits_long_contexts_and_bounds_partials():
    """32K keys of one KV head with 8 query heads: >= 160 threadgroups, each block at least 20 keys per query
    row (the partials pass 2 reads stay under 1/20 of the K/V bytes); a short cache is one block."""
    p = da.plan(1, 8, 1, 1, 32768, 512, mx.bfloat16, offset=32767, window=None, has_blocks=False)
    assert p.threadgroups(1, 1) >= 160 and p.block_keys >= 20 * 8
    assert p.blocks * p.block_keys >= 32768 > (p.blocks - 1) * p.block_keys
    assert da.plan(1, 8, 1, 1, 100, 256, mx.bfloat16, offset=99, window=None, has_blocks=False).blocks == 1
    sliding = da.plan(1, 16, 8, 1, 5000, 256, mx.bfloat16, offset=4999, window=1024, has_blocks=False)
    assert (sliding.key_lo, sliding.key_hi) == (5000 - 1024, 5000)


@pytest.mark.parametrize("window,runs,q_start", [(64, None, 0), (100, [(200, 300), (310, 320)], 0),
                                                 (None, None, 0), (40, [(5, 50)], 37)])
def test_mlx_blockwise_equals_dense_masked(window, runs, q_start):
    rng = np.random.default_rng(11)
    S = 400
    L = S - q_start
    q, k, v = make_qkv(rng, 1, 4, 2, L, S, 32, mx.float32)
    ids = mx.array(image_ids(S, runs)) if runs else None
    kw = dict(scale=0.2, q_start=q_start, k_start=0, window=window, block_ids=ids)
    blockwise = sa.windowed_attention_mlx(q, k, v, block_q=64, **kw)
    dense = sa.dense_attention_mlx(q, k, v, **kw)
    np.testing.assert_allclose(np.array(blockwise), np.array(dense), atol=2e-6)
    ref = reference(f64(q), f64(k), f64(v), 0.2, q_start, 0, window, None if ids is None else np.array(ids))
    np.testing.assert_allclose(np.array(blockwise), ref, atol=1e-5)


def test_attention_plan_is_minimal_and_linear_in_window():
    """Each query block's key range is exactly the span of keys its queries can see: O(n * w) keys in all."""
    L = S = 2048
    window, block_q = 128, 64
    ids = image_ids(S, [(1000, 1280)])
    plan = attention_plan(L, S, 0, 0, window, ids, block_q=block_q)
    vis = visible(L, S, 0, 0, window, ids)
    for b in plan:
        cols = np.flatnonzero(vis[b.q0:b.q1].any(0))
        assert (b.k0, b.k1) == (cols.min(), cols.max() + 1)
    visited = sum((b.q1 - b.q0) * (b.k1 - b.k0) for b in plan)
    assert visited < L * (block_q + window + 280)  # 280: the image lets queries see ahead
    assert visited < 0.2 * L * S


def test_bad_inputs_raise_clear_errors():
    q, k, v = mx.zeros((1, 3, 4, 16)), mx.zeros((1, 2, 4, 16)), mx.zeros((1, 2, 4, 16))
    kw = dict(scale=1.0, q_start=0, k_start=0, window=None)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        windowed_attention(q, k, v, **kw)
    q = mx.zeros((1, 4, 4, 16))
    with pytest.raises(ValueError, match="must lie inside"):
        windowed_attention(q, k, v, scale=1.0, q_start=2, k_start=0, window=None)
    with pytest.raises(ValueError, match="block_ids must have shape"):
        windowed_attention(q, k, v, **dict(kw, block_ids=mx.zeros((3,), mx.int32)))
    with use_backend("mlx"), pytest.raises(ValueError, match="two separate runs"):
        windowed_attention(q, k, v, **dict(kw, block_ids=mx.array([0, -1, 0, -1], mx.int32)))
    with pytest.raises(ValueError, match="window must be"):
        windowed_attention(q, k, v, **dict(kw, window=0))
    with pytest.raises(ValueError, match="4-D"):
        windowed_attention(q[0], k, v, **kw)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        windowed_attention(q, k, v[:, :, :3], **kw)


def test_race_check_catches_a_missing_barrier(metal_emulator):
    """Dropping the barrier that keeps the next K/V tile from overwriting the one still being read must be caught
    by the forward/reverse schedule comparison (so the race checks on the real bodies are not vacuous)."""
    import dataclasses

    import msim

    body = da.PASS1_SPLIT.source
    tail = "      m[j] = m_new;\n    }\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }"
    assert body.count(tail) == 1
    broken = dataclasses.replace(da.PASS1_SPLIT, name="gemma4_decode_attention_racy",
                                 source=body.replace(tail, "      m[j] = m_new;\n    }\n  }"))
    rng = np.random.default_rng(2)
    q, k, v = make_qkv(rng, 1, 8, 1, 1, 64, 256, mx.float32)  # 8-key tiles: several per block

    class SwapSplit:
        """A runner that builds the broken body in place of the real pass 1."""

        def __init__(self, runner):
            self.runner = runner

        def kernel(self, spec):
            return self.runner.kernel(broken if spec.name == da.PASS1_SPLIT.name else spec)

    kw = dict(scale=0.2, q_start=63, k_start=0, window=None, block_keys=32)
    with metal_emulator() as runner:
        with pytest.raises(msim.OrderDependenceError, match="depends on the thread schedule"):
            da.decode_attention_metal(SwapSplit(runner), q, k, v, **kw)
        out = da.decode_attention_metal(runner, q, k, v, **kw)  # the intact body passes the same check
    np.testing.assert_allclose(f64(out), reference(f64(q), f64(k), f64(v), 0.2, 63, 0, None, None), atol=1e-5)


@pytest.mark.parametrize("window", [None, 8], ids=["growing", "sliding"])
def test_cache_views_reach_the_kernel_without_a_copy(window, metal_emulator):
    """The caches hand out the attended part of their buffer, a strided view (the growing cache: its filled
    part; the sliding one: the window's keys, starting inside its buffer): it reaches the kernel as it is
    (ensure_row_contiguous=False, so MLX does not copy K and V before every step) and the kernel reads it
    through its strides: only the visible keys' bytes."""
    from msim import counters

    from mlx_gemma4.cache import KVCache, RotatingKVCache

    rng = np.random.default_rng(4)
    B, Hq, Hkv, D, S = 1, 4, 2, 32, 30
    cache = KVCache() if window is None else RotatingKVCache(window)
    _, k0, v0 = make_qkv(rng, B, Hq, Hkv, 1, S - 1, D, mx.float32)
    cache.update(k0, v0)
    q, k1, v1 = make_qkv(rng, B, Hq, Hkv, 1, 1, D, mx.float32)
    keys, values, k_start = cache.update(k1, v1)
    capacity = cache.keys.shape[2]
    visible = S if window is None else window
    assert keys.shape[2] == visible < capacity and k_start == S - visible
    assert all(spec.ensure_row_contiguous is False for spec in (da.PASS1_SINGLE, da.PASS1_SPLIT))
    kw = dict(scale=D**-0.5, q_start=S - 1, k_start=k_start, window=window)
    with metal_emulator(check_order=False), counters.record() as launches:
        out = windowed_attention(q, keys, values, **kw)
    (launch,) = launches
    for name in ("k", "v"):
        shape, strides = launch.inputs[name]
        assert shape == (B, Hkv, visible, D) and strides == (Hkv * capacity * D, capacity * D, D, 1), name
        assert launch.buffers[name][0] == Hkv * visible * D * 4  # the visible keys once, not the buffer
    _check_against_float64(q, keys, values, out, kw, None, TOLERANCE[mx.float32])

"""Windowed attention: Metal prefill/decode bodies (msim emulator, race checks + guards) and the blockwise MLX
path, against a float64 numpy reference with transformers' sliding + bidirectional-vision mask."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.kernels import attention_plan, use_backend, windowed_attention
from mlx_gemma4.kernels import sliding_attention as sa



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


def make_qkv(rng, B, Hq, Hkv, L, S, D, dtype):
    def arr(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return arr(B, Hq, L, D), arr(B, Hkv, S, D), arr(B, Hkv, S, D)


def f64(a):
    return np.array(a.astype(mx.float32), np.float64)


# name, (Hq, Hkv), D, dtype, L, S, q_start, k_start, window, image runs (key indices)
CASES = [
    # prefill (L > DECODE_MAX_QUERIES): window smaller and larger than the sequence, ragged lengths
    ("e2b-sliding-prefill", (8, 1), 256, mx.float32, 21, 21, 0, 0, 8, None),
    ("e4b-sliding-window>seq", (8, 2), 256, mx.bfloat16, 19, 19, 0, 0, 512, None),
    ("26b-sliding-images", (16, 8), 256, mx.float16, 17, 23, 6, 0, 5, [(8, 15), (18, 21)]),
    ("26b-global-prefill", (16, 2), 512, mx.float32, 11, 13, 2, 0, None, None),
    ("31b-sliding-chunk", (32, 16), 256, mx.bfloat16, 10, 17, 107, 100, 6, [(3, 12)]),
    ("31b-global-prefill", (32, 4), 512, mx.float16, 9, 9, 0, 0, None, None),
    # decode (few queries): rotating window cache keys start at k_start > 0
    ("e2b-sliding-decode", (8, 1), 256, mx.float16, 1, 8, 40, 33, 8, None),
    ("e4b-global-decode", (8, 2), 512, mx.bfloat16, 1, 30, 29, 0, None, None),
    ("26b-sliding-decode3", (16, 8), 256, mx.float32, 3, 12, 9, 0, 6, [(2, 11)]),
    ("31b-global-decode2", (32, 4), 512, mx.float32, 2, 7, 5, 0, None, None),
]
TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}
# mx.fast.scaled_dot_product_attention on the CPU keeps scores and the weighted sum in the input dtype
TOL_MLX = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 3e-2}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_windowed_attention_metal_and_mlx_match_float64(case, metal_emulator):
    name, (Hq, Hkv), D, dtype, L, S, q_start, k_start, window, runs = case
    rng = np.random.default_rng(len(name) * 31 + L)
    q, k, v = make_qkv(rng, 1, Hq, Hkv, L, S, D, dtype)
    ids = image_ids(S, runs) if runs else None
    kw = dict(scale=D**-0.5, q_start=q_start, k_start=k_start, window=window,
              block_ids=mx.array(ids) if ids is not None else None)
    ref = reference(f64(q), f64(k), f64(v), D**-0.5, q_start, k_start, window, ids)
    with use_backend("mlx"):
        out_mlx = windowed_attention(q, k, v, **kw)
    with metal_emulator() as runner:
        out_metal = windowed_attention(q, k, v, **kw)
    assert out_metal.dtype == dtype and out_mlx.dtype == dtype and out_metal.shape == q.shape
    assert runner.compiled == {sa.DECODE.name if L <= sa.DECODE_MAX_QUERIES else sa.PREFILL.name}
    err_metal = np.abs(f64(out_metal) - ref).max()
    err_mlx = np.abs(f64(out_mlx) - ref).max()
    assert err_metal < TOL[dtype], f"Metal kernel error {err_metal:.2e}"
    assert err_mlx < TOL_MLX[dtype], f"MLX path error {err_mlx:.2e}"


def test_batch_and_tiny_head_dim(metal_emulator):
    """Batch > 1 and head dims that are not multiples of 32 (the tiny test checkpoints use 16 and 32)."""
    rng = np.random.default_rng(5)
    for D, L in ((16, 12), (48, 2)):
        q, k, v = make_qkv(rng, 2, 4, 2, L, 14, D, mx.float32)
        kw = dict(scale=0.3, q_start=2, k_start=0, window=5)
        ref = reference(f64(q), f64(k), f64(v), 0.3, 2, 0, 5, None)
        with metal_emulator():
            np.testing.assert_allclose(f64(windowed_attention(q, k, v, **kw)), ref, atol=1e-5)
        with use_backend("mlx"):
            np.testing.assert_allclose(f64(windowed_attention(q, k, v, **kw)), ref, atol=1e-5)


def test_prefill_visits_only_in_window_key_tiles(metal_emulator):
    """The Metal prefill visits exactly the key tiles holding a key some query of its block can see."""
    rng = np.random.default_rng(7)
    Hq, Hkv, L, S, D, window = 2, 1, 40, 40, 256, 6
    ids = image_ids(S, [(20, 31)])  # an image longer than the window: queries see later keys of it
    q, k, v = make_qkv(rng, 1, Hq, Hkv, L, S, D, mx.float32)
    with metal_emulator() as runner:
        out, tiles = sa.windowed_attention_metal(runner, q, k, v, scale=D**-0.5,
                                                 q_start=0, k_start=0, window=window, block_ids=mx.array(ids),
                                                 return_tiles=True)
    bk = sa.prefill_tile_keys(D, mx.float32)
    vis = visible(L, S, 0, 0, window, ids)
    expected = []
    for q0 in range(0, L, sa.PREFILL_BQ):
        keys = np.flatnonzero(vis[q0:q0 + sa.PREFILL_BQ].any(0))
        expected.append(len(np.unique(keys // bk)))
    tiles = np.array(tiles)
    assert tiles.shape == (Hq, -(-L // sa.PREFILL_BQ))
    assert (tiles == np.array(expected)[None]).all(), (tiles, expected)
    assert tiles.sum() < Hq * tiles.shape[1] * -(-S // bk) / 2  # far fewer than all tiles
    ref = reference(f64(q), f64(k), f64(v), D**-0.5, 0, 0, window, ids)
    np.testing.assert_allclose(f64(out), ref, atol=1e-5)


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
    """Dropping the barrier that protects the K/V tiles from the next tile's load must be caught by the
    forward/reverse schedule comparison (so the race checks on the real bodies are not vacuous)."""
    import dataclasses

    import msim

    body = sa.PREFILL.source
    tail = "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    tiles++;"
    assert body.count(tail) == 1
    broken = dataclasses.replace(sa.PREFILL, name="gemma4_window_attention_prefill_racy",
                                 source=body.replace(tail, "    tiles++;"))
    rng = np.random.default_rng(2)
    q, k, v = make_qkv(rng, 1, 2, 1, 16, 16, 256, mx.float32)  # BK = 8: two key tiles
    class SwapPrefill:
        """A runner that builds the broken body in place of the real prefill kernel."""

        def __init__(self, runner):
            self.runner = runner

        def kernel(self, spec):
            return self.runner.kernel(broken if spec.name == sa.PREFILL.name else spec)

    with metal_emulator() as runner:
        with pytest.raises(msim.OrderDependenceError, match="depends on the thread schedule"):
            sa.windowed_attention_metal(SwapPrefill(runner), q, k, v, scale=0.2, q_start=0, k_start=0, window=None)
        # the intact body on the same inputs passes the same check
        out = sa.windowed_attention_metal(runner, q, k, v, scale=0.2, q_start=0, k_start=0, window=None)
    np.testing.assert_allclose(f64(out), reference(f64(q), f64(k), f64(v), 0.2, 0, 0, None, None), atol=1e-5)

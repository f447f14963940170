"""The model on its caches: decoding after a rollback equals a full forward; on mlx-lm's batch caches, several
sequences of different lengths in one batch (left padding, per-row positions, masks from the caches, sliding
windows wrapping at different steps, KV-shared layers) give each sequence's logits as it gets them alone
(float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_gemma4.config import SLIDING

VARIANTS = ["e2b", "26b"]  # PLE + KV sharing + 4:1 pattern; MoE + k=v + own global head dim
TOL = 1e-4


def prompts(window: int) -> list[list[int]]:
    """Lengths below, near and several times past the window."""
    rng = np.random.default_rng(0)
    return [rng.integers(3, 500, n).tolist() for n in (3, window - 1, window + 2, 3 * window + 5)]


def solo(model, ids: list[int], feed: list[int]) -> list[np.ndarray]:
    """Logits of the last prompt position, then of each fed token, on the model's own caches."""
    cache = model.make_cache()
    out = [np.array(model(mx.array([ids]), cache=cache)[0, -1])]
    for t in feed:
        out.append(np.array(model(mx.array([[t]]), cache=cache)[0, -1]))
    return out


def assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_caches_decode_each_row_as_alone(text_model, variant):
    """Prefill alone on our caches, merge into mlx-lm's batch caches, decode together past every window."""
    m = text_model(variant)
    window = m.config.text.sliding_window
    seqs = prompts(window)
    steps = 2 * window + 3
    feeds = [np.random.default_rng(i + 1).integers(3, 500, steps).tolist() for i in range(len(seqs))]
    want = [solo(m, ids, feed) for ids, feed in zip(seqs, feeds)]

    per_seq = []
    for ids in seqs:
        cache = m.make_cache()
        m(mx.array([ids]), cache=cache)
        per_seq.append(cache)
    # one sequence's caches as mlx-lm's prompt-cache loader rebuilds them (mlx-lm's classes): they merge too
    per_seq[1] = [getattr(mlx_cache, type(c).__name__).from_state(c.state) for c in per_seq[1]]
    batch = [per_seq[0][i].merge([c[i] for c in per_seq]) for i in range(len(per_seq[0]))]
    kinds = {type(c) for c in batch}
    assert kinds == {mlx_cache.BatchKVCache, mlx_cache.BatchRotatingKVCache}
    for s in range(steps):
        logits = np.array(m(mx.array([[f[s]] for f in feeds]), cache=batch)[:, -1])
        for row in range(len(seqs)):
            assert_close(logits[row], want[row][s + 1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_prefill_and_decode(text_model, variant):
    """A batch prefilled together from empty batch caches (left padding, masks with padding and windows)."""
    m = text_model(variant)
    cfg = m.config.text
    seqs = prompts(cfg.sliding_window)[:3]
    feed = [5, 9, 11, 13]
    want = [solo(m, ids, feed) for ids in seqs]
    longest = max(map(len, seqs))
    padding = [longest - len(s) for s in seqs]
    batch = [mlx_cache.BatchRotatingKVCache(cfg.sliding_window, padding) if t == SLIDING
             else mlx_cache.BatchKVCache(padding) for t in cfg.layer_types[: cfg.first_kv_shared_layer]]
    ids = mx.array([[0] * p + s for p, s in zip(padding, seqs)])
    logits = np.array(m(ids, cache=batch)[:, -1])
    for row in range(len(seqs)):
        assert_close(logits[row], want[row][0])
    for s, t in enumerate(feed):
        logits = np.array(m(mx.array([[t]] * len(seqs)), cache=batch)[:, -1])
        for row in range(len(seqs)):
            assert_close(logits[row], want[row][s + 1])


def test_last_only_on_the_mask_path(text_model):
    m = text_model("e2b")
    window = m.config.text.sliding_window
    ids = prompts(window)[3]
    cache = [c.to_mlx_lm() if hasattr(c, "to_mlx_lm") else mlx_cache.KVCache() for c in m.make_cache()]
    last = m(mx.array([ids]), cache=cache, last_only=True)
    assert last.shape[1] == 1
    assert_close(np.array(last[0, -1]), solo(m, ids, [])[0])


def test_image_prompts_need_our_caches(text_model):
    m = text_model("26b")
    cache = [mlx_cache.KVCache() for _ in m.make_cache()]
    with pytest.raises(ValueError, match="own caches"):
        m(mx.array([[5, 6, 7]]), cache=cache, block_ids=mx.array([-1, 0, 0], dtype=mx.int32))


def test_quantized_mlx_lm_caches_are_refused(text_model):
    m = text_model("e2b")
    cache = [mlx_cache.QuantizedKVCache() for _ in m.make_cache()]
    with pytest.raises(ValueError, match="kv_bits"):
        m(mx.array([[5, 6, 7]]), cache=cache)


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_decode_after_rollback_equals_a_full_forward(text_model, variant):
    """A speculative-decoding pattern: verify k+1 drafted tokens in one forward, roll back the rejected ones,
    continue. Rollbacks land before and after the sliding window's wrap."""
    m = text_model(variant)
    rng = np.random.default_rng(4)
    window = m.config.text.sliding_window
    kept = rng.integers(3, 500, 5).tolist()
    cache = m.make_cache()
    m(mx.array([kept]), cache=cache)
    while len(kept) < 4 * window:
        drafted = rng.integers(3, 500, int(rng.integers(1, 6))).tolist()
        m(mx.array([drafted]), cache=cache)
        accepted = int(rng.integers(0, len(drafted) + 1))
        for c in cache:
            c.trim(len(drafted) - accepted)
        kept += drafted[:accepted]
        assert all(c.offset == len(kept) for c in cache)
    probe = [7, 11]
    after_trims = m(mx.array([probe]), cache=cache)
    full = m(mx.array([kept + probe]))[:, -len(probe):]
    np.testing.assert_allclose(np.array(after_trims), np.array(full), rtol=1e-4, atol=1e-4)

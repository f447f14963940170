"""KV caches: the sliding-window cache against a plain list of every entry (wrap-around, compaction, exact
rollback), state round trips and masks against mlx-lm's classes. The model on these caches: test_model_caches.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_gemma4.cache import KVCache, RotatingKVCache

WINDOW, ROLLBACK = 12, 2  # room = window // 4 = 3: writes of 1-3 go in place, longer ones are wide
B, H, D = 2, 2, 4


def entries(rng, n):
    return rng.standard_normal((B, H, n, D)).astype(np.float32)


class Reference:
    """Every entry ever written, as a list; what a sliding cache must return is a slice of it."""

    def __init__(self):
        self.keys = np.zeros((B, H, 0, D), np.float32)

    def update(self, new):
        self.keys = np.concatenate([self.keys, new], axis=2)
        end = self.keys.shape[2]
        first = max(0, end - new.shape[2] - (WINDOW - 1))
        return self.keys[:, :, first:], first

    def trim(self, n):
        self.keys = self.keys[:, :, : self.keys.shape[2] - n]


def check_update(cache, ref, new):
    keys, values, k_start = cache.update(mx.array(new), mx.array(-new))
    want, first = ref.update(new)
    assert k_start == first and cache.offset == ref.keys.shape[2]
    np.testing.assert_array_equal(np.array(keys), want)
    np.testing.assert_array_equal(np.array(values), -want)


def test_sliding_cache_returns_the_window_before_each_update_across_wraps_and_compactions():
    rng = np.random.default_rng(0)
    cache, ref = RotatingKVCache(WINDOW, rollback=ROLLBACK), Reference()
    sizes = [1, 2, 1, 7, 1, 1, 1, 3] + [1] * 30 + [12, 1, 1, 4, 3, 3, 30] + [1] * 40 + [2, 3] * 10
    for size in sizes:
        check_update(cache, ref, entries(rng, size))
        assert cache.keys.shape[2] <= cache.capacity  # bounded by the window, not the context
    assert cache.offset == sum(sizes) > 10 * WINDOW


@pytest.mark.parametrize("seed", range(6))
def test_trim_equals_a_cache_that_never_saw_the_trimmed_entries(seed):
    """Random updates and rollbacks (before and after the buffer wraps and compacts): every later update returns
    exactly what a cache fed only the kept entries returns."""
    rng = np.random.default_rng(seed)
    cache, ref = RotatingKVCache(WINDOW, rollback=ROLLBACK), Reference()
    for step in range(80):
        size = int(rng.choice([1, 1, 1, 2, 3, 4, 9, 14]))
        check_update(cache, ref, entries(rng, size))
        # a short write (decode, verification) can always be rolled back; a long one `rollback` positions of it
        assert cache.max_trim >= min(cache.offset, size if size <= cache.room else ROLLBACK)
        if rng.random() < 0.4:
            n = int(rng.integers(1, cache.max_trim + 1))
            assert cache.trim(n) == n
            ref.trim(n)
            assert cache.offset == ref.keys.shape[2]
    assert cache.offset > 5 * WINDOW


def test_rollback_reserve_and_its_limit():
    rng = np.random.default_rng(1)
    cache = RotatingKVCache(WINDOW, rollback=ROLLBACK)
    for _ in range(4 * WINDOW):
        cache.update(mx.array(entries(rng, 1)), mx.array(entries(rng, 1)))
    assert cache.is_trimmable() and cache.max_trim >= ROLLBACK
    assert mlx_cache.trim_prompt_cache([cache], 2) == 2 and cache.offset == 4 * WINDOW - 2
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.trim(cache.max_trim + 1)
    fresh = RotatingKVCache(WINDOW)
    fresh.update(mx.array(entries(rng, 3)), mx.array(entries(rng, 3)))
    assert fresh.is_trimmable() and fresh.trim(10) == 3 and fresh.offset == 0


def test_state_round_trips_through_our_class_and_mlx_lms():
    rng = np.random.default_rng(2)
    ours, ref = RotatingKVCache(WINDOW, rollback=ROLLBACK), Reference()
    for size in [3, 1, 1, 6, 1, 1]:
        check_update(ours, ref, entries(rng, size))
    back = RotatingKVCache.from_state(ours.state)
    assert back.offset == ours.offset and back.max_trim == ours.max_trim
    theirs = ours.to_mlx_lm()  # mlx-lm's RotatingKVCache with the same entries
    again = RotatingKVCache.from_state(theirs.state)
    new = entries(rng, 1)
    want, first = ref.update(new)
    for cache in (back, again):
        keys, _, k_start = cache.update(mx.array(new), mx.array(-new))
        assert k_start == first
        np.testing.assert_array_equal(np.array(keys), want)

    # mlx-lm's ring buffer after it wrapped (in-place decode writes) reads back oldest first
    theirs = mlx_cache.RotatingKVCache(max_size=WINDOW)
    everything = entries(rng, 13)
    theirs.update_and_fetch(mx.array(everything[:, :, :2]), mx.array(everything[:, :, :2]))
    for t in range(2, 13):
        theirs.update_and_fetch(mx.array(everything[:, :, t:t + 1]), mx.array(everything[:, :, t:t + 1]))
    converted = RotatingKVCache.from_state(theirs.state)
    assert converted.offset == 13 and converted.window == WINDOW
    np.testing.assert_array_equal(np.array(converted.state[0]), everything[:, :, 13 - WINDOW:])


def test_global_cache_state_is_mlx_lms_without_padding():
    rng = np.random.default_rng(3)
    cache = KVCache()
    first, second = entries(rng, 4), entries(rng, 2)
    _, _, k_start = cache.update(mx.array(first), mx.array(first))
    assert k_start == 0
    cache.update(mx.array(second), mx.array(second))
    keys, values, offset = cache.state
    assert offset == 6 and keys.shape[2] == 6  # no unused buffer tail
    np.testing.assert_array_equal(np.array(keys), np.concatenate([first, second], axis=2))
    theirs = mlx_cache.KVCache.from_state(cache.state)  # what mlx-lm's prompt-cache loader makes of it
    third = entries(rng, 1)
    np.testing.assert_array_equal(np.array(theirs.update_and_fetch(mx.array(third), mx.array(third))[0]),
                                  np.array(cache.update_and_fetch(mx.array(third), mx.array(third))[0]))
    assert cache.trim(2) == 2 and KVCache.from_state(cache.state).offset == 5


@pytest.mark.parametrize("cls", [KVCache, RotatingKVCache])
@pytest.mark.parametrize("offset,N", [(0, 1), (0, 4), (3, 1), (3, 4), (9, 1), (9, 3)])
def test_masks_match_mlx_lms_for_the_same_entries(cls, offset, N):
    """make_mask of our caches equals mlx-lm's for its own class holding the same positions."""
    rng = np.random.default_rng(offset)
    ours = cls(WINDOW) if cls is RotatingKVCache else cls()
    theirs = mlx_cache.RotatingKVCache(max_size=WINDOW) if cls is RotatingKVCache else mlx_cache.KVCache()
    if offset:
        x = mx.array(entries(rng, offset))
        ours.update_and_fetch(x, x)
        theirs.update_and_fetch(x, x)
    window = WINDOW if cls is RotatingKVCache else None

    def dense(mask, S):
        if mask is None:
            return np.ones((N, S), bool)
        if isinstance(mask, str):
            return np.array(mlx_cache.create_causal_mask(N, S - N))
        return np.broadcast_to(np.array(mask), (N, S))

    x = mx.array(entries(rng, N))
    a = ours.make_mask(N, window_size=window, return_array=False)
    b = theirs.make_mask(N, window_size=window, return_array=False)
    ka, kb = ours.update_and_fetch(x, x)[0], theirs.update_and_fetch(x, x)[0]
    assert ka.shape == kb.shape
    np.testing.assert_array_equal(dense(a, ka.shape[2]), dense(b, kb.shape[2]))

"""KV caches: mlx-lm's cache protocol, with an exact rollback (`trim`) on every cache.

Both classes speak mlx-lm's protocol (`update_and_fetch`, `make_mask`, `state`/`from_state`, `trim`/
`is_trimmable`, `size`, `empty`, `nbytes`, `merge` into mlx-lm's `BatchKVCache`/`BatchRotatingKVCache`), so
`mlx_lm.generate`, mlx-lm's prompt-cache helpers, its speculative decoding and its `BatchGenerator` can drive our
model. Our own forward pass (`text.py`) calls `update(keys, values) -> (keys, values, k_start)`: keys (B, H, S, D)
covering absolute positions k_start .. k_start+S-1 in temporal order, which the windowed attention kernel reads
as they are.

- `KVCache` (global layers) has the layout and `state` of mlx-lm's KVCache (without the unused tail of the
  buffer, so saved prompt caches carry no padding). It is not a subclass: importing `mlx_lm` imports
  transformers (seconds), which `import mlx_gemma4` should not pay; mlx-lm is imported when batching.
- `RotatingKVCache` (sliding layers) is ours. mlx-lm's `RotatingKVCache` is a ring buffer of exactly the window
  that cannot be trimmed once it has wrapped (`is_trimmable()` is False): the entries a rollback would need are
  overwritten. Speculative decoding verifies k+1 drafted positions in one forward and rolls back the rejected
  ones in every cache, so ours keeps the entries in temporal order in a buffer of `capacity` = window + 1 +
  `rollback` + room positions (room = window // 4, at least `rollback`; the + 1 is for the MTP drafters): writes
  append in place; when the buffer is full, the entries still needed (the window + 1 plus `rollback` more) move
  to the front of a fresh one, once every `room` decode steps; a prefill chunk longer than the room attends over
  a temporary copy of the window and itself, and leaves only those entries. Memory stays bounded by the window
  (plus that constant), never by the context. `trim(n)` is exact for n <= `max_trim`: at least the last write if it was short (decode steps,
  speculative verification of up to `room` positions), at least `rollback` otherwise, unless earlier trims used
  it up; beyond that it raises.

mlx-lm's prompt-cache files name each cache's class; ours are named like the mlx-lm classes whose `state`
layout they share, so `mlx_lm.models.cache.load_prompt_cache` rebuilds them as mlx-lm's own classes (the model
accepts those too, through the mask path).
"""

from __future__ import annotations

import mlx.core as mx


def causal_mask(N: int, offset: int, window: int | None = None) -> mx.array:
    """(N, offset + N) boolean: query i (position offset + i) sees key j iff j <= offset + i and, with a
    window, offset + i - j < window."""
    q = mx.arange(offset, offset + N)[:, None]
    k = mx.arange(offset + N)[None]
    visible = k <= q
    return visible if window is None else visible & (q - k < window)


QUANTIZED_KV_UNSUPPORTED = "quantized KV caches (mlx-lm's kv_bits) are not supported: generate without kv_bits"


class _KeyValueBuffer:
    """What both caches share: a key buffer and a value buffer (None until the first update)."""

    keys: mx.array | None
    values: mx.array | None

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """mlx-lm's generate_step converts every cache that has `to_quantized` when kv_bits is set (and skips the
        others silently): ours refuse, as the model refuses mlx-lm's quantized caches."""
        raise ValueError(QUANTIZED_KV_UNSUPPORTED)


class KVCache(_KeyValueBuffer):
    """Growing cache (global layers): keys/values (B, H, capacity, D), positions 0 .. offset-1 filled."""

    step = 256  # the buffer grows by this many positions at a time

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        B, H, L, D = keys.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            grow = -(-L // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[-1]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset: end, :] = keys
        self.values[..., self.offset: end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :], 0

    # ---- mlx-lm's cache protocol ---------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.update(keys, values)[:2]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        if N == 1 and (window_size is None or self.offset < window_size):
            return None
        if return_array or (window_size is not None and self.offset + N > window_size):
            return causal_mask(N, self.offset, window_size)
        return "causal"

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        """mlx-lm's KVCache state (keys, values, offset), the keys exactly the filled positions."""
        if self.keys is None:
            return None, None, self.offset
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :], self.offset

    @state.setter
    def state(self, v) -> None:
        self.keys, self.values, offset = v
        self.offset = int(offset)

    @classmethod
    def from_state(cls, state) -> "KVCache":
        cache = cls()
        cache.state = state
        return cache

    @classmethod
    def merge(cls, caches):
        """One left-padded mlx-lm BatchKVCache of these caches (mlx-lm's continuous batching)."""
        from mlx_lm.models.cache import BatchKVCache

        return BatchKVCache.merge(caches)


class RotatingKVCache(_KeyValueBuffer):
    """Sliding-window cache with exact rollback; see the module docstring.

    The buffer holds absolute positions `_start .. offset-1` at slots 0 .. offset-_start-1, oldest first."""

    rollback = 16  # positions kept beyond the window so that a trim can take them back

    def __init__(self, window: int, rollback: int | None = None):
        if window < 1:
            raise ValueError(f"sliding window must be >= 1, got {window}")
        self.window = window
        if rollback is not None:
            self.rollback = rollback
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._start = 0

    @property
    def max_size(self) -> int:  # mlx-lm's name for the window
        return self.window

    @property
    def room(self) -> int:
        """Free slots after a compaction: the decode steps until the next one."""
        return max(self.rollback, self.window // 4)

    @property
    def history(self) -> int:
        """Entries always held (once seen): the window, and one more for the MTP drafters, which read the
        window + 1 keys before a position (transformers' inclusive bidirectional window)."""
        return self.window + 1

    @property
    def capacity(self) -> int:
        """The most positions the buffer holds between updates: its memory bound."""
        return self.history + self.rollback + self.room

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Append (B, H, L, D) entries; return those the new queries may attend to (the window - 1 before them
        and the L new ones), oldest first, with the position of the first."""
        L = keys.shape[2]
        held = self.offset - self._start
        if self.keys is None or held + L > self.keys.shape[2]:
            if L > self.room:
                return self._update_wide(keys, values)
            # Compact into a buffer of `capacity`: the history (so this write can be rolled back) and
            # `rollback` - L older entries, then free slots.
            keep = min(held, self.history + max(0, self.rollback - L))
            self.keys, self.values = (self._fresh(old, new, held - keep, held, 0, self.capacity - keep)
                                      for old, new in ((self.keys, keys), (self.values, values)))
            self._start, held = self.offset - keep, keep
        self.keys[..., held: held + L, :] = keys
        self.values[..., held: held + L, :] = values
        self.offset += L
        first = max(0, held - (self.window - 1))
        return self.keys[..., first: held + L, :], self.values[..., first: held + L, :], self._start + first

    def _update_wide(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """A write longer than the room (a prefill chunk): attend over the window - 1 entries before it and
        the new ones, then keep only what decoding and `rollback` trims need, with room to append."""
        L, held = keys.shape[2], self.offset - self._start
        before = min(held, self.window - 1)
        attended = [self._fresh(old, new, held - before, held, L, 0)
                    for old, new in ((self.keys, keys), (self.values, values))]
        kept = min(before + L, self.history + self.rollback)
        self.keys, self.values = (self._fresh(a, None, before + L - kept, before + L, 0, self.room)
                                  for a in attended)
        self.offset += L
        self._start = self.offset - kept
        return attended[0], attended[1], self.offset - before - L

    @staticmethod
    def _fresh(old: mx.array | None, new: mx.array | None, start: int, stop: int, n_new: int, free: int):
        """A new buffer: old[..., start:stop, :], then the first n_new entries of `new`, then `free` zeros."""
        ref = new if new is not None else old
        parts = [] if old is None or stop == start else [old[..., start:stop, :]]
        if n_new:
            parts.append(new)
        if free:
            parts.append(mx.zeros((*ref.shape[:2], free, ref.shape[3]), ref.dtype))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    # ---- mlx-lm's cache protocol ---------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keys, values, _ = self.update(keys, values)
        return keys, values

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        """Mask of N new queries over what `update_and_fetch` returns: min(offset, window - 1) older keys and
        the N new ones."""
        window = window_size or self.window
        offset = min(self.offset, self.window - 1)
        if N == 1 and offset < window:
            return None
        if return_array or offset + N > window:
            return causal_mask(N, offset, window)
        return "causal"

    @property
    def max_trim(self) -> int:
        """How many of the last positions `trim` can take back exactly."""
        held = self.offset - self._start
        return self.offset if self._start == 0 else held - self.history

    def is_trimmable(self) -> bool:
        """Always: the recent positions can be rolled back (mlx-lm's speculative decoding checks this). Unlike
        mlx-lm's caches, not by any amount once entries have left the buffer: `trim` beyond `max_trim` raises
        (mlx-lm's LRUPromptCache may ask for such a trim when it reuses a longer cached prompt)."""
        return True

    def trim(self, n: int) -> int:
        """Roll back the last n positions (at most `offset`); returns how many were rolled back."""
        n = min(self.offset, n)
        if n > self.max_trim:
            raise ValueError(f"cannot roll back {n} positions of a sliding-window cache (window {self.window}): it "
                             f"holds {self.max_trim} positions beyond the {self.history} it must keep")
        self.offset -= n
        return n

    def size(self) -> int:
        return min(self.offset, self.window)

    @property
    def state(self):
        """mlx-lm's RotatingKVCache state: (keys, values, offset, keep, max_size, next slot), with the keys
        oldest first (so the next slot is their count)."""
        held = self.offset - self._start
        if self.keys is None:
            return None, None, self.offset, 0, self.window, 0
        return self.keys[..., :held, :], self.values[..., :held, :], self.offset, 0, self.window, held

    @state.setter
    def state(self, v) -> None:
        """Accepts our state and mlx-lm's RotatingKVCache state (a ring buffer, possibly wrapped)."""
        keys, values, offset, keep, max_size, idx = v
        if keep:
            raise ValueError(f"a RotatingKVCache state with keep={keep} (mlx-lm's attention-sink tokens) is not a "
                             "Gemma 4 sliding-window cache")
        self.window, self.offset = int(max_size), int(offset)
        if keys is not None:
            n = keys.shape[2]
            if idx != n and idx < self.offset:  # wrapped ring: the next slot holds the oldest entry
                order = lambda a: mx.concatenate([a[..., idx:, :], a[..., :idx, :]], axis=2)  # noqa: E731
                keys, values = order(keys), order(values)
            elif idx != n:
                keys, values = keys[..., :idx, :], values[..., :idx, :]
            held = min(keys.shape[2], self.offset)
            keys, values = keys[..., keys.shape[2] - held:, :], values[..., values.shape[2] - held:, :]
        self.keys, self.values = keys, values
        self._start = self.offset - (0 if keys is None else keys.shape[2])

    @classmethod
    def from_state(cls, state) -> "RotatingKVCache":
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    def to_mlx_lm(self):
        """The same entries as mlx-lm's RotatingKVCache (which can no longer be trimmed once it wraps)."""
        from mlx_lm.models.cache import RotatingKVCache as MlxRotatingKVCache

        return MlxRotatingKVCache.from_state(self.state)

    @classmethod
    def merge(cls, caches):
        """One left-padded mlx-lm BatchRotatingKVCache of these caches' last `window` entries (ours or
        mlx-lm's RotatingKVCache)."""
        from mlx_lm.models.cache import BatchRotatingKVCache

        return BatchRotatingKVCache.merge([c.to_mlx_lm() if isinstance(c, cls) else c for c in caches])


def is_native(cache) -> bool:
    """Caches our forward pass reads through `update` (temporal keys + start position): ours."""
    return isinstance(cache, (KVCache, RotatingKVCache))

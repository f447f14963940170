"""KV caches: a growing cache for global layers and a rotating window cache for sliding layers.

`update(keys, values)` stores the new entries and returns what the layer attends over:
`(keys, values, k_start)`, keys of shape (B, H, S, D) covering absolute positions k_start .. k_start+S-1
in temporal order. Exception: a single-token decode step on a full rotating cache returns the ring buffer
in slot order; every entry is then inside the window and visible, so order does not matter (the
attention call passes no window for it, see attention.py).

The rotating cache keeps exactly `window` entries (slot = position % window), so its memory is bounded by
the window, not the context. During a multi-token prefill chunk it temporarily holds window + chunk.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        B, H, L, D = keys.shape
        Dv = values.shape[-1]
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((L + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, Dv), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :], 0

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache:
    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None  # ring buffer, slot = position % window (once full)
        self.values: mx.array | None = None
        self.offset = 0

    def _temporal(self) -> tuple[mx.array, mx.array]:
        """Stored entries in temporal order (oldest first)."""
        if self.keys is None:
            return None, None
        if self.offset <= self.window:  # slot = position; the buffer may be longer than what is filled
            return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        start = self.offset % self.window
        order = lambda a: mx.concatenate([a[..., start:, :], a[..., :start, :]], axis=2)  # noqa: E731
        return order(self.keys), order(self.values)

    def _store_last(self, keys: mx.array, values: mx.array, end: int) -> None:
        """Keep the last `window` entries of a temporally ordered run ending at position `end`."""
        n = min(self.window, keys.shape[2])
        keys, values = keys[..., -n:, :], values[..., -n:, :]
        if end > self.window:
            shift = end % self.window  # slot of the oldest kept entry
            roll = lambda a: mx.concatenate([a[..., self.window - shift :, :], a[..., : self.window - shift, :]], axis=2)  # noqa: E731
            keys, values = roll(keys), roll(values)
        self.keys, self.values = keys, values

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        L = keys.shape[2]
        if L == 1 and self.keys is not None:
            return self._decode_step(keys, values)
        old_k, old_v = self._temporal()
        if old_k is not None and old_k.shape[2] > 0:
            all_k = mx.concatenate([old_k, keys], axis=2)
            all_v = mx.concatenate([old_v, values], axis=2)
        else:
            all_k, all_v = keys, values
        k_start = self.offset - (all_k.shape[2] - L)
        self.offset += L
        self._store_last(all_k, all_v, self.offset)
        return all_k, all_v, k_start

    def _decode_step(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Write one token in place: at the end while filling up, then over the oldest slot."""
        if self.keys.shape[2] < self.window:  # grow the buffer to its final size once
            B, H, n, D = self.keys.shape
            pad = lambda a: mx.concatenate([a, mx.zeros((B, H, self.window - n, a.shape[-1]), a.dtype)], axis=2)  # noqa: E731
            self.keys, self.values = pad(self.keys), pad(self.values)
        slot = self.offset % self.window
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.offset += 1
        n = min(self.offset, self.window)
        return self.keys[..., :n, :], self.values[..., :n, :], self.offset - n

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self._temporal()

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        """Restore from temporally ordered entries; `offset` must be set first (see prompt_cache)."""
        k, v = kv
        self._store_last(k, v, self.offset)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

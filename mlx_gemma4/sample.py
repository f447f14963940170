"""Next-token sampling in float32: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeds.

A sampler maps logits (B, V) to token ids (B,). Logits processors are callables `(tokens, logits) -> logits`
(tokens: the ids seen so far, (B, T)); a list of them is applied in order before sampling, so they compose.
Filters follow transformers' order: temperature first, then top-k, top-p, min-p on the scaled distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_NEG_INF = -math.inf


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits per row (ties at the k-th value are kept), the rest -inf."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = mx.sort(logits, axis=-1)[..., vocab - k: vocab - k + 1]
    return mx.where(logits >= kth, logits, _NEG_INF)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (always the top one)."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above this one
    keep_sorted = mass_before < p
    # scatter the decision back to vocabulary order
    inverse = mx.argsort(order, axis=-1)
    keep = mx.take_along_axis(keep_sorted, inverse, axis=-1)
    return mx.where(keep, logits, _NEG_INF)


def min_p_filter(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is >= min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    threshold = mx.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logits >= threshold, logits, _NEG_INF)


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """A finite real number in the range (lo_open: lo excluded; hi_open: hi excluded), else ValueError naming the
    argument and the range. NaN and infinities are refused: they would sample garbage."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    low = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
    high = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
    if (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
            or (hi is not None and (value >= hi if hi_open else value > hi))):
        raise ValueError(f"{name} must be a finite number with {low}{name}{high}, got {value}")
    return value


def check_integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        low = "" if lo is None else f"{lo} <= "
        high = "" if hi is None else f" <= {hi}"
        raise ValueError(f"{name} must be an integer with {low}{name}{high}, got {value}")
    return value


def repetition_penalty_processor(penalty: float, context_size: int | None = 64) -> LogitsProcessor:
    """CTRL-style penalty on tokens already seen (the last `context_size`, None = all): positive logits are
    divided by `penalty`, negative ones multiplied (transformers' RepetitionPenaltyLogitsProcessor)."""
    check_number("repetition_penalty", penalty, 0.0, None, lo_open=True)
    if context_size is not None:
        check_integer("repetition_context_size", context_size, 1)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens is None or tokens.size == 0 or penalty == 1.0:
            return logits
        seen = tokens[..., -context_size:] if context_size else tokens
        seen = seen.reshape(logits.shape[0], -1)
        picked = mx.take_along_axis(logits, seen, axis=-1)
        picked = mx.where(picked > 0, picked / penalty, picked * penalty)
        return mx.put_along_axis(logits, seen, picked, axis=-1)

    return process


@dataclass
class SamplerSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None

    def validate(self) -> None:
        """Every setting checked up front: finite numbers in range, an integer seed in [0, 2**64)."""
        check_number("temperature", self.temperature, 0.0)
        check_integer("top_k", self.top_k, 0)
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_number("min_p", self.min_p, 0.0, 1.0, hi_open=True)
        if self.seed is not None:
            check_integer("seed", self.seed, 0, 2**64 - 1)


class Sampler:
    """logits (B, V) -> ids (B,). With a seed, the same logits give the same draws (its own PRNG key)."""

    def __init__(self, settings: SamplerSettings | None = None, **kwargs):
        self.settings = settings or SamplerSettings(**kwargs)
        self.settings.validate()
        self._key = mx.random.key(self.settings.seed) if self.settings.seed is not None else None

    def filtered_logits(self, logits: mx.array) -> mx.array:
        """float32 logits / temperature with top-k, top-p, min-p applied (excluded tokens are -inf)."""
        s = self.settings
        logits = logits.astype(mx.float32) / s.temperature
        logits = top_k_filter(logits, s.top_k)
        logits = top_p_filter(logits, s.top_p)
        return min_p_filter(logits, s.min_p)

    @property
    def greedy(self) -> bool:
        return self.settings.temperature == 0

    def next_key(self) -> mx.array | None:
        """The next PRNG key of the seeded stream; None without a seed (MLX's global generator)."""
        if self._key is None:
            return None
        self._key, key = mx.random.split(self._key)
        return key

    def __call__(self, logits: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logits.astype(mx.float32), axis=-1)
        return mx.random.categorical(self.filtered_logits(logits), axis=-1, key=self.next_key())


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    return Sampler(SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))


def make_logits_processors(repetition_penalty: float | None = None,
                           repetition_context_size: int | None = 64) -> list[LogitsProcessor]:
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None:
        check_number("repetition_penalty", repetition_penalty, 0.0, None, lo_open=True)
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(repetition_penalty_processor(repetition_penalty, repetition_context_size))
    return processors


def apply_logits_processors(processors: Sequence[LogitsProcessor], tokens: mx.array, logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    for process in processors:
        logits = process(tokens, logits)
    return logits

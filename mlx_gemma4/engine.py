"""The decoding engine: prefill a prompt into the caches, decode one token, decode n tokens.

    logits = prefill(model, ids, cache)            # (1, V): the prompt's last position
    logits = decode_step(model, token, cache)      # (1, V): feed one sampled token (1,)
    for token in generate_step(model, ids, cache, sampler): ...

No tokenizer or processor here: ids in, ids out. `cache` is a `PromptCache` (the model's per-layer caches
plus the ids they hold); the text API (`generate.py`) and the chat session (`session.py`) build on this.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import mlx.core as mx

from .prompt_cache import PromptCache
from .sample import LogitsProcessor, apply_logits_processors


def prefill(model, ids: Sequence[int], cache: PromptCache, step_size: int = 512,
            media: dict | None = None) -> mx.array:
    """Run `ids` through the model into the caches, about `step_size` tokens at a time; logits (1, V) of the
    last position. `media`: image/audio arrays for `model.prepare_inputs` (names as transformers' processor
    outputs: pixel_values, image_position_ids, input_features, ...) whose soft tokens replace the placeholder
    tokens in `ids`; chunks then never split an image. All but the last chunk evaluate only the caches."""
    if not ids:
        raise ValueError("nothing to prefill: the prompt is empty (or entirely in the prompt cache)")
    ids_arr = mx.array(list(ids), dtype=mx.int32)[None]  # (1, L)
    if media:
        inputs = model.prepare_inputs(ids_arr, **media)
        *head, last = [inputs.span(start, end) for start, end in inputs.chunks(step_size)]
    else:
        starts = range(0, len(ids), step_size)
        *head, last = [{"input_ids": ids_arr[:, s:s + step_size]} for s in starts]
    for chunk in head:
        model(**chunk, cache=cache.caches, last_only=True)
        cache.eval()
    logits = model(**last, cache=cache.caches, last_only=True)[:, -1, :]
    cache.tokens.extend(int(i) for i in ids)
    return logits


def decode_step(model, token: mx.array, cache: PromptCache) -> mx.array:
    """Feed one token (shape (1,)) at the next position; logits (1, V) for the token after it. Lazy: the caller
    decides when to evaluate (and records the token in `cache.tokens`)."""
    return model(token[:, None], cache=cache.caches)[:, -1, :]


def generate_step(model, ids: Sequence[int], cache: PromptCache, sampler, *,
                  logits_processors: Sequence[LogitsProcessor] = (), max_tokens: int = 256,
                  prefill_step_size: int = 512, media: dict | None = None) -> Iterator[int]:
    """Yield up to max_tokens sampled ids after prefilling `ids`. Each yielded token except the last is fed
    back (and recorded in cache.tokens) before it is yielded, so the next step overlaps the caller."""
    history = mx.array(list(cache.tokens) + list(ids), dtype=mx.int32)[None] if logits_processors else None

    def sample(logits: mx.array) -> mx.array:  # (1, V) -> (1,)
        nonlocal history
        if logits_processors:
            logits = apply_logits_processors(logits_processors, history, logits)
        token = sampler(logits.astype(mx.float32))
        if history is not None:
            history = mx.concatenate([history, token[:, None].astype(mx.int32)], axis=1)
        return token

    token = sample(prefill(model, ids, cache, prefill_step_size, media))
    mx.async_eval(token)
    for n in range(max_tokens):
        last = n + 1 == max_tokens
        if not last:  # feed this token while the caller handles it
            next_token = sample(decode_step(model, token, cache))
            mx.async_eval(next_token)
        value = int(token.item())
        if not last:
            cache.tokens.append(value)
        yield value
        if not last:
            token = next_token

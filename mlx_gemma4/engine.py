"""The decoding engine: prefill a prompt into the caches, decode one token, decode n tokens.

    logits = prefill(model, ids, cache)            # (1, V): the prompt's last position
    logits = decode_step(model, token, cache)      # (1, V): feed one sampled token (1,)
    for token in generate_step(model, ids, cache, sampler): ...

No tokenizer or processor here: ids in, ids out. `cache` is a `PromptCache` (the model's per-layer caches
plus the ids they hold); the text API (`generate.py`) and the chat session (`session.py`) build on this.

The context (`max_position_embeddings`) bounds the prompt plus the generated tokens: a prompt that leaves no
room is refused before any prefill (`ContextError`), and generation stops when the context is full.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from .errors import InputError
from .prompt_cache import PromptCache
from .sample import LogitsProcessor, apply_logits_processors


class ContextError(InputError):
    """The prompt (with the cached tokens before it) does not fit the model's context."""


def context_length(model) -> int:
    return model.config.text.max_position_embeddings


def context_room(model, cache: PromptCache, n_new: int) -> int:
    """Positions left in the context after the cache's tokens and `n_new` more."""
    return context_length(model) - len(cache.tokens) - n_new


def reply_room(model, cache: PromptCache, n_new: int) -> int:
    """The most tokens a reply to `n_new` more prompt tokens can have; ContextError when the prompt leaves none."""
    room = context_room(model, cache, n_new)
    if room < 1:
        cached = f" after {len(cache.tokens)} cached tokens" if cache.tokens else ""
        raise ContextError(f"the prompt is {n_new} tokens{cached}, which leaves no room for a reply in the model's "
                           f"context of {context_length(model)} tokens")
    return room


# The model's media inputs (names as transformers' processor outputs), by the config field of their placeholder
# token: arrays with one row per run of placeholders in the prompt (an image, a video frame, an audio clip).
MEDIA_ROWS = {"image_token_id": ("pixel_values", "image_position_ids"),
              "video_token_id": ("pixel_values_videos", "video_position_ids"),
              "audio_token_id": ("input_features", "input_features_mask")}


def media_after(model, ids: Sequence[int], start: int, media: dict | None) -> dict | None:
    """The media inputs for the placeholders in ids[start:], what `prefill` needs after a prompt cache holding
    ids[:start]. `media` may cover every placeholder of `ids` (the rows of items before `start` are dropped: their
    soft tokens are in the cache) or only those from `start` on. None when no media is left."""
    if not media or not start:
        return media or None
    ids = np.asarray(ids)
    out = dict(media)
    for field, names in MEDIA_ROWS.items():
        token = getattr(model.config, field, None)
        if token is None or media.get(names[0]) is None:
            continue
        is_placeholder = ids == token
        run_starts = is_placeholder & ~np.concatenate([[False], is_placeholder[:-1]])
        before, after = int(run_starts[:start].sum()), int(run_starts[start:].sum())
        kind = field.removesuffix("_token_id")
        if start < len(ids) and is_placeholder[start] and is_placeholder[start - 1]:
            raise ValueError(f"the prompt cache ends inside the soft tokens of one {kind} input (at position {start})")
        rows = len(media[names[0]])
        if rows == before + after:
            out.update({n: media[n][before:] if after else None for n in names if media.get(n) is not None})
        elif rows != after:
            raise ValueError(f"{rows} {kind} inputs for {before + after} {kind} placeholder runs in the prompt "
                             f"({before} of them in the prompt cache)")
    return out if any(v is not None for v in out.values()) else None


def prefill(model, ids: Sequence[int], cache: PromptCache, step_size: int = 512,
            media: dict | None = None, return_hidden: bool = False):
    """Run `ids` through the model into the caches, about `step_size` tokens at a time; logits (1, V) of the
    last position. `media`: image/audio arrays for `model.prepare_inputs` (names as transformers' processor
    outputs: pixel_values, image_position_ids, input_features, ...) whose soft tokens replace the placeholder
    tokens in `ids`; chunks then never split an image. All but the last chunk evaluate only the caches.
    return_hidden: (logits, the last position's final-normed hidden state (1, 1, H)), for an MTP drafter."""
    if not ids:
        raise ValueError("nothing to prefill: the prompt is empty (or entirely in the prompt cache)")
    if context_room(model, cache, len(ids)) < 0:
        raise ContextError(f"{len(ids)} tokens after {len(cache.tokens)} do not fit the model's context of "
                           f"{context_length(model)} tokens")
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
    logits, hidden = model(**last, cache=cache.caches, last_only=True, return_hidden=True)
    cache.tokens.extend(int(i) for i in ids)
    return (logits[:, -1, :], hidden[:, -1:]) if return_hidden else logits[:, -1, :]


def decode_step(model, token: mx.array, cache: PromptCache) -> mx.array:
    """Feed one token (shape (1,)) at the next position; logits (1, V) for the token after it. Lazy: the caller
    decides when to evaluate (and records the token in `cache.tokens`)."""
    return model(token[:, None], cache=cache.caches)[:, -1, :]


def generate_step(model, ids: Sequence[int], cache: PromptCache, sampler, *,
                  logits_processors: Sequence[LogitsProcessor] = (), max_tokens: int = 256,
                  prefill_step_size: int = 512, media: dict | None = None) -> Iterator[int]:
    """Yield up to max_tokens sampled ids after prefilling `ids`, fewer when the context fills up first (see
    `context_room`; a prompt that leaves no room raises ContextError before any prefill). Each yielded token
    except the last is fed back (and recorded in cache.tokens) before it is yielded, so the next step overlaps
    the caller."""
    max_tokens = min(max_tokens, reply_room(model, cache, len(ids)))
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

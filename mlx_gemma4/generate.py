"""Text generation, the Python API: `generate` (the reply as a string) and `stream_generate` (text pieces as
they are decoded, the last one with the stats). Prompts are strings, message lists or token ids; the decoding
itself is `engine.py`'s.

The command line is `cli.py`'s (`mlx-gemma4`); `python -m mlx_gemma4.generate ...` runs it too.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx

from . import runtime
from .engine import generate_step, media_after, reply_room
from .prompt_cache import PromptCache
from .sample import LogitsProcessor, make_logits_processors, make_sampler
from .speculative import DraftStats, speculative_generate_step


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens prefilled in this call (cached prefix tokens excluded)
    prompt_tps: float = 0.0
    cached_tokens: int = 0  # prefix tokens reused from a prompt cache
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    blas: str = ""
    # "stop" (stop token), "length" (max_tokens), "context" (the model's context is full), None while running
    finish_reason: str | None = None
    draft: DraftStats | None = None  # with a draft model: proposed / accepted tokens, target steps

    def summary(self) -> str:
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        drafts = f" | {self.draft.summary()}" if self.draft is not None else ""
        return (f"prompt: {self.prompt_tokens} tokens{cached}, {self.prompt_tps:.1f} tok/s | "
                f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s{drafts} | "
                f"peak memory: {self.peak_memory_gb:.3f} GB | BLAS: {self.blas}")


@dataclass
class GenerationChunk:
    text: str  # newly completed text (may be empty while a multi-byte character is incomplete)
    token: int | None  # the token just generated (None on the final flush)
    stats: GenerationStats


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def stream_generate(model, processor, prompt, *, max_tokens: int = 256, system: str | None = None,
                    enable_thinking: bool = False, tools=None, use_chat_template: bool = True,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    seed: int | None = None, repetition_penalty: float | None = None, sampler=None,
                    logits_processors: Sequence[LogitsProcessor] | None = None,
                    prompt_cache: PromptCache | None = None, stop_token_ids: Sequence[int] | None = None,
                    prefill_step_size: int = 512, skip_special_tokens: bool = False, audio=None, images=None,
                    max_soft_tokens: int | None = None, media: dict | None = None, draft_model=None,
                    num_draft_tokens: int = 4) -> Iterator[GenerationChunk]:
    """Stream generated text. `prompt`: a string (formatted with the chat template unless
    use_chat_template=False), a message list, or token ids. `audio`: clips (paths, bytes or 16 kHz float
    arrays) for the user turn (see Processor.prompt_inputs). `prompt_cache`: caches holding a prefix of the
    prompt's ids (only the rest is prefilled; it is updated in place; it is trusted to hold the same media as
    the prompt's prefix: token ids cannot tell two images of one size apart). `media`: processed image/audio
    arrays for token-id prompts whose placeholders are already expanded (see `engine.prefill`), for all of them
    or only for those after the prompt cache (see `engine.media_after`). The last chunk carries
    finish_reason. A prompt that leaves no room in the model's context raises engine.ContextError before any
    prefill; when the context fills up during generation, the reply ends with finish_reason "context".
    `draft_model`: an MTP drafter for this model (`load_drafter(path, model)`): speculative decoding with
    `num_draft_tokens` proposals per target step (mlx_gemma4.speculative), the same output distribution (greedy:
    the same tokens); stats.draft counts the accepted proposals."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
        if audio is not None or images is not None:
            raise ValueError("with token-id prompts pass processed media as `media=`, not audio=/images=")
        ids = [int(i) for i in prompt]
    else:
        ids, prompt_media = processor.prompt_inputs(
            prompt, system=system, enable_thinking=enable_thinking, tools=tools,
            use_chat_template=use_chat_template, images=images, audio=audio, max_soft_tokens=max_soft_tokens)
        media = {**prompt_media, **(media or {})} or None
    sampler = sampler or make_sampler(temperature, top_p, top_k, min_p, seed)
    processors = list(make_logits_processors(repetition_penalty)) + list(logits_processors or [])
    stop = set(processor.stop_token_ids if stop_token_ids is None else stop_token_ids)

    if prompt_cache is None:
        prompt_cache = PromptCache.fresh(model)
    cached = len(prompt_cache.tokens)
    if cached and (cached >= len(ids) or ids[:cached] != prompt_cache.tokens):
        warnings.warn("the prompt does not extend the prompt cache's tokens; prefilling it from scratch")
        prompt_cache.caches, prompt_cache.tokens, cached = model.make_cache(), [], 0
    new_ids = ids[cached:]
    media = media_after(model, ids, cached, media)

    limit = min(max_tokens, reply_room(model, prompt_cache, len(new_ids)))  # fails fast on a prompt too long

    stats = GenerationStats(prompt_tokens=len(new_ids), cached_tokens=cached, blas=runtime.blas_in_use)
    detok = processor.tokenizer.detokenizer(skip_special=skip_special_tokens)
    mx.reset_peak_memory()
    start = time.perf_counter()
    gen_start = start
    if draft_model is None:
        steps = generate_step(model, new_ids, prompt_cache, sampler, logits_processors=processors,
                              max_tokens=limit, prefill_step_size=prefill_step_size, media=media)
    else:
        stats.draft = DraftStats()
        steps = speculative_generate_step(model, draft_model, new_ids, prompt_cache, sampler,
                                          num_draft_tokens=num_draft_tokens, logits_processors=processors,
                                          max_tokens=limit, prefill_step_size=prefill_step_size, media=media,
                                          stats=stats.draft)
    text, token = "", None
    try:
        for n, token in enumerate(steps):
            now = time.perf_counter()
            if n == 0:
                stats.prompt_tps = len(new_ids) / max(now - start, 1e-9)
                gen_start = now
            else:
                stats.generation_tps = n / max(now - gen_start, 1e-9)
            stats.peak_memory_gb = _peak_gb()
            if token in stop:
                stats.finish_reason, text, token = "stop", "", None
                break
            stats.generation_tokens = n + 1
            text = detok.add(token)
            if n + 1 == limit:
                stats.finish_reason = "length" if limit == max_tokens else "context"
                break
            yield GenerationChunk(text, token, stats)
    finally:
        steps.close()
    yield GenerationChunk(text + detok.finalize(), token, stats)


def generate(model, processor, prompt, *, verbose: bool = False, **kwargs) -> str:
    """The whole reply as a string (see stream_generate for the arguments). verbose: stream it to stdout and
    print the stats line to stderr."""
    pieces = []
    chunk = None
    for chunk in stream_generate(model, processor, prompt, **kwargs):
        pieces.append(chunk.text)
        if verbose:
            print(chunk.text, end="", flush=True)
    if verbose and chunk is not None:
        print()
        print(chunk.stats.summary(), file=sys.stderr)
    return "".join(pieces)


if __name__ == "__main__":  # runs as the module __main__, so this is no import cycle
    from mlx_gemma4.cli import main

    raise SystemExit(main())

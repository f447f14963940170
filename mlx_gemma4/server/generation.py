"""The server's generation backend: prompts for a request, continuous batching, prefix reuse, streamed output.

Every request runs on one `BatchEngine` (mlx_gemma4.batch): prefilled alone, then decoded in a batch with the
others, one token each per step; at temperature 0 each gets the tokens it gets alone.

Prefix reuse across requests: a conversation's next request re-renders the whole history, and Gemma 4's template
renders an earlier reply differently from the prompt it was generated after (the empty thought channel that
closes a non-thinking generation prompt is not in the history, nor is the thinking). So what carries over is
the prompt up to the start of the model's turn (`reuse_boundary`). A request prefills that part first and
keeps its caches (`PrefixCache`, bounded in bytes and entries); the next request whose prompt starts with it
prefills only the rest. Keys are token ids with each image/audio placeholder run tagged by a digest of its
media, so two images of one size never share an entry. Nothing is ever trimmed back: sliding-window caches are
extended, never rewound, so reuse is exact for them too.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import numpy as np

from ..batch import BatchEngine
from ..engine import MEDIA_ROWS, context_length
from ..prompt_cache import PromptCache
from ..sample import check_integer, check_number, make_logits_processors, make_sampler
from .errors import APIError, bad_request
from .messages import Conversation, count_media, fetch_remote_media
from .output import Delta, OutputParser

THOUGHT_CHANNEL_CLOSED = "<|channel>thought\n<channel|>"  # ends a non-thinking generation prompt


@dataclass
class Sampling:
    """Per-request generation settings (validated by `check`)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no log-probabilities; 0..20: the token's and that many alternatives

    def check(self) -> None:
        try:
            check_integer("max_tokens", self.max_tokens, 1)
            make_sampler(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)
            make_logits_processors(self.repetition_penalty)
            for name in ("presence_penalty", "frequency_penalty"):
                if getattr(self, name) is not None:
                    check_number(name, getattr(self, name), -2.0, 2.0)
            if self.top_logprobs is not None:
                check_integer("top_logprobs", self.top_logprobs, 0, 20)
        except (TypeError, ValueError) as e:
            name = str(e).split(" ", 1)[0]
            raise bad_request(str(e), name if name.isidentifier() else None) from e


@dataclass
class Prompt:
    ids: list[int]
    media: dict | None
    boundary: int  # prefix reuse: the caches of ids[:boundary] are kept for later requests
    forced: str = ""  # the end of `ids` the model continues from as if it had written it (a forced tool call)
    tools: bool = False  # the conversation declares tools (a <|tool_response> the model writes then ends it)
    banned: list[int] = field(default_factory=list)  # token ids the model may not write (tool_choice none)
    key: list = field(default_factory=list)  # ids with media placeholders tagged by their media's digest
    markup: bool = True  # read thought channels and tool calls out of the output (False: raw completions)


@dataclass
class Finished:
    finish_reason: str  # "stop", "length", "tool_calls" (OpenAI's names; each API maps them)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    stop_sequence: str | None = None


@dataclass
class Step:
    """What one generated token added: deltas (possibly none) and, with log-probabilities asked for, the token's."""

    deltas: list[Delta]
    logprob: dict | None = None


def prefix_key(model, ids: Sequence[int], media: dict | None) -> list:
    """ids, with every placeholder token of the n-th image/audio/video input replaced by (id, digest of it)."""
    key: list = list(ids)
    if not media:
        return key
    arr = np.asarray(ids)
    for field_name, names in MEDIA_ROWS.items():
        token = getattr(model.config, field_name, None)
        if token is None or media.get(names[0]) is None:
            continue
        rows = [media[n] for n in names if media.get(n) is not None]
        digests = [hashlib.blake2b(b"".join(np.ascontiguousarray(r[i]).tobytes() for r in rows),
                                   digest_size=16).hexdigest() for i in range(len(rows[0]))]
        is_token = arr == token
        run = np.cumsum(is_token & ~np.concatenate([[False], is_token[:-1]])) - 1
        for i in np.flatnonzero(is_token):
            key[i] = (int(token), digests[min(int(run[i]), len(digests) - 1)])
    return key


class PrefixCache:
    """The caches of prompt prefixes kept between requests, on mlx-lm's `LRUPromptCache` (its token trie, LRU
    order and byte bound). Where it does not fit Gemma 4: its `fetch_nearest_cache` may reuse a *longer* cached
    prompt by trimming it back, which a sliding-window cache that has moved past the window cannot do (our
    RotatingKVCache raises for trims beyond its rollback reserve): such a fetch falls back to prefilling from
    scratch. The entries this server inserts are prefixes of the prompts that made them, so that case only
    arises when a conversation is edited."""

    MODEL = "model"  # one model per process: the trie's model key

    def __init__(self, max_bytes: int, max_entries: int):
        from mlx_lm.models.cache import LRUPromptCache

        self.enabled = max_bytes > 0 and max_entries > 0
        self._lru = LRUPromptCache(max_size=max(max_entries, 1), max_bytes=max_bytes)

    def fetch(self, key: list) -> tuple[list | None, int]:
        """(copies of the caches of the longest usable prefix of `key`, its length), or (None, 0)."""
        if not self.enabled:
            return None, 0
        try:
            caches, rest = self._lru.fetch_nearest_cache(self.MODEL, key)
        except ValueError:  # a longer entry whose sliding-window caches cannot be trimmed back that far
            return None, 0
        if caches is None:
            return None, 0
        n = len(key) - len(rest)
        if n == len(key):  # the whole prompt: give back its last position, whose logits are needed
            try:
                for cache in caches:
                    cache.trim(1)
            except ValueError:
                return None, 0
            n -= 1
        return (caches, n) if n > 0 else (None, 0)

    def insert(self, key: list, caches: list) -> None:
        if self.enabled:
            self._lru.insert_cache(self.MODEL, list(key), caches, cache_type="user")

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)


def view_copy(caches: list) -> list:
    """Copies the engine may write into. (A deep copy, as LRUPromptCache makes: slicing the arrays here would
    leave lazy ops on this thread's MLX stream, which the engine's thread cannot evaluate.)"""
    return copy.deepcopy(caches)


class Generator:
    """One model, one BatchEngine, shared by every request of the server."""

    def __init__(self, model, processor, *, model_id: str, max_concurrency: int = 8, max_tokens: int = 512,
                 enable_thinking: bool = False, prompt_cache_bytes: int = 2 << 30, prompt_cache_entries: int = 32,
                 fetch_urls: bool = True, fetch_max_bytes: int = 20 << 20, fetch_timeout: float = 10.0,
                 prefill_step_size: int = 512, sampling_defaults: dict | None = None, draft_model=None,
                 num_draft_tokens: int = 4):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.sampling_defaults = dict(sampling_defaults or {})  # temperature, top_p, top_k, min_p when not sent
        self.max_tokens, self.enable_thinking = max_tokens, enable_thinking
        self.fetch = dict(allow=fetch_urls, max_bytes=fetch_max_bytes, timeout=fetch_timeout)
        if draft_model is None:
            self.engine = BatchEngine(model, max_batch=max_concurrency, prefill_step_size=prefill_step_size)
        else:  # speculative decoding, one request at a time (see draft.py)
            from .draft import DraftEngine

            self.engine = DraftEngine(model, draft_model, num_draft_tokens=num_draft_tokens,
                                      prefill_step_size=prefill_step_size)
        self.prefixes = PrefixCache(prompt_cache_bytes, prompt_cache_entries)
        self.created = int(time.time())
        tok = processor.tokenizer
        self._thought_closed = tok.encode(THOUGHT_CHANNEL_CLOSED, add_bos=False)
        self._control_ids = {i for i in (tok.backend.token_to_id(t) for t in processor.control_tokens) if i is not None}
        self._tool_call_id = tok.token_id("tool_call_start")
        self._tool_response_id = tok.token_id("tool_response_start")

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    @property
    def context_length(self) -> int:
        return context_length(self.model)

    # ---- prompts (run in a worker thread: media decoding and fetching block) ---------------------------
    def chat_prompt(self, conversation: Conversation, *, enable_thinking: bool | None = None,
                    tool_choice: str | dict | None = None, max_soft_tokens: int | None = None) -> Prompt:
        """The prompt of a conversation. tool_choice: "auto" (or None), "none" (the model may not start a call),
        "required" (its reply starts with a call) or {"name": ...} (a call of that function)."""
        messages = conversation.messages
        fetch_remote_media(messages, **self.fetch)
        thinking = self.enable_thinking if enable_thinking is None else enable_thinking
        if count_media(messages) and max_soft_tokens is not None and max_soft_tokens not in (70, 140, 280, 560, 1120):
            raise bad_request(f"max_soft_tokens must be one of 70, 140, 280, 560, 1120, got {max_soft_tokens}",
                              "max_soft_tokens")
        try:
            ids, media = self.processor.prompt_inputs(messages, tools=conversation.tools, enable_thinking=thinking,
                                                      max_soft_tokens=max_soft_tokens)
        except (ValueError, TypeError, OSError) as e:  # MediaError, a template failure, an unreadable input
            raise bad_request(str(e), "messages") from e
        prompt = Prompt(ids, media or None, self.reuse_boundary(ids), tools=bool(conversation.tools))
        if tool_choice not in (None, "auto") and not conversation.tools:
            raise bad_request("tool_choice needs tools", "tool_choice")
        if tool_choice == "none":
            prompt.banned = [self._tool_call_id]
        elif tool_choice == "required" or isinstance(tool_choice, dict):
            name = tool_choice.get("name") if isinstance(tool_choice, dict) else None
            if name is not None and name not in conversation.tool_names:
                raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
            prompt.forced = "<|tool_call>" + (f"call:{name}{{" if name else "")
            prompt.ids = ids + self.processor.tokenizer.encode(prompt.forced, add_bos=False)
        elif tool_choice not in (None, "auto"):
            raise bad_request(f"unknown tool_choice {tool_choice!r}", "tool_choice")
        prompt.key = prefix_key(self.model, prompt.ids, prompt.media)
        return prompt

    def text_prompt(self, text: str) -> Prompt:
        """A raw prompt (no template): reuse works for a prompt that extends an earlier one."""
        ids = self.processor.encode(text, add_bos=True)
        return Prompt(ids, None, len(ids) - 1, key=list(ids), markup=False)

    def reuse_boundary(self, ids: list[int]) -> int:
        """Where a chat prompt's reusable prefix ends: before the closed thought channel of a non-thinking
        generation prompt, backed off to just after the last control token (the start of the model's turn, or
        the end of a tool response), so that the next turn's rendering (reply text after it) tokenizes the same."""
        end = len(ids)
        n = len(self._thought_closed)
        if ids[end - n:] == self._thought_closed:
            end -= n
        while end > 0 and ids[end - 1] not in self._control_ids:
            end -= 1
        return min(end, len(ids) - 1)

    # ---- generation -------------------------------------------------------------------------------------
    def check_fits(self, prompt: Prompt) -> None:
        if len(prompt.ids) + 1 > self.context_length:
            raise bad_request(f"the prompt is {len(prompt.ids)} tokens, which leaves no room for a reply in the "
                              f"model's context of {self.context_length} tokens", "messages",
                              "context_length_exceeded")

    def _processors(self, prompt: Prompt, settings: Sampling) -> list:
        processors = list(make_logits_processors(settings.repetition_penalty))
        if settings.presence_penalty or settings.frequency_penalty:
            # mlx-lm's additive penalties (over the last 20 tokens of the context, its default window)
            from mlx_lm.sample_utils import make_frequency_penalty, make_presence_penalty

            if settings.presence_penalty:
                processors.append(make_presence_penalty(settings.presence_penalty))
            if settings.frequency_penalty:
                processors.append(make_frequency_penalty(settings.frequency_penalty))
        if prompt.banned:
            banned = list(prompt.banned)

            def ban(tokens, logits):
                logits[:, banned] = -float("inf")
                return logits

            processors.append(ban)
        return processors

    @staticmethod
    async def _wait(request) -> None:
        async for _ in request.stream():
            pass

    async def _submit(self, prompt: Prompt, settings: Sampling):
        """Submit to the engine (after keeping the prompt's reusable prefix); (request, cached tokens)."""
        settings.check()
        self.check_fits(prompt)
        caches, cached = self.prefixes.fetch(prompt.key)
        start, media = cached, prompt.media
        if self.prefixes.enabled and prompt.boundary > cached:
            # the prefix up to the boundary alone first (the engine writes into the caches it is given: a copy)
            k = prompt.boundary
            head = self.engine.submit(prompt.ids[:k], max_tokens=1, media=media, keep_cache=True,
                                      prompt_cache=PromptCache(view_copy(caches), prompt.ids[:cached])
                                      if caches else None)
            try:
                await self._wait(head)
            except RuntimeError as e:  # the prefill failed (not the client's doing: media were checked before)
                raise APIError(500, f"prefill failed: {e.__cause__ or e}") from e
            finally:
                head.cancel()
            if head.cache is not None:
                self.prefixes.insert(prompt.key[:k], head.cache.caches)
                caches, start = view_copy(head.cache.caches), k
        stop_ids = list(self.processor.stop_token_ids)
        if prompt.tools and self._tool_response_id is not None:
            stop_ids.append(self._tool_response_id)
        sampler = None if settings.temperature == 0 else make_sampler(
            settings.temperature, settings.top_p, settings.top_k, settings.min_p, settings.seed)
        try:
            request = self.engine.submit(
                prompt.ids, max_tokens=settings.max_tokens, sampler=sampler,
                logits_processors=self._processors(prompt, settings), stop_token_ids=stop_ids, media=media,
                prompt_cache=PromptCache(caches, prompt.ids[:start]) if caches else None,
                top_logprobs=settings.top_logprobs)
        except ValueError as e:
            raise bad_request(str(e), "logprobs" if "log-probabilities" in str(e) else "messages") from e
        return request, cached

    async def generate(self, prompt: Prompt, settings: Sampling) -> AsyncIterator[Step | Finished]:
        """Steps as tokens arrive, then one Finished. Closing the iterator (a client that went away) cancels
        the generation."""
        request, cached = await self._submit(prompt, settings)
        tokenizer = self.processor.tokenizer
        detok = tokenizer.detokenizer()
        parser = OutputParser(settings.stop, markup=prompt.markup)
        parser.feed(prompt.forced)
        calls = 0
        try:
            async for n, token in aenumerate(request.stream()):
                deltas = parser.feed(detok.add(token))
                calls += sum(d.kind == "tool_call" for d in deltas)
                logprob = None
                if settings.top_logprobs is not None and n < len(request.logprobs):
                    logprob = self._logprob(token, request.logprobs[n])
                yield Step(deltas, logprob)
                if parser.stopped_by is not None:
                    request.cancel()
                    break
            deltas = parser.feed(detok.finalize()) + parser.finish()
            calls += sum(d.kind == "tool_call" for d in deltas)
            if deltas:
                yield Step(deltas)
        except RuntimeError as e:  # the engine failed this request (not the client's doing)
            raise APIError(500, f"generation failed: {e.__cause__ or e}") from e
        finally:
            request.cancel()
        if parser.stopped_by is not None:
            reason = "stop"
        elif request.finish_reason in ("length", "context"):
            reason = "length"
        else:
            reason = "tool_calls" if calls else "stop"
        yield Finished(reason, len(prompt.ids), len(request.tokens), cached, parser.stopped_by)

    def _logprob(self, token: int, entry) -> dict:
        logprob, top = entry
        decode = self.processor.tokenizer.decode

        def describe(tid: int, lp: float) -> dict:
            text = decode([tid])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {**describe(token, logprob), "top_logprobs": [describe(t, lp) for t, lp in top]}


async def aenumerate(iterator):
    n = 0
    async for item in iterator:
        yield n, item
        n += 1


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


async def in_thread(function, *args, **kwargs):
    return await asyncio.to_thread(function, *args, **kwargs)

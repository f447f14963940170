"""Continuous batching for serving: concurrent requests decode together, one token each per step.

    engine = BatchEngine(model, max_batch=8)
    engine.start()                                        # the step loop, in a daemon thread
    request = engine.submit(ids, max_tokens=128, stop_token_ids=processor.stop_token_ids,
                            sampler=make_sampler(0.7, seed=1))
    for token in request: ...                             # blocking, from any thread
    async for token in request.stream(): ...              # or from an asyncio event loop
    request.cancel()                                      # e.g. the client went away
    engine.stop()

Without `start()`, `engine.step()` does one unit of work (a prefill chunk, a decode step) on the caller's thread.

Each request is prefilled alone with our own path (`engine.prefill`: images and audio, bidirectional attention
within images, chunks that never split an image, an optional prompt cache holding a prefix of its ids). Text
prompts are prefilled one chunk per step, between the decode steps of the running requests. Its first token is
sampled from the prefill's logits, then it joins mlx-lm's `BatchGenerator`: its caches merge into mlx-lm's
left-padded batch caches and it decodes with the others; a finished or cancelled request leaves at the next
step. At temperature 0 each request gets the tokens it gets alone (exactly so in float32; in bfloat16 the batch
shapes and padding can change rounding, and with it a near-tie).

BatchGenerator's own prompt processing (one right-padded batched prefill) does not fit Gemma 4: it has no
media, no image-block attention, no prompt caches of ours. So it only ever sees one-token prompts with their
caches; its decode batching, per-request samplers, logits processors, stop sequences and cache extraction are
used as they are.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Sequence

import mlx.core as mx

from .cache import KVCache, RotatingKVCache
from .engine import media_after, prefill, reply_room
from .prompt_cache import PromptCache
from .sample import LogitsProcessor, Sampler, apply_logits_processors, make_sampler


@dataclass(eq=False)
class Request:
    """One generation. The engine fills `tokens` (generated ids; a stop token ends it but is not included)
    and sets `finish_reason` when it is done: "stop", "length" (max_tokens), "context" (the model's context is
    full, before max_tokens), "cancelled", or "error" (with `error`). With
    `top_logprobs` >= 0 it also fills `logprobs`: per token (its log-probability, [(id, log-probability)] of the
    `top_logprobs` most likely ids), from the distribution after the logits processors, before sampling."""

    ids: list[int]
    max_tokens: int
    limit: int  # max_tokens, or fewer when the context fills up first
    sampler: Callable
    logits_processors: list[LogitsProcessor]
    stop_token_ids: list[int]
    media: dict | None
    prompt_cache: PromptCache | None
    keep_cache: bool
    top_logprobs: int | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt ids that came from the prompt cache
    cache: PromptCache | None = None  # with keep_cache: the caches of ids + tokens fed, once finished
    _engine: "BatchEngine | None" = field(default=None, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _watchers: list = field(default_factory=list, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating (no-op once finished); the request leaves the batch at the next step."""
        self._engine.cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def __iter__(self) -> Iterator[int]:
        """Tokens as they are generated; blocks between them. Raises the request's error, if any."""
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.done or len(self.tokens) > seen)
                new, done = self.tokens[seen:], self.done
            seen += len(new)
            yield from new
            if done:
                self._raise_error()
                return

    async def stream(self) -> AsyncIterator[int]:
        """`__iter__` for asyncio: awaits the engine thread without blocking the event loop."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        watcher = lambda: loop.call_soon_threadsafe(ready.set)  # noqa: E731
        with self._cond:
            self._watchers.append(watcher)
        try:
            seen = 0
            while True:
                ready.clear()
                with self._cond:
                    new, done = self.tokens[seen:], self.done
                seen += len(new)
                for token in new:
                    yield token
                if done:
                    self._raise_error()
                    return
                await ready.wait()
        finally:
            with self._cond:
                self._watchers.remove(watcher)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error}") from self.error

    # ---- engine side ---------------------------------------------------------------------------
    def _emit(self, token: int | None = None, finish: str | None = None, error: BaseException | None = None,
              logprobs: mx.array | None = None):
        """Record a generated token (and its (V,) log-probabilities, when asked for) and/or the end."""
        entry = None
        if token is not None and self.top_logprobs is not None:
            entry = describe_logprobs(logprobs, token, self.top_logprobs)
        with self._cond:
            if self.done:
                return
            if token is not None:
                self.tokens.append(token)
                if entry is not None:
                    self.logprobs.append(entry)
            if finish is None and len(self.tokens) >= self.limit:
                finish = "length" if self.limit == self.max_tokens else "context"
            if finish is not None:
                self.finish_reason, self.error = finish, error
            self._cond.notify_all()
            watchers = list(self._watchers)
        for notify in watchers:
            notify()


def describe_logprobs(logprobs: mx.array, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the `top` most likely (id, log-probability), best first) from (V,)."""
    logprobs = logprobs.astype(mx.float32)
    best = mx.argsort(-logprobs)[:top] if top else mx.array([], dtype=mx.int32)
    values = logprobs[best]
    mx.eval(values, logprobs[token])
    return float(logprobs[token].item()), list(zip(best.tolist(), values.tolist()))


@dataclass
class _Prefill:
    """A request being prefilled: its cache and the ids still to feed."""

    request: Request
    cache: PromptCache
    rest: list[int]


class BatchEngine:
    """Continuous batching over one model (see the module docstring). Thread-safe: `submit`, `cancel` and
    the request's iterators may be called from any thread; `step` from one thread at a time (the loop thread
    after `start()`)."""

    def __init__(self, model, *, max_batch: int = 8, prefill_step_size: int = 512):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        from mlx_lm.generate import BatchGenerator

        self.model = model
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self._generator = BatchGenerator(model, completion_batch_size=max_batch, prefill_batch_size=max_batch,
                                         prefill_step_size=prefill_step_size)
        self._greedy = make_sampler()  # one shared default: a batch of greedy rows samples in one call
        self._decoding: dict[int, Request] = {}  # BatchGenerator uid -> request
        self._waiting: deque[Request] = deque()
        self._prefilling: _Prefill | None = None
        self._cancelled: set[Request] = set()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- API -----------------------------------------------------------------------------------
    def submit(self, ids: Sequence[int], *, max_tokens: int = 256, sampler: Callable | None = None,
               logits_processors: Sequence[LogitsProcessor] = (), stop_token_ids: Sequence[int] = (),
               media: dict | None = None, prompt_cache: PromptCache | None = None,
               keep_cache: bool = False, top_logprobs: int | None = None) -> Request:
        """Queue a generation of up to `max_tokens` ids after the prompt `ids`. `sampler`: logits (1, V) ->
        id (1,) (default greedy); `logits_processors`: `(tokens, logits) -> logits`, tokens = the prompt and the
        ids generated so far. `media`: processed image/audio arrays for prompts with placeholders (see
        `engine.prefill`). `prompt_cache`: caches holding a prefix of `ids` (the engine takes it over and
        prefills only the rest; media may be given for the whole prompt or only for the rest, see
        `engine.media_after`). `keep_cache`: leave the finished request's caches in `request.cache`.
        `top_logprobs`: record log-probabilities (see `Request`); None records none."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if top_logprobs is not None and top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        cache = prompt_cache or PromptCache.fresh(self.model)
        cached = len(cache.tokens)
        if cached and (cached >= len(ids) or ids[:cached] != cache.tokens):
            raise ValueError("the prompt cache must hold a proper prefix of the prompt's ids")
        media = media_after(self.model, ids, cached, media)
        limit = min(max_tokens, reply_room(self.model, cache, len(ids) - cached))  # ContextError before prefill
        request = Request(ids=ids, max_tokens=max_tokens, limit=limit, sampler=sampler or self._greedy,
                          logits_processors=list(logits_processors), stop_token_ids=list(stop_token_ids),
                          media=media, prompt_cache=cache, keep_cache=keep_cache,
                          top_logprobs=top_logprobs, _engine=self)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        with self._lock:
            if not request.done:
                self._cancelled.add(request)
                self._lock.notify_all()

    @property
    def active(self) -> int:
        """Requests queued, prefilling or decoding."""
        with self._lock:
            return len(self._waiting) + (self._prefilling is not None) + len(self._decoding)

    def start(self) -> None:
        """Run the step loop in a daemon thread until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-gemma4-batch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; unfinished requests end as cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in self._drain():
            request._emit(finish="cancelled")
        self._generator.close()

    def step(self) -> bool:
        """One unit of work: apply cancellations, feed one prefill chunk (a request joins the batch when its
        prefill ends), run one decode step of the batch. False when there was nothing to do."""
        self._apply_cancellations()
        worked = self._prefill_step()
        if self._decoding:
            self._decode_step()
            worked = True
        return worked

    # ---- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._has_work())
                if self._stopping:
                    return
            self.step()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding or self._cancelled)

    def _drain(self) -> list[Request]:
        with self._lock:
            pending = list(self._waiting) + list(self._decoding.values())
            if self._prefilling is not None:
                pending.append(self._prefilling.request)
            self._waiting.clear()
            self._prefilling = None
        if self._decoding:
            self._generator.remove(list(self._decoding))
            self._decoding.clear()
        return pending

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for request in cancelled:
                if request in self._waiting:
                    self._waiting.remove(request)
            if self._prefilling is not None and self._prefilling.request in cancelled:
                self._prefilling = None
        uids = [uid for uid, r in self._decoding.items() if r in cancelled]
        if uids:
            self._generator.remove(uids)
            for uid in uids:
                del self._decoding[uid]
        for request in cancelled:
            request._emit(finish="cancelled")

    def _prefill_step(self) -> bool:
        """Start the next waiting request's prefill if the batch has room, and feed one chunk of it."""
        with self._lock:
            if self._prefilling is None:
                if not self._waiting or len(self._decoding) >= self.max_batch:
                    return False
                request = self._waiting.popleft()
                cache, request.prompt_cache = request.prompt_cache, None  # the engine owns it from here on
                request.cached_tokens = len(cache.tokens)
                self._prefilling = _Prefill(request, cache, request.ids[len(cache.tokens):])
            job = self._prefilling
        try:
            if job.request.media:  # one call: the chunks must follow the images' boundaries
                chunk, job.rest = job.rest, []
            else:
                chunk, job.rest = job.rest[: self.prefill_step_size], job.rest[self.prefill_step_size:]
            logits = prefill(self.model, chunk, job.cache, self.prefill_step_size, job.request.media)
            if job.rest:
                job.cache.eval()
                return True
            self._join(job, logits)
        except Exception as e:  # a bad request (media, context) ends alone; the batch goes on
            job.request._emit(finish="error", error=e)
        with self._lock:
            self._prefilling = None
        return True

    def _join(self, job: _Prefill, logits: mx.array) -> None:
        """Sample the first token from the prefill's logits; unless that ends it, hand the request and its
        caches to the BatchGenerator with that token as a one-token prompt."""
        from mlx_lm.generate import StopSequences

        request = job.request
        history = mx.array([request.ids], dtype=mx.int32)
        if request.logits_processors:
            logits = apply_logits_processors(request.logits_processors, history, logits)
        token = int(request.sampler(logits.astype(mx.float32)).item())
        stops = token in request.stop_token_ids
        if stops or request.limit == 1:  # it ends here; its caches are kept before anyone sees it finished
            self._keep_cache(request, job.cache.caches, request.ids)
        if stops:
            return request._emit(finish="stop")
        request._emit(token, logprobs=(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0])
        if request.done:  # a one-token limit
            return
        (uid,) = self._generator.insert(
            [[token]], max_tokens=[request.limit - 1], caches=[job.cache.caches],
            all_tokens=[list(request.ids)], samplers=[request.sampler],
            logits_processors=[request.logits_processors],
            stop_sequences=[StopSequences([[t] for t in request.stop_token_ids])])
        self._decoding[uid] = request

    def _decode_step(self) -> None:
        try:
            responses = self._generator.next_generated()
        except Exception as e:  # the batch itself failed: every request in it ends with the error
            for request in self._drain():
                request._emit(finish="error", error=e)
            return
        for r in responses:
            request = self._decoding.get(r.uid)
            if request is None:
                continue
            if r.finish_reason is not None:  # caches kept before anyone sees it finished
                del self._decoding[r.uid]
                self._keep_cache(request, r.prompt_cache, r.all_tokens)
            if r.finish_reason == "stop":
                request._emit(finish="stop")
            else:  # the request itself tells "length" from "context"
                request._emit(r.token, logprobs=r.logprobs)

    def _keep_cache(self, request: Request, caches: list, tokens: list[int]) -> None:
        if request.keep_cache:
            # The batch hands back mlx-lm's caches; ours again (the sliding ones keep their last window).
            ours = [(RotatingKVCache if hasattr(c, "max_size") else KVCache).from_state(c.state) for c in caches]
            request.cache = PromptCache(ours, list(tokens))


__all__ = ["BatchEngine", "Request", "Sampler"]

"""`--draft-model`: requests run one at a time with speculative decoding (an MTP drafter, mlx_gemma4.speculative)
instead of on the BatchEngine. Same interface as `mlx_gemma4.batch.BatchEngine` (submit / cancel / active /
start / stop, the same `Request`), so the rest of the server does not tell them apart.

The BatchEngine spends one forward on one token of many requests; speculative decoding spends one forward on
several tokens of one request. Verifying the drafts of several requests in one batched forward would combine
the two; it is not done here, so with a drafter the requests queue (lossless: greedy answers are the same
tokens). Log-probabilities are not recorded on this path (a 400 asks for them).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Sequence

from ..batch import Request
from ..engine import media_after, reply_room
from ..prompt_cache import PromptCache
from ..sample import make_sampler
from ..speculative import check_num_draft_tokens, speculative_generate_step


class DraftEngine:
    """One request at a time, each with the drafter; the loop runs in a daemon thread after `start()`."""

    def __init__(self, model, drafter, *, num_draft_tokens: int = 4, prefill_step_size: int = 512):
        self.model, self.drafter = model, drafter
        self.num_draft_tokens = check_num_draft_tokens(num_draft_tokens)
        self.prefill_step_size = prefill_step_size
        self._waiting: deque[Request] = deque()
        self._current: Request | None = None
        self._cancelled: set[Request] = set()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, ids: Sequence[int], *, max_tokens: int = 256, sampler: Callable | None = None,
               logits_processors=(), stop_token_ids: Sequence[int] = (), media: dict | None = None,
               prompt_cache: PromptCache | None = None, keep_cache: bool = False,
               top_logprobs: int | None = None) -> Request:
        """As BatchEngine.submit (ValueError for what it refuses, and for top_logprobs)."""
        if top_logprobs is not None:
            raise ValueError("log-probabilities are not available with a draft model (speculative decoding)")
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        cache = prompt_cache or PromptCache.fresh(self.model)
        cached = len(cache.tokens)
        if cached and (cached >= len(ids) or ids[:cached] != cache.tokens):
            raise ValueError("the prompt cache must hold a proper prefix of the prompt's ids")
        media = media_after(self.model, ids, cached, media)
        limit = min(max_tokens, reply_room(self.model, cache, len(ids) - cached))  # ContextError before prefill
        request = Request(ids=ids, max_tokens=max_tokens, limit=limit, sampler=sampler or make_sampler(),
                          logits_processors=list(logits_processors), stop_token_ids=list(stop_token_ids),
                          media=media, prompt_cache=cache, keep_cache=keep_cache, _engine=self)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        with self._lock:
            if not request.done:
                self._cancelled.add(request)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._waiting) + (self._current is not None)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-gemma4-draft", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            pending, self._waiting = list(self._waiting), deque()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in pending:
            request._emit(finish="cancelled")

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._waiting)
                if self._stopping:
                    return
                request = self._current = self._waiting.popleft()
            try:
                self._generate(request)
            except Exception as e:  # a bad request (media, context) ends alone
                request._emit(finish="error", error=e)
            finally:
                with self._lock:
                    self._current = None
                    self._cancelled.discard(request)

    def _stopped(self, request: Request) -> bool:
        with self._lock:
            return self._stopping or request in self._cancelled

    def _generate(self, request: Request) -> None:
        cache, request.prompt_cache = request.prompt_cache, None
        request.cached_tokens = len(cache.tokens)
        if self._stopped(request):
            return request._emit(finish="cancelled")
        steps = speculative_generate_step(
            self.model, self.drafter, request.ids[len(cache.tokens):], cache, request.sampler,
            num_draft_tokens=self.num_draft_tokens, logits_processors=request.logits_processors,
            max_tokens=request.limit, prefill_step_size=self.prefill_step_size, media=request.media)
        finish = None
        try:
            for token in steps:
                if self._stopped(request):
                    finish = "cancelled"
                    break
                if token in request.stop_token_ids:
                    finish = "stop"
                    break
                if len(request.tokens) + 1 >= request.limit:  # the last one: caches kept before it is seen
                    steps.close()
                    self._keep(request, cache)
                request._emit(token)
                if request.done:
                    return
        finally:
            steps.close()  # the caches then hold exactly the tokens given out (speculative_generate_step's rule)
        self._keep(request, cache)
        request._emit(finish=finish or "stop")

    @staticmethod
    def _keep(request: Request, cache: PromptCache) -> None:
        if request.keep_cache and request.cache is None:
            request.cache = PromptCache(cache.caches, list(cache.tokens))


__all__ = ["DraftEngine"]

"""`--draft-model`: requests run one at a time with speculative decoding (an MTP drafter, mlx_gemma4.speculative)
instead of decoding in the BatchEngine's batch. A BatchEngine whose unit of work is a whole request (the same
queue, thread, `Request`, submit and cancel), so the rest of the server does not tell them apart.

The BatchEngine spends one forward on one token of many requests; speculative decoding spends one forward on
several tokens of one request. Verifying the drafts of several requests in one batched forward would combine
the two; it is not done here, so with a drafter the requests queue (lossless: greedy answers are the same
tokens). Log-probabilities are not recorded on this path (a 400 asks for them).
"""

from __future__ import annotations

from typing import Sequence

from ..batch import BatchEngine, Request, _Prefill
from ..prompt_cache import PromptCache
from ..speculative import check_num_draft_tokens, speculative_generate_step


class DraftEngine(BatchEngine):
    """BatchEngine's queue, thread, submit and cancellation; its unit of work is one whole request, generated
    with the drafter (nothing ever joins the decode batch)."""

    def __init__(self, model, drafter, *, num_draft_tokens: int = 4, prefill_step_size: int = 512):
        super().__init__(model, max_batch=1, prefill_step_size=prefill_step_size)
        self.drafter = drafter
        self.num_draft_tokens = check_num_draft_tokens(num_draft_tokens)

    def submit(self, ids: Sequence[int], *, top_logprobs: int | None = None, **kwargs) -> Request:
        """As BatchEngine.submit; ValueError for top_logprobs as well."""
        if top_logprobs is not None:
            raise ValueError("log-probabilities are not available with a draft model (speculative decoding)")
        return super().submit(ids, **kwargs)

    def _prefill_step(self) -> bool:
        """The next waiting request, generated to its end (or its cancellation)."""
        with self._lock:
            if self._prefilling is not None or not self._waiting:
                return False
            request = self._waiting.popleft()
            cache, request.prompt_cache = request.prompt_cache, None
            request.cached_tokens = len(cache.tokens)
            self._prefilling = job = _Prefill(request, cache, request.ids[len(cache.tokens):])
        try:
            self._generate(job)
        except Exception as e:  # a bad request (media, context) ends alone
            request._emit(finish="error", error=e)
        with self._lock:
            self._prefilling = None
        return True

    def _stopped(self, request: Request) -> bool:
        with self._lock:
            return self._stopping or request in self._cancelled

    def _generate(self, job: _Prefill) -> None:
        request, cache = job.request, job.cache
        steps = speculative_generate_step(
            self.model, self.drafter, job.rest, cache, request.sampler, num_draft_tokens=self.num_draft_tokens,
            logits_processors=request.logits_processors, max_tokens=request.limit,
            prefill_step_size=self.prefill_step_size, media=request.media)
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

"""Speculative decoding with an MTP drafter (mlx_gemma4.drafter): lossless, k drafted tokens per target forward.

One round, with the target's caches holding positions 0 .. p-1, t_p the last sampled token (not yet fed) and
h the target's final-normed hidden state at p - 1 (the one that predicted t_p):

  draft    the drafter proposes d_1 .. d_k from (t_p, h), reading the target's caches (positions < p)
  verify   the target runs [t_p, d_1 .. d_k] at positions p .. p+k in one forward: k + 1 next-token distributions
  accept   greedy: the drafts that equal the target's argmax, up to the first that does not; sampling: draft i is
           accepted with probability min(1, p_i(d_i) / q_i(d_i)) (q: the distribution it was drawn from), up to
           the first rejection, where the token is drawn from the normalized residual max(0, p_i - q_i)
           instead; when all k are accepted, one more token comes from the target's last distribution
  rollback the rejected positions leave every cache (`trim`, exact in the sliding-window caches too)

Every round yields the accepted drafts and one token of the target's own, so the output is distributed exactly as
the target's (greedy: token for token the same as decoding without a drafter). Sampling follows the sampler's
settings (temperature, top-k, top-p, min-p) on both models' logits, in float32; logits processors (repetition
penalty) see each position's own history. Reference: Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; transformers' `SinglePositionMultiTokenCandidateGenerator` for the drafter's hand-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx

from .cache import RotatingKVCache
from .drafter import check_pair, target_kv
from .engine import prefill, reply_room
from .prompt_cache import PromptCache
from .sample import LogitsProcessor, Sampler, apply_logits_processors

# Rejected positions are rolled back with the caches' trim, exact for this many after any write.
MAX_DRAFT_TOKENS = RotatingKVCache.rollback


@dataclass
class DraftStats:
    """Counts of one generation with a drafter."""

    proposed: int = 0  # tokens the drafter proposed
    accepted: int = 0  # of them, kept by the target
    target_steps: int = 0  # verification forwards of the target (each yields its accepted drafts + 1 token)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens generated per target forward after the prompt's (1.0 without drafting)."""
        return (self.accepted + self.target_steps) / self.target_steps if self.target_steps else 0.0

    def summary(self) -> str:
        return (f"drafts: {self.accepted}/{self.proposed} accepted ({100 * self.acceptance_rate:.0f}%), "
                f"{self.tokens_per_step:.2f} tokens/target step")


def check_num_draft_tokens(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS} (the rollback the "
                         f"sliding-window caches keep), got {k!r}")
    return k


def speculative_sampler(sampler) -> Sampler:
    """The sampler, which must expose its distribution (rejection sampling needs p and q, not only draws)."""
    if not isinstance(sampler, Sampler):
        raise ValueError("speculative decoding needs the sampling distribution: give temperature / top_k / top_p / "
                         "min_p / seed (mlx_gemma4.sample.Sampler), not a custom sampler callable")
    return sampler


def accept(target_logits: mx.array, drafts: mx.array, draft_logits: mx.array,
           sampler: Sampler) -> tuple[mx.array, mx.array]:
    """The acceptance rule, for B independent rows. target_logits (B, k+1, V): the target's logits at the k+1
    verified positions; drafts (B, k); draft_logits (B, k, V): the logits the drafts were drawn from (both after
    the same logits processors). Returns (accepted (B,): the number of leading drafts kept, next (B,): the token
    after them). Lazy."""
    k = drafts.shape[1]
    if sampler.greedy:
        best = mx.argmax(target_logits.astype(mx.float32), axis=-1)  # (B, k+1)
        accepted = mx.cumprod((drafts == best[:, :k]).astype(mx.int32), axis=1).sum(axis=1)
        return accepted, mx.take_along_axis(best, accepted[:, None], axis=1)[:, 0]
    p = mx.softmax(sampler.filtered_logits(target_logits), axis=-1)  # (B, k+1, V) float32
    q = mx.softmax(sampler.filtered_logits(draft_logits), axis=-1)  # (B, k, V)
    p_draft = mx.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = mx.random.uniform(shape=drafts.shape, key=sampler.next_key())
    kept = u * q_draft < p_draft  # probability min(1, p/q)
    accepted = mx.cumprod(kept.astype(mx.int32), axis=1).sum(axis=1)
    # after a rejection at i: the residual max(0, p_i - q_i), normalized by the draw; after k acceptances: p_k
    residual = mx.maximum(p[:, :k] - q, 0.0)
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p[:, :k])  # p = q (never rejected)
    chosen = mx.take_along_axis(mx.concatenate([residual, p[:, k:]], axis=1), accepted[:, None, None], axis=1)
    return accepted, mx.random.categorical(mx.log(chosen[:, 0]), axis=-1, key=sampler.next_key())


def draft(model, drafter, cache: PromptCache, token: mx.array, hidden: mx.array, k: int,
          choose) -> tuple[list[mx.array], list[mx.array]]:
    """The drafter's k proposals after `token` ((1,), at position p = cache.offset, not yet in the caches), from
    the target's hidden state at p - 1 ((1, 1, H)) and its caches. choose(logits (1, V), seen) -> (logits the
    proposal is drawn from, proposal (1,)), seen: the tokens after the cached ones ([token, d_1, ...]).
    Returns the proposals and the logits they were drawn from. Lazy."""
    position, kv = cache.offset, target_kv(model, cache.caches)
    drafts, draft_logits, t, h = [], [], token, hidden
    for _ in range(k):
        embeds = mx.concatenate([model.language_model.embed(t[:, None]), h.astype(model.dtype)], axis=-1)
        logits, h = drafter(embeds, kv, position)
        logits, t = choose(logits[:, -1], [token] + drafts)
        drafts.append(t)
        draft_logits.append(logits)
    return drafts, draft_logits


def speculative_generate_step(model, drafter, ids: Sequence[int], cache: PromptCache, sampler, *,
                              num_draft_tokens: int = 4, logits_processors: Sequence[LogitsProcessor] = (),
                              max_tokens: int = 256, prefill_step_size: int = 512, media: dict | None = None,
                              stats: DraftStats | None = None) -> Iterator[int]:
    """`engine.generate_step` with a drafter: the same contract (prefill `ids`, yield up to max_tokens ids,
    fewer when the context fills up; each yielded token except the last is in the caches, and no later one, when
    the caller stops), the same output distribution. `stats` (a DraftStats) is updated as rounds complete."""
    check_pair(drafter, model)
    k_max = check_num_draft_tokens(num_draft_tokens)
    sampler = speculative_sampler(sampler)
    stats = stats if stats is not None else DraftStats()
    max_tokens = min(max_tokens, reply_room(model, cache, len(ids)))

    def process(logits: mx.array, seen: list) -> mx.array:
        """(1, V) logits of the position after the cached tokens and `seen` ((1,) arrays), in float32."""
        if not logits_processors:
            return logits.astype(mx.float32)
        history = mx.array(cache.tokens, dtype=mx.int32)[None]
        tokens = mx.concatenate([history] + [t[:, None].astype(mx.int32) for t in seen], axis=1)
        return apply_logits_processors(logits_processors, tokens, logits)

    def run_round(token: mx.array, hidden: mx.array, k: int):
        """Draft k tokens after `token`, verify them; lazy (drafts (k,), accepted, next token, hidden states)."""
        def choose(logits: mx.array, seen: list) -> tuple[mx.array, mx.array]:
            logits = process(logits, seen)
            return logits, sampler(logits)

        drafts, draft_logits = draft(model, drafter, cache, token, hidden, k, choose)
        logits, hiddens = model(mx.concatenate([token] + drafts)[None], cache=cache.caches, return_hidden=True)
        seen = [token] + drafts
        target_logits = mx.stack([process(logits[:, i], seen[: i + 1]) for i in range(k + 1)], axis=1)
        if k == 0:
            return mx.zeros((0,), mx.int32), mx.zeros((1,), mx.int32), sampler(target_logits[:, 0]), hiddens
        accepted, next_token = accept(target_logits, mx.stack(drafts, axis=1), mx.stack(draft_logits, axis=1),
                                      sampler)
        return mx.concatenate(drafts), accepted, next_token, hiddens

    generated_before = len(cache.tokens) + len(ids)
    yielded = 0
    logits, hidden = prefill(model, ids, cache, prefill_step_size, media, return_hidden=True)
    token = sampler(process(logits, []))  # (1,): the next token, not yet in the caches
    pending = [int(token.item())]  # tokens not yet yielded: accepted drafts (in the caches), then `token`
    try:
        while True:
            remaining = max_tokens - yielded - len(pending)
            for value in pending:
                yielded += 1
                yield value
            if remaining <= 0:
                return
            # the round's accepted drafts and its own token must fit the tokens still allowed
            k = min(k_max, remaining - 1)
            drafts, accepted, next_token, hiddens = run_round(token, hidden, k)
            mx.eval(drafts, accepted, next_token, hiddens)
            a = int(accepted.item())
            trim(cache, k - a)
            kept = drafts.tolist()[:a]
            cache.tokens.extend([pending[-1]] + kept)
            stats.proposed, stats.accepted, stats.target_steps = (stats.proposed + k, stats.accepted + a,
                                                                  stats.target_steps + 1)
            token, hidden = next_token, hiddens[:, a:a + 1]
            pending = kept + [int(token.item())]
    finally:
        # a caller stopping early leaves in the caches the tokens it was given (the last may be missing), no more
        extra = len(cache.tokens) - generated_before - yielded
        if extra > 0:
            trim(cache, extra)
            del cache.tokens[-extra:]


def trim(cache: PromptCache, n: int) -> None:
    """Roll the last n positions back in every cache (the token list is the caller's)."""
    if n:
        for c in cache.caches:
            if c is not None:
                c.trim(n)

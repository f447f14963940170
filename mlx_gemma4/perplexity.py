"""Perplexity of a text, and how far a (quantized) model's next-token distribution is from a reference model's.

    python -m mlx_gemma4.perplexity --model e2b-4bit --text article.txt --reference google/gemma-4-E2B-it
    python -m mlx_gemma4.perplexity --model demo --quantize 4 --recipe mixed --text article.txt --reference demo

Perplexity is exp(mean negative log-likelihood) of every token of the text after the first, each predicted from all
the tokens before it (one pass through the KV cache, in chunks). With a reference model, the same positions give the
mean KL(reference || model) of the next-token distributions and how often both pick the same top token. Lower is
better for both; a good 4-bit checkpoint stays within a few percent of its source's perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx


@dataclass
class Evaluation:
    tokens: int  # predicted positions
    nll: float  # mean negative log-likelihood (nats)
    mean_kl: float | None = None  # KL(reference || model), mean over positions
    top1_agreement: float | None = None  # fraction of positions where both argmaxes agree
    reference_nll: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def reference_perplexity(self) -> float | None:
        return None if self.reference_nll is None else math.exp(self.reference_nll)


def log_probs(model, ids: Sequence[int] | mx.array, cache=None) -> mx.array:
    """(L, vocab) float32 next-token log-probabilities at every position of one sequence (through `cache`)."""
    ids = ids if isinstance(ids, mx.array) else mx.array([int(t) for t in ids])
    logits = model(ids.reshape(1, -1), cache=cache)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _kl_sum(reference: mx.array, other: mx.array) -> mx.array:
    return (mx.exp(reference) * (reference - other)).sum()


def kl_divergence(reference: mx.array, other: mx.array) -> float:
    """Mean over positions of KL(reference || other), both (L, vocab) log-probabilities."""
    return float(_kl_sum(reference, other)) / reference.shape[0]


def evaluate(model, sequences: Sequence[Sequence[int]], reference=None, chunk: int = 256) -> Evaluation:
    """Mean NLL of each sequence's tokens 1..n-1 (and KL / top-1 agreement against `reference`), all sequences
    pooled. Both models run the same chunks through their own caches, so only one chunk of logits each is held."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    nll, ref_nll, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    for seq in sequences:
        seq = [int(t) for t in seq]
        if len(seq) < 2:
            raise ValueError("every sequence needs at least 2 tokens (one to predict)")
        ids = mx.array(seq)
        cache = model.make_cache()
        ref_cache = reference.make_cache() if reference is not None else None
        for start in range(0, len(seq) - 1, chunk):
            end = min(start + chunk, len(seq) - 1)  # positions [start, end) predict tokens [start+1, end+1)
            lp = log_probs(model, ids[start:end], cache)
            targets = ids[start + 1:end + 1]
            step = [-mx.take_along_axis(lp, targets[:, None], axis=-1).sum()]
            if reference is not None:
                ref = log_probs(reference, ids[start:end], ref_cache)
                step.append(_kl_sum(ref, lp))
                step.append((mx.argmax(ref, axis=-1) == mx.argmax(lp, axis=-1)).sum())
                step.append(-mx.take_along_axis(ref, targets[:, None], axis=-1).sum())
            mx.eval(step)
            nll += float(step[0])
            if reference is not None:
                kl += float(step[1])
                agree += int(step[2])
                ref_nll += float(step[3])
            count += end - start
    if reference is None:
        return Evaluation(count, nll / count)
    return Evaluation(count, nll / count, kl / count, agree / count, ref_nll / count)


def text_ids(processor, text: str, max_tokens: int | None = None) -> list[int]:
    """<bos> + the text's tokens, cut to max_tokens in all."""
    if processor is None:
        raise ValueError("the model has no tokenizer: perplexity needs one to encode the text")
    ids = processor.encode(text, add_bos=True)
    return ids[:max_tokens] if max_tokens else ids


if __name__ == "__main__":  # the command line lives in cli.py
    from mlx_gemma4.cli import perplexity_main

    raise SystemExit(perplexity_main())

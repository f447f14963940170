"""Perplexity of a text, and how far a (quantized) model's next-token distribution is from a reference model's.

    python -m mlx_gemma4.perplexity --model e2b-4bit --text article.txt --reference google/gemma-4-E2B-it
    python -m mlx_gemma4.perplexity --model demo --quantize 4 --recipe mixed --text article.txt --reference demo

Perplexity is exp(mean negative log-likelihood) of every token of the text after the first, each predicted from all
the tokens before it (one pass through the KV cache, in chunks). With a reference model, the same positions give the
mean KL(reference || model) of the next-token distributions and how often both pick the same top token. Lower is
better for both; a good 4-bit checkpoint stays within a few percent of its source's perplexity.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
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


def _log_probs(model, ids: mx.array, cache) -> mx.array:
    logits = model(ids, cache=cache).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


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
        ids = mx.array([seq])
        cache = model.make_cache()
        ref_cache = reference.make_cache() if reference is not None else None
        for start in range(0, len(seq) - 1, chunk):
            end = min(start + chunk, len(seq) - 1)  # positions [start, end) predict tokens [start+1, end+1)
            lp = _log_probs(model, ids[:, start:end], cache)[0]
            targets = ids[0, start + 1:end + 1]
            step = [-mx.take_along_axis(lp, targets[:, None], axis=-1).sum()]
            if reference is not None:
                ref = _log_probs(reference, ids[:, start:end], ref_cache)[0]
                step.append((mx.exp(ref) * (ref - lp)).sum())
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma4.perplexity",
                                description="Perplexity of a text, and mean KL against a reference model.")
    p.add_argument("--model", required=True, help="checkpoint directory, Hub repo id, .gguf file or 'demo'")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--reference", help="reference model (e.g. the unquantized source): adds mean KL and top-1 "
                   "agreement")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--chunk", type=int, default=256, help="positions per forward pass")
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 5, 6, 8), default=None,
                   help="quantize --model at load time (as load(quantize=...)) before evaluating")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--recipe", default="uniform", help="quantization recipe (see mlx_gemma4.quant)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    args = p.parse_args(argv)
    from .loading import load

    try:
        text = Path(args.text).read_text(encoding="utf-8")
        model, processor = load(args.model, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size,
                                recipe=args.recipe)
        ids = text_ids(processor, text, args.max_tokens)
        reference = load(args.reference, dtype=args.dtype)[0] if args.reference else None
        result = evaluate(model, [ids], reference, chunk=args.chunk)
    except (FileNotFoundError, ValueError, OSError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens (mean NLL {result.nll:.5f})")
    if reference is not None:
        change = 100 * (result.perplexity / result.reference_perplexity - 1)
        print(f"reference perplexity {result.reference_perplexity:.4f} ({change:+.2f}%); mean KL vs reference "
              f"{result.mean_kl:.5f}, top-1 agreement {100 * result.top1_agreement:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

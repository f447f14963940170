"""Speculative decoding with an MTP drafter vs plain decoding (ours, and mlx-lm's plain decoding beside them).

    python benchmarks/speculative.py --model DIR --draft-model DIR [--ks 1,2,4,6] [--prompt-tokens 128]
        [--tokens 48] [--repeat 2] [--json out.json]

DIR: synthetic checkpoints at the published dimensions, e.g.
    python -m mlx_gemma4.synth --variant e2b --layers 10 --format hf --out /tmp/e2b-10
    python -m mlx_gemma4.synth --variant e2b-assistant --out /tmp/e2b-assistant

Random weights cannot show real acceptance, so the run measures the costs and reports:

  plain        decode tok/s of our generate_step (greedy), and of mlx-lm's own model of the checkpoint (its
               generate_step; mlx-lm's speculative decoding takes a standalone draft LM with its own cache, so it
               cannot run an MTP drafter, which reads the target's KV cache and hidden state)
  draft step   seconds per drafter proposal (k proposals after one prefill, divided by k), as a fraction of one
               plain target step
  round        seconds per speculative round with the real (random) drafter: k proposals, the (k+1)-token
               verification forward, the rollback of the rejected ones (it rejects ~all: 1 token per round)
  oracle       acceptance and tokens per target step with a drafter that knows the target (its own logits;
               tests/checkpoints/family.OracleDrafter): the machinery reaches its ceiling of k + 1
  projected    speedup over plain decoding at acceptance rate a from the measured costs:
               E[tokens per round] / (round seconds / plain step seconds), E = (1 - a^(k+1)) / (1 - a)

Everything runs in one process; plain decoding is measured again right before each k's runs and each ratio
uses that neighbour (conditions drift on a shared machine); the best of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9)


def timed_decode(tokens_iter) -> tuple[list[int], float]:
    """Tokens of a generator and the seconds from its first token to its last (decode only, no prefill)."""
    out, start = [], None
    for token in tokens_iter:
        if start is None:
            start = time.perf_counter()
        out.append(token)
    return out, time.perf_counter() - start


def measure(model, drafter, prompt: list[int], n: int, ks: list[int]) -> dict:
    import mlx.core as mx

    from checkpoints.family import OracleDrafter
    from mlx_gemma4.engine import generate_step, prefill
    from mlx_gemma4.prompt_cache import PromptCache
    from mlx_gemma4.sample import make_sampler
    from mlx_gemma4.speculative import DraftStats, draft, speculative_generate_step

    def plain_decode():
        return timed_decode(generate_step(model, prompt, PromptCache.fresh(model), make_sampler(), max_tokens=n))

    out = {"k": {}}
    for k in ks:
        plain, seconds = plain_decode()  # right before this k's runs: each ratio compares neighbours in time
        plain_step_s = seconds / (n - 1)
        cache = PromptCache.fresh(model)
        logits, hidden = prefill(model, prompt, cache, return_hidden=True)
        token = mx.argmax(logits, axis=-1)
        mx.eval(token, hidden)
        greedy = lambda logits, seen: (logits, mx.argmax(logits, axis=-1))  # noqa: E731
        mx.eval(draft(model, drafter, cache, token, hidden, k, greedy))  # warm-up
        start = time.perf_counter()
        for _ in range(4):
            mx.eval(draft(model, drafter, cache, token, hidden, k, greedy))
        draft_s = (time.perf_counter() - start) / (4 * k)

        stats = DraftStats()
        tokens, seconds = timed_decode(speculative_generate_step(model, drafter, prompt, PromptCache.fresh(model),
                                                                 make_sampler(), num_draft_tokens=k, max_tokens=n,
                                                                 stats=stats))
        assert tokens == plain, "speculative greedy output differs from plain decoding"
        round_s = seconds / stats.target_steps
        oracle_stats, cache = DraftStats(), PromptCache.fresh(model)
        oracle = OracleDrafter(drafter, model, cache.tokens)
        tokens = list(speculative_generate_step(model, oracle, prompt, cache, make_sampler(), num_draft_tokens=k,
                                                max_tokens=min(n, 4 * (k + 1) + 1), stats=oracle_stats))
        assert tokens == plain[: len(tokens)], "speculative greedy output (oracle drafter) differs from plain"
        out["k"][k] = {"plain_step_s": plain_step_s, "draft_s": draft_s, "round_s": round_s,
                       "real_acceptance": stats.acceptance_rate,
                       "oracle_acceptance": oracle_stats.acceptance_rate,
                       "oracle_tokens_per_step": oracle_stats.tokens_per_step}
    return out


def measure_mlx_lm(path: Path, prompt: list[int], n: int) -> float:
    """Seconds per greedy decode step of mlx-lm's model of the checkpoint (its generate_step)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(mx.float32)  # the same float32 compute as ours on the CPU backend
    mx.eval(model.parameters())
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    _, seconds = timed_decode(token for token, _ in steps)
    return seconds / (n - 1)


def projected(plain_step_s: float, round_s: float, k: int, a: float) -> float:
    return (1 - a ** (k + 1)) / (1 - a) / (round_s / plain_step_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--draft-model", required=True, type=Path)
    ap.add_argument("--ks", default="1,2,4,6")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np

    import mlx_gemma4  # noqa: F401  (optimized BLAS before mlx.core)
    from mlx_gemma4 import load, load_drafter

    ks = [int(k) for k in args.ks.split(",")]
    model, _ = load(args.model, dtype="float32")
    drafter = load_drafter(args.draft_model, model)
    vocab = model.text_config.vocab_size
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, vocab, args.prompt_tokens)]
    runs = [measure(model, drafter, prompt, args.tokens, ks) for _ in range(args.repeat)]
    best = {"k": {k: {f: (min if f.endswith("_s") else max)(r["k"][k][f] for r in runs) for f in runs[0]["k"][k]}
                  for k in ks}}
    best["plain_step_s"] = min(best["k"][k]["plain_step_s"] for k in ks)
    del model, drafter
    if not args.no_mlx_lm:
        try:
            best["mlx_lm_step_s"] = min(measure_mlx_lm(args.model, prompt, args.tokens) for _ in range(args.repeat))
        except ValueError as e:  # e.g. a reduced --vocab: mlx-lm's gemma4 has the real vocabulary built in
            print(f"(mlx-lm could not load {args.model}: {str(e)[:120]})")

    plain = best["plain_step_s"]
    print(f"model {args.model.name}, drafter {args.draft_model.name}: prompt {args.prompt_tokens} tokens, "
          f"{args.tokens} decoded, best of {args.repeat}, float32\n")
    print("| system | decode tok/s | s per target step |")
    print("|---|---|---|")
    print(f"| mlx-gemma4 plain | {1 / plain:.2f} | {plain:.4f} |")
    if "mlx_lm_step_s" in best:
        print(f"| mlx-lm plain (its generate_step) | {1 / best['mlx_lm_step_s']:.2f} | {best['mlx_lm_step_s']:.4f} |")
    print()
    head = " | ".join(f"a={a}" for a in ACCEPTANCE)
    print(f"| k | draft step / target step | round / target step | oracle acceptance | oracle tokens/step | "
          f"projected speedup {head} |")
    print("|---" * (5 + len(ACCEPTANCE)) + "|")
    for k in ks:
        r = best["k"][k]
        step = r["plain_step_s"]  # measured next to this k's rounds
        speedups = " | ".join(f"{projected(step, r['round_s'], k, a):.2f}x" for a in ACCEPTANCE)
        print(f"| {k} | {r['draft_s'] / step:.3f} | {r['round_s'] / step:.2f} | {100 * r['oracle_acceptance']:.0f}% | "
              f"{r['oracle_tokens_per_step']:.2f} | {speedups} |")
    if args.json:
        args.json.write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()

"""Quantization quality on real weights: every recipe on the demo model, side by side with mlx-lm's quant tools.

    python benchmarks/quant_quality.py [--rows all|ours|today|mlx-lm] [--tokens 1024] [--json out.json]

The demo model (Gemma 3 270M base, GGUF Q4_K_M dequantized to float32) is quantized in memory by each row's
method, then evaluated against float32 on the first --tokens tokens of tests/fixtures/quant_eval_text.txt
(perplexity, mean KL, top-1 agreement) and on the test suite's prompt set (mean KL). Bits per weight count every
weight matrix, embeddings included, with scales/biases and float matrices at 16 bits (mlx_gemma4.quant.budget).

Rows:
  today      MLX's min/max scales (what `load(quantize=)` did before mlx_gemma4.quant, and mlx-lm's convert)
  ours       mlx_gemma4.quant recipes (fitted, activation-weighted scales; AWQ; dynamic allocation)
  mlx-lm     mlx-lm's quant tools run on our model: GPTQ (mlx_lm.quant.gptq) and the gradient sensitivities of
             mlx_lm.quant.dynamic_quant spent by our allocator at the same budget as our dynamic recipe
             (mlx-lm's AWQ needs mlx-lm's own module layout and its DWQ a training set: not run here)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mlx_gemma4  # noqa: E402,F401  (preloads the optimized BLAS before mlx.core)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_gemma4 import load  # noqa: E402
from mlx_gemma4.compact import use_products  # noqa: E402
from mlx_gemma4.loading import model_from_weights  # noqa: E402
from mlx_gemma4.quant.plan import quantization_plan  # noqa: E402
from mlx_gemma4.runtime import RuntimePolicy  # noqa: E402
from mlx_gemma4.perplexity import evaluate, kl_divergence, log_probs, text_ids  # noqa: E402
from mlx_gemma4.quant import Recipe, budget, calibrate  # noqa: E402
from mlx_gemma4.quant.apply import quantize_model  # noqa: E402
from test_quant_demo import PROMPTS  # noqa: E402

FLOAT32 = RuntimePolicy.from_arguments("float32")
EVAL_TEXT = ROOT / "tests" / "fixtures" / "quant_eval_text.txt"


def build(ctx, bits, group_size, recipe):
    return model_from_weights(copy.deepcopy(ctx["config"]), dict(ctx["weights"]), policy=FLOAT32, quantize=bits,
                              group_size=group_size, recipe=recipe, processor=ctx["processor"])


def float_model(ctx):
    return model_from_weights(copy.deepcopy(ctx["config"]), dict(ctx["weights"]), policy=FLOAT32)


def calibration(ctx):
    return calibrate.calibration_batches(ctx["processor"], calibrate.calibration_text())


def mlx_lm_gptq(ctx, bits, group_size, fallback_bits):
    """mlx_lm.quant.gptq on our model: every nn.Linear by GPTQ, the rest (the embedding) min/max at fallback."""
    from mlx_lm.quant.gptq import gptq_quantize

    model = float_model(ctx)
    model, _ = gptq_quantize(model, calibration(ctx), bits, group_size, fallback_bits, group_size)
    use_products(model)
    return model


def mlx_lm_sensitivity_dynamic(ctx, group_size, target_bpw):
    """mlx_lm.quant.dynamic_quant's gradient sensitivities (4 -> 6 bits), spent by our allocator within the
    budget; fitted scales."""
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    model = float_model(ctx)
    sens = dict(estimate_sensitivities(model, calibration(ctx), 4, group_size, 6, group_size, batch_size=1))
    plan = quantization_plan(model, 4, group_size, "mixed")
    errors = {p: max(s, 0.0) for p, s in sens.items() if p.startswith("language_model.layers.")}
    plan.update(budget.allocate(model, plan, errors, target_bpw))
    paths = [path for path, m in model.named_modules() if hasattr(m, "to_quantized")]
    quantize_model(model, plan, calibrate.collect(model, calibration(ctx), paths))
    return model


ROWS = {
    "today": [
        ("8-bit g64 (min/max)", lambda c: build(c, 8, 64, "minmax")),
        ("4-bit uniform g64 (min/max)", lambda c: build(c, 4, 64, "minmax")),
        ("4-bit mixed g64 (min/max)", lambda c: build(c, 4, 64, "mixed-minmax")),
        ("4-bit mixed g32 (min/max)", lambda c: build(c, 4, 32, "mixed-minmax")),
    ],
    "ours": [
        ("8-bit g64", lambda c: build(c, 8, 64, "uniform")),
        ("4-bit uniform g64, unweighted", lambda c: build(c, 4, 64, Recipe(calibration=False))),
        ("4-bit uniform g64", lambda c: build(c, 4, 64, "uniform")),
        ("4-bit mixed g64", lambda c: build(c, 4, 64, "mixed")),
        ("4-bit awq g64", lambda c: build(c, 4, 64, "awq")),
        ("4-bit uniform g32", lambda c: build(c, 4, 32, "uniform")),
        ("4-bit mixed g32", lambda c: build(c, 4, 32, "mixed")),
        ("4-bit awq g32", lambda c: build(c, 4, 32, "awq")),
        ("4-bit dynamic g64 (mixed + 0.5 bpw)", lambda c: build(c, 4, 64, "dynamic")),
    ],
    "mlx-lm": [
        ("mlx-lm GPTQ 4-bit g64, embedding 4-bit", lambda c: mlx_lm_gptq(c, 4, 64, 4)),
        ("mlx-lm GPTQ 4-bit g64, embedding 8-bit", lambda c: mlx_lm_gptq(c, 4, 64, 8)),
        ("mlx-lm GPTQ 4-bit g32, embedding 8-bit", lambda c: mlx_lm_gptq(c, 4, 32, 8)),
        ("mlx-lm sensitivities, our allocation g64 (mixed + 0.5 bpw)",
         lambda c: mlx_lm_sensitivity_dynamic(c, 64, c["dynamic_bpw"])),
    ],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="all", choices=("all", *ROWS))
    p.add_argument("--only", default=None, help="row labels to run, separated by ';', in this order")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    reference, processor = load("demo", dtype="float32")
    ctx = {"config": reference.config, "weights": dict(tree_flatten(reference.parameters())),
           "processor": processor}
    ids = text_ids(processor, EVAL_TEXT.read_text(encoding="utf-8"), args.tokens)
    prompts = [processor.encode(t) for t in PROMPTS]
    prompt_refs = [log_probs(reference, t) for t in prompts]
    ref_nll = evaluate(reference, [ids]).nll
    ctx["dynamic_bpw"] = budget.plan_bits_per_weight(reference, quantization_plan(reference, 4, 64, "mixed")) + 0.5
    print(f"float32: perplexity {float(mx.exp(mx.array(ref_nll))):.3f} over {len(ids) - 1} tokens; "
          f"{budget.bits_per_weight(reference):.3f} bits per weight at 16-bit storage", flush=True)
    print("| weights | bits/weight | perplexity | vs float32 | mean KL | top-1 | prompt KL | quantize s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    groups = ROWS if args.rows == "all" else {args.rows: ROWS[args.rows]}
    selected = [(group, label, make) for group, rows in groups.items() for label, make in rows]
    if args.only:
        by_label = {label: (group, label, make) for group, label, make in selected}
        unknown = [label for label in args.only.split(";") if label not in by_label]
        if unknown:
            p.error(f"unknown rows {unknown}; known: {'; '.join(by_label)}")
        selected = [by_label[label] for label in args.only.split(";")]
    for group, label, make in selected:
        t = time.perf_counter()
        try:
            model = make(ctx)
        except ImportError as e:
            print(f"| {label} | skipped: {e} |", flush=True)
            continue
        seconds = time.perf_counter() - t
        r = evaluate(model, [ids], reference)
        kls = [kl_divergence(ref, log_probs(model, t)) for ref, t in zip(prompt_refs, prompts)]
        prompt_kl = sum(k * len(t) for k, t in zip(kls, prompts)) / sum(len(t) for t in prompts)
        row = {"group": group, "weights": label, "bits_per_weight": budget.bits_per_weight(model),
               "perplexity": r.perplexity, "increase": r.perplexity / r.reference_perplexity - 1,
               "mean_kl": r.mean_kl, "top1": r.top1_agreement, "prompt_kl": prompt_kl, "seconds": seconds}
        results.append(row)
        print(f"| {label} | {row['bits_per_weight']:.3f} | {r.perplexity:.3f} | {100 * row['increase']:+.1f}% | "
              f"{r.mean_kl:.4f} | {100 * r.top1_agreement:.1f}% | {prompt_kl:.4f} | {seconds:.0f} |", flush=True)
        del model
        if args.json:  # after every row: a long run stopped early keeps what it measured
            Path(args.json).write_text(json.dumps({"tokens": len(ids), "reference_nll": ref_nll, "rows": results},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

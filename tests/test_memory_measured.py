"""The memory planner's estimate against MLX's measured peak, on synthetic checkpoints our loader reads.

Each case writes a small random checkpoint with mlx_gemma4.synth (which also checks that the loader accepts
every tensor synth writes: load() refuses missing or unexpected tensors), loads it with the backend's compute
dtype, prefills `context` tokens in chunks, decodes a few tokens, and compares mx.get_peak_memory() (reset
after loading, with the weights still resident) with memory.estimate(...).total."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import checkpoints
from mlx_gemma4 import memory, synth
from mlx_gemma4.loading import load

import mlx.core as mx
from mlx.utils import tree_flatten


def _config(variant: str, **text_overrides) -> dict:
    from transformers import Gemma4TextConfig

    text = Gemma4TextConfig(**dict(checkpoints.TEXT_VARIANTS[variant], **text_overrides)).to_dict()
    return {"model_type": "gemma4", "text_config": text, "vision_config": None, "audio_config": None,
            "tie_word_embeddings": True}


CASES = {
    # PLE, KV sharing, double-wide MLP; weights dominate
    "e2b": (dict(hidden_size=256, intermediate_size=512, vocab_size=2048, vocab_size_per_layer_input=2048,
                 sliding_window=128, hidden_size_per_layer_input=64), 1024, 256, None),
    # dense with k=v global layers; attention scores dominate
    "31b": (dict(hidden_size=256, intermediate_size=512, vocab_size=2048, sliding_window=128), 2048, 512, None),
    # MoE, float and 4-bit banks; the expert path dominates
    "26b": (dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, vocab_size=2048,
                 sliding_window=64), 512, 128, None),
    "26b-q4": (dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, vocab_size=2048,
                    sliding_window=64), 512, 128, 4),
    # float32 compute with the weight matrices stored in bf16 (load(weights_dtype="bfloat16"))
    "e2b-bf16w": (dict(hidden_size=256, intermediate_size=512, vocab_size=2048, vocab_size_per_layer_input=2048,
                       sliding_window=128, hidden_size_per_layer_input=64), 1024, 256, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_within_10_percent_of_measured_peak(case, tmp_path):
    overrides, context, chunk, bits = CASES[case]
    config = _config(case.split("-")[0], **overrides)
    synth.write_checkpoint(config, tmp_path / "ckpt", bits=bits)
    gc.collect()
    baseline = mx.get_active_memory()  # arrays other tests in this process still hold
    weights_dtype = "bfloat16" if case.endswith("-bf16w") else None
    model, _ = load(tmp_path / "ckpt", weights_dtype=weights_dtype)
    dtype = str(model.dtype).replace("mlx.core.", "")
    weights_resident = sum(w.nbytes for _, w in tree_flatten(model.parameters()))
    mx.reset_peak_memory()

    cache = model.make_cache()
    tokens = np.random.default_rng(0).integers(3, config["text_config"]["vocab_size"], context)
    for start in range(0, context, chunk):
        logits = model(mx.array(tokens[start : start + chunk])[None], cache=cache, last_only=True)
        mx.eval(logits, [(c.keys, c.values) for c in cache if c is not None])
    token = int(mx.argmax(logits[0, -1]).item())
    for _ in range(3):
        logits = model(mx.array([[token]]), cache=cache, last_only=True)
        token = int(mx.argmax(logits[0, -1]).item())
    assert np.isfinite(np.array(logits)).all()
    peak = mx.get_peak_memory() - baseline

    est = memory.estimate(config, context, bits=bits, dtype=dtype, chunk=chunk, weights_dtype=weights_dtype)
    assert est.weights == pytest.approx(weights_resident, rel=0.02)
    kv_measured = sum(c.nbytes for c in cache if c is not None)
    assert kv_measured <= est.kv_cache  # the estimate includes the prefill chunk in flight in sliding layers
    assert est.total == pytest.approx(peak, rel=0.10), (
        f"estimate {est.total / 1e6:.1f} MB (weights {est.weights / 1e6:.1f}, kv {est.kv_cache / 1e6:.1f}, "
        f"activations {est.activations / 1e6:.1f}) vs measured peak {peak / 1e6:.1f} MB")

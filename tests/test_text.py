"""The text decoder against transformers (float32, eager attention) on the same tiny random weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import checkpoints
from mlx_gemma4 import load
from mlx_gemma4.cache import KVCache, RotatingKVCache

VARIANTS = list(checkpoints.TEXT_VARIANTS)
# Each variant in both config spellings; E2B and 26B also through Gemma4ForConditionalGeneration naming.
CASES = [(v, s, "causal_lm") for v in VARIANTS for s in ("published", "per_layer_config")] + [
    ("e2b", "per_layer_config", "conditional"), ("26b", "published", "conditional")]
PROMPT_LEN = 40  # > 2.5x the largest test window (16)
RTOL = 1e-4


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def pair(text_checkpoint):
    """(our model, transformers model) for a case, cached per module."""
    made = {}

    def get(variant, spelling="per_layer_config", wrapper="causal_lm"):
        key = (variant, spelling, wrapper)
        if key not in made:
            path = text_checkpoint(variant, spelling, wrapper)
            made[key] = (load(path, dtype="float32")[0], checkpoints.load_hf(path))
        return made[key]

    return get


def prompt(seed=0, length=PROMPT_LEN):
    return np.random.RandomState(seed).randint(3, checkpoints.VOCAB, (1, length))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("variant,spelling,wrapper", CASES)
def test_full_forward_matches_transformers(pair, variant, spelling, wrapper):
    ours, hf = pair(variant, spelling, wrapper)
    ids = prompt()
    out = ours(mx.array(ids))
    assert out.dtype == mx.float32 and out.shape == (1, PROMPT_LEN, checkpoints.VOCAB)
    assert rel_err(out, hf_logits(hf, ids)) < RTOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_and_decode_match_full_forward(pair, variant):
    """Chunks of odd sizes (some larger than the window), then token-by-token decode past the window."""
    ours, hf = pair(variant)
    ids = prompt(1, 48)
    ref = hf_logits(hf, ids)
    cache = ours.make_cache()
    pieces, pos = [], 0
    for size in [5, 1, 19, 3] + [1] * 20:
        pieces.append(np.array(ours(mx.array(ids[:, pos:pos + size]), cache=cache)))
        pos += size
    assert pos == ids.shape[1]
    assert rel_err(np.concatenate(pieces, axis=1), ref) < RTOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotating_cache_memory_is_bounded_by_the_window(pair, variant):
    """Sliding layers hold the window + 1 (the MTP drafters' history) plus a constant (rollback reserve and room),
    never the context."""
    ours, _ = pair(variant)
    cache = ours.make_cache()
    ours(mx.array(prompt(2, 30)), cache=cache)
    window = ours.config.text.sliding_window
    for _ in range(60):
        ours(mx.array([[7]]), cache=cache)
        for c in cache:
            if isinstance(c, RotatingKVCache):
                assert c.window == window and c.keys.shape[2] <= window + 1 + c.rollback + c.room
    assert len(cache) == ours.config.text.first_kv_shared_layer  # KV-shared layers have no cache
    for i, c in enumerate(cache):
        assert isinstance(c, RotatingKVCache if ours.config.text.layer_types[i] == "sliding_attention" else KVCache)
        assert c.offset == 90


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_only_prefill_equals_last_row(pair, variant):
    ours, _ = pair(variant)
    ids = mx.array(prompt(3))
    full = ours(ids)
    last = ours(ids, cache=ours.make_cache(), last_only=True)
    assert last.shape == (1, 1, checkpoints.VOCAB)
    assert rel_err(last, np.array(full[:, -1:])) < 1e-5


def greedy(model, ids, n):
    cache = model.make_cache()
    logits = model(mx.array(ids), cache=cache, last_only=True)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]))
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_transformers_generate(pair, variant):
    ours, hf = pair(variant)
    ids = prompt(4, 20)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert greedy(ours, ids, 32) == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_is_finite_and_as_close_as_transformers_own_bfloat16(text_checkpoint, pair, variant):
    """Random tiny models amplify rounding (transformers' own bf16 run is 0.3-1.0 relative off its float32
    run here), so the bar is: finite, and no further from float32 than transformers' bf16 is (+ margin)."""
    _, hf = pair(variant)
    path = text_checkpoint(variant)
    ours = load(path, dtype="bfloat16")[0]
    ids = prompt(5)
    out = ours(mx.array(ids))
    assert out.dtype == mx.bfloat16
    out = np.array(out.astype(mx.float32))
    assert np.isfinite(out).all()
    ref32 = hf_logits(hf, ids)
    ref16 = hf_logits(checkpoints.load_hf(path, dtype=torch.bfloat16), ids)
    assert rel_err(out, ref32) <= 1.5 * rel_err(ref16, ref32) + 0.02

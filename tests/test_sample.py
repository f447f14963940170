"""Sampling: greedy = argmax, seeds reproduce, filters never emit excluded tokens, processors compose."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.sample import (
    Sampler, apply_logits_processors, make_logits_processors, make_sampler, min_p_filter,
    repetition_penalty_processor, top_k_filter, top_p_filter,
)

V = 64


def _logits(seed=0, batch=3):
    return mx.array(np.random.default_rng(seed).normal(size=(batch, V)).astype(np.float32) * 3)


def _draw(sampler, logits, n=300):
    return np.stack([np.array(sampler(logits)) for _ in range(n)])  # (n, B)


def test_greedy_is_argmax_and_upcasts():
    logits = _logits().astype(mx.bfloat16)
    out = make_sampler(0.0)(logits)
    np.testing.assert_array_equal(np.array(out), np.argmax(np.array(logits.astype(mx.float32)), axis=-1))


def test_filters_run_in_float32():
    sampler = make_sampler(0.7, top_k=5)
    assert sampler.filtered_logits(_logits().astype(mx.float16)).dtype == mx.float32


def test_seed_reproduces_and_differs_between_seeds():
    logits = _logits()
    a = _draw(make_sampler(1.0, seed=7), logits, 50)
    b = _draw(make_sampler(1.0, seed=7), logits, 50)
    c = _draw(make_sampler(1.0, seed=8), logits, 50)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_top_k_never_emits_outside_k():
    logits = _logits()
    draws = _draw(make_sampler(1.5, top_k=4, seed=0), logits)
    top4 = np.argsort(-np.array(logits), axis=-1)[:, :4]
    for b in range(logits.shape[0]):
        assert set(draws[:, b]) <= set(top4[b])
        assert len(set(draws[:, b])) > 1  # it is still sampling


def test_top_p_keeps_smallest_nucleus():
    logits = _logits(1)
    p = 0.6
    probs = np.array(mx.softmax(logits, axis=-1))
    draws = _draw(make_sampler(1.0, top_p=p, seed=1), logits)
    for b in range(logits.shape[0]):
        order = np.argsort(-probs[b])
        n_keep = int(np.searchsorted(np.cumsum(probs[b][order]), p) + 1)
        nucleus = set(order[:n_keep])
        assert set(draws[:, b]) <= nucleus
        kept = np.isfinite(np.array(top_p_filter(logits, p))[b])
        assert set(np.nonzero(kept)[0]) == nucleus


def test_min_p_threshold():
    logits = _logits(2)
    probs = np.array(mx.softmax(logits, axis=-1))
    draws = _draw(make_sampler(1.0, min_p=0.1, seed=2), logits)
    for b in range(logits.shape[0]):
        allowed = set(np.nonzero(probs[b] >= 0.1 * probs[b].max())[0])
        assert set(draws[:, b]) <= allowed
        assert set(np.nonzero(np.isfinite(np.array(min_p_filter(logits, 0.1))[b]))[0]) == allowed


def test_top_k_filter_exact_and_disabled():
    logits = mx.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert np.isfinite(np.array(top_k_filter(logits, 2))).tolist() == [[False, True, False, True, False]]
    assert top_k_filter(logits, 0) is logits and top_p_filter(logits, 1.0) is logits


def test_temperature_sharpens_distribution():
    logits = _logits(3, batch=1)
    cold = _draw(make_sampler(0.05, seed=0), logits, 100)
    assert (cold[:, 0] == int(np.argmax(np.array(logits)))).mean() > 0.95


def test_repetition_penalty_matches_definition():
    logits = mx.array([[2.0, -2.0, 1.0, 0.5]])
    out = repetition_penalty_processor(2.0)(mx.array([[0, 1, 1]]), logits)
    np.testing.assert_allclose(np.array(out), [[1.0, -4.0, 1.0, 0.5]])


def test_processors_compose_in_order():
    logits = mx.array([[2.0, 1.0, 0.0]])
    ban_first = lambda tokens, x: mx.concatenate([mx.full((1, 1), -mx.inf), x[:, 1:]], axis=-1)  # noqa: E731
    double = lambda tokens, x: x * 2  # noqa: E731
    procs = [*make_logits_processors(repetition_penalty=4.0), double, ban_first]
    out = apply_logits_processors(procs, mx.array([[1]]), logits)
    np.testing.assert_allclose(np.array(out), [[-np.inf, 0.5, 0.0]])
    assert make_logits_processors(None) == [] and make_logits_processors(1.0) == []


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)
    with pytest.raises(ValueError, match="repetition_penalty"):
        repetition_penalty_processor(0.0)

"""The MoE router's top-k (moe.route_top_k, moe.Router) against transformers' Gemma4TextRouter and by hand."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

import checkpoints
from mlx_gemma4.config import TextConfig
from mlx_gemma4.moe import Router, route_top_k


def by_expert(indices, weights) -> list[dict[int, float]]:
    """Per token {expert: weight}: route_top_k does not sort the k experts, so compare them as maps."""
    return [dict(zip(map(int, i), map(float, w))) for i, w in zip(np.array(indices), np.array(weights))]


def test_top_k_by_hand():
    scores = mx.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    per_expert_scale = mx.array([1.0, 0.5, 2.0, 1.0])
    indices, weights = route_top_k(scores, 2, per_expert_scale)
    assert indices.dtype == mx.int32 and weights.dtype == mx.float32 and indices.shape == (2, 2)
    e = np.exp
    expected = [{1: e(3) / (e(3) + e(2)) * 0.5, 3: e(2) / (e(3) + e(2))},  # softmax over all, top 2 renormalized
                {0: e(5) / (e(5) + e(4)), 3: e(4) / (e(5) + e(4))}]
    for got, want in zip(by_expert(indices, weights), expected):
        assert got.keys() == want.keys()
        for expert in want:
            assert got[expert] == pytest.approx(want[expert], rel=1e-6)


def test_top_1_and_all_experts():
    scores = mx.array(np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32))
    ones = mx.ones((6,))
    indices, weights = route_top_k(scores, 1, ones)
    np.testing.assert_array_equal(np.array(indices)[:, 0], np.argmax(np.array(scores), axis=-1))
    np.testing.assert_allclose(np.array(weights), 1.0, rtol=1e-6)
    indices, weights = route_top_k(scores, 6, ones)  # every expert: the full softmax
    probs = np.exp(np.array(scores)) / np.exp(np.array(scores)).sum(-1, keepdims=True)
    for row, got in enumerate(by_expert(indices, weights)):
        assert sorted(got) == list(range(6))
        np.testing.assert_allclose([got[j] for j in range(6)], probs[row], rtol=1e-5)


def test_router_matches_transformers():
    text = dict(checkpoints.TEXT_VARIANTS["26b"])
    hf_config = Gemma4TextConfig(**text)
    torch.manual_seed(0)
    reference = Gemma4TextRouter(hf_config).float().eval()
    with torch.no_grad():
        reference.proj.weight.normal_()
        reference.scale.copy_(1 + 0.3 * torch.randn_like(reference.scale))
        reference.per_expert_scale.copy_(1 + 0.3 * torch.randn_like(reference.per_expert_scale))
    router = Router(TextConfig.from_dict(text))
    router.load_weights([(name, mx.array(p.detach().numpy())) for name, p in reference.named_parameters()])
    x = np.random.default_rng(1).standard_normal((40, text["hidden_size"])).astype(np.float32)  # (T, H)
    indices, weights = router(mx.array(x))
    with torch.no_grad():
        _, ref_weights, ref_indices = reference(torch.from_numpy(x))
    assert indices.shape == (40, text["top_k_experts"])
    for got, want in zip(by_expert(indices, weights), by_expert(ref_indices.numpy(), ref_weights.numpy())):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-7)

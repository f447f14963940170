"""Recording the MoE router's expert choices (mlx_gemma4.expert_trace) against transformers' router top-k."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import load
from mlx_gemma4.expert_trace import moe_layers, record_expert_choices

import checkpoints

PROMPT = [2, 17, 301, 45, 99, 12, 7, 250, 3, 88, 140]


@pytest.fixture(scope="module")
def moe_model(text_checkpoint):
    path = text_checkpoint("26b")
    model, _ = load(path, dtype="float32")
    return path, model


def hf_router_choices(path) -> dict[int, np.ndarray]:
    import torch

    hf = checkpoints.load_hf(path)
    seen: dict[int, np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        if getattr(layer, "router", None) is not None:
            hooks.append(layer.router.register_forward_hook(
                lambda mod, inp, out, i=i: seen.__setitem__(i, out[2].detach().numpy())))
    with torch.no_grad():
        hf(torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    return seen


def test_recorded_choices_match_transformers_router(moe_model):
    path, model = moe_model
    with record_expert_choices(model) as trace:
        mx.eval(model(mx.array([PROMPT[:6]]), cache=(cache := model.make_cache())))
        mx.eval(model(mx.array([PROMPT[6:]]), cache=cache))  # a second call appends after the first
    assert all(model.language_model.layers[i].router.observer is None for i in moe_layers(model))  # removed on exit
    reference = hf_router_choices(path)
    assert trace.layers == sorted(reference) == moe_layers(model)
    assert trace.num_tokens == len(PROMPT)
    for layer in trace.layers:
        ours = trace.choices(layer)
        assert ours.shape == (len(PROMPT), model.text_config.top_k_experts)
        # top-k order is unspecified; the chosen set per token must be identical
        np.testing.assert_array_equal(np.sort(ours, axis=1), np.sort(reference[layer], axis=1))
    usage = trace.usage()
    assert usage.shape == (len(trace.layers), model.text_config.num_experts)
    assert (usage.sum(axis=1) == len(PROMPT) * model.text_config.top_k_experts).all()
    tail = trace.token_map(trace.layers[0], start=6)
    assert tail.shape == (len(PROMPT) - 6, model.text_config.num_experts)
    assert (tail.sum(axis=1) == model.text_config.top_k_experts).all()


def test_recording_errors(moe_model, text_checkpoint):
    _, model = moe_model
    with record_expert_choices(model) as trace:
        with pytest.raises(RuntimeError, match="already being recorded"):
            with record_expert_choices(model):
                pass
        with pytest.raises(ValueError, match="has no router"):
            trace.choices(0 if 0 not in trace.layers else 10**6)
    dense, _ = load(text_checkpoint("e2b"))
    with pytest.raises(ValueError, match="no mixture-of-experts"):
        with record_expert_choices(dense):
            pass

"""Gemma 3 text checkpoints run on the same decoder, configured (norm offset, query_pre_attn_scalar, no
v-norm, no soft-capping, plain RoPE on global layers), equal to transformers' Gemma3ForCausalLM."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import checkpoints
from mlx_gemma4 import load


@pytest.fixture(scope="module", params=[None, {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}],
                ids=["plain", "linear-rope"])
def gemma3(request, tmp_path_factory):
    path = checkpoints.make_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3"), extra=request.param)
    return load(path)[0], checkpoints.load_hf_gemma3(path)


def test_gemma3_forward_and_incremental_decode_match_transformers(gemma3):
    ours, hf = gemma3
    assert ours.config.text.norm_offset == 1.0
    ids = np.random.RandomState(0).randint(3, checkpoints.VOCAB, (1, 30))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    full = np.array(ours(mx.array(ids)))
    assert np.abs(full - ref).max() / np.abs(ref).max() < 1e-4
    cache = ours.make_cache()
    steps = [np.array(ours(mx.array(ids[:, :11]), cache=cache))]
    steps += [np.array(ours(mx.array(ids[:, i:i + 1]), cache=cache)) for i in range(11, 30)]
    assert np.abs(np.concatenate(steps, 1) - ref).max() / np.abs(ref).max() < 1e-4

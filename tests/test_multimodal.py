"""End to end: prompts with audio (and images) through our model equal transformers' logits and greedy tokens."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import checkpoints
from mlx_gemma4 import load
from mlx_gemma4.processing.audio import AudioFeatureExtractor

T = checkpoints.MM_TOKEN_IDS


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """A harmonic tone with a syllable-rate envelope and noise: energy across many mel bins."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 140 + 30 * np.sin(2 * np.pi * 3 * t)
    tone = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * tone * envelope + 0.01 * rng.randn(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def audio_pair(tmp_path_factory):
    path = checkpoints.make_audio_checkpoint(tmp_path_factory.mktemp("e2b-audio"))
    return load(path)[0], checkpoints.load_hf(path)


def audio_prompt(clips):
    """Text, then each clip's <boa> + N placeholders + <eoa>, interleaved with text tokens."""
    feats = AudioFeatureExtractor()(clips)
    ids = [2, 10, 11]
    for n in feats.num_soft_tokens:
        ids += [T["boa_token_id"]] + [T["audio_token_id"]] * n + [T["eoa_token_index"], 12, 13]
    return np.array([ids]), feats


def test_audio_prompt_logits_and_greedy_match_transformers(audio_pair):
    ours, hf = audio_pair
    ids, feats = audio_prompt([speechlike(0.37, 0), speechlike(0.21, 1)])
    inputs = dict(input_features=feats.features, input_features_mask=feats.mask)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), input_features=torch.tensor(feats.features),
                 input_features_mask=torch.tensor(feats.mask)).logits.numpy()
    prepared = ours.prepare_inputs(ids, **inputs)
    out = np.array(ours(**prepared.span(0, prepared.length)))
    assert rel_err(out, ref) < 1e-4

    # Chunked prefill then greedy decoding equals transformers' generate.
    cache = ours.make_cache()
    for a, b in prepared.chunks(7):
        logits = ours(**prepared.span(a, b), cache=cache)
    tokens = []
    for _ in range(16):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = ours(mx.array([[tokens[-1]]]), cache=cache)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor(ids), input_features=torch.tensor(feats.features),
                          input_features_mask=torch.tensor(feats.mask), max_new_tokens=16, do_sample=False)
    assert tokens == gen[0, ids.shape[1]:].tolist()


def test_audio_placeholder_count_mismatch_is_a_clear_error(audio_pair):
    ours, _ = audio_pair
    ids, feats = audio_prompt([speechlike(0.3, 2)])
    ids = ids[:, :-4]  # drop some placeholders
    with pytest.raises(ValueError, match="audio features and placeholders do not match"):
        ours.prepare_inputs(ids, input_features=feats.features, input_features_mask=feats.mask)
    with pytest.raises(ValueError, match="no audio input was given"):
        ours.prepare_inputs(ids)


def test_audio_on_a_model_without_audio_tower_is_a_clear_error(text_checkpoint):
    model = load(text_checkpoint("26b"))[0]
    feats = AudioFeatureExtractor()([speechlike(0.2, 3)])
    with pytest.raises(ValueError, match="no audio tower"):
        model.prepare_inputs(np.array([[2, 5, 6]]), input_features=feats.features, input_features_mask=feats.mask)

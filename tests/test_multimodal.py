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


# ---- images (+ audio) ---------------------------------------------------------------------------

from PIL import Image  # noqa: E402

from mlx_gemma4.processing.image import ImageProcessor  # noqa: E402


def picture(w, h, seed, mode="RGB"):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    img = np.clip(img + rng.randint(-20, 20, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img).convert(mode)


def mm_prompt(n_image_tokens, n_audio_tokens=()):
    """text, image blocks, text, audio blocks, text; ids inside the tiny vocab."""
    ids = [2, 10, 11]
    for n in n_image_tokens:
        ids += [T["boi_token_id"]] + [T["image_token_id"]] * n + [T["eoi_token_id"], 20]
    for n in n_audio_tokens:
        ids += [T["boa_token_id"]] + [T["audio_token_id"]] * n + [T["eoa_token_index"], 21]
    return np.array([ids + [30, 31, 32]])


def hf_inputs(ids, images=None, audio=None):
    kw = {"input_ids": torch.tensor(ids)}
    if images is not None:
        kw["pixel_values"] = torch.tensor(images.pixel_values)
        kw["image_position_ids"] = torch.tensor(images.position_ids)
        mm = np.zeros_like(ids)
        mm[ids == T["image_token_id"]] = 1
        mm[ids == T["audio_token_id"]] = 3
        kw["mm_token_type_ids"] = torch.tensor(mm)
    if audio is not None:
        kw["input_features"] = torch.tensor(audio.features)
        kw["input_features_mask"] = torch.tensor(audio.mask)
    return kw


def our_inputs(images=None, audio=None):
    kw = {}
    if images is not None:
        kw.update(pixel_values=images.pixel_values, image_position_ids=images.position_ids)
    if audio is not None:
        kw.update(input_features=audio.features, input_features_mask=audio.mask)
    return kw


def check_prompt(ours, hf, ids, images=None, audio=None, chunk=9, n_new=16):
    """Full-prompt logits and chunked-prefill greedy decoding against transformers."""
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, images, audio)).logits.numpy()
    prepared = ours.prepare_inputs(ids, **our_inputs(images, audio))
    assert rel_err(ours(**prepared.span(0, prepared.length)), ref) < 1e-4
    cache = ours.make_cache()
    for a, b in prepared.chunks(chunk):
        logits = ours(**prepared.span(a, b), cache=cache)
    tokens = []
    for _ in range(n_new):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = ours(mx.array([[tokens[-1]]]), cache=cache)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = hf.generate(**hf_inputs(ids, images, audio), max_new_tokens=n_new, do_sample=False)
    assert tokens == gen[0, ids.shape[1]:].tolist()
    return prepared


def test_e2b_image_audio_and_text_prompt_matches_transformers(multimodal_checkpoint):
    path = multimodal_checkpoint("e2b", audio=True)
    ours, hf = load(path)[0], checkpoints.load_hf(path)
    images = ImageProcessor()([picture(61, 45, 0), picture(30, 90, 1, "L").convert("RGB")], max_soft_tokens=70)
    audio = AudioFeatureExtractor()([speechlike(0.33, 4)])
    ids = mm_prompt(images.num_soft_tokens, audio.num_soft_tokens)
    prepared = check_prompt(ours, hf, ids, images, audio)
    assert prepared.block_ids is None  # E2B keeps causal attention over images


@pytest.mark.parametrize("variant,window", [("26b", None), ("31b", None), ("31b", 160)],
                         ids=["26b-window-shorter-than-image", "31b-window-shorter", "31b-window-longer"])
def test_bidirectional_vision_attention_matches_transformers(multimodal_checkpoint, tmp_path, variant, window):
    """26B/31B: tokens of one image attend to each other both ways on sliding layers (AND the window), while
    full-attention layers stay causal. Chunks of 9 tokens would split images: the chunker must not."""
    if window is None:
        path = multimodal_checkpoint(variant)
    else:
        path = checkpoints.make_multimodal_checkpoint(tmp_path / "ck", variant, text_extra={"sliding_window": window})
    ours, hf = load(path)[0], checkpoints.load_hf(path)
    images = ImageProcessor()([picture(50, 40, 2), picture(40, 64, 3)], max_soft_tokens=70)
    ids = mm_prompt(images.num_soft_tokens)
    sliding = ours.config.text.sliding_window
    assert (max(images.num_soft_tokens) > sliding) == (window is None)
    prepared = check_prompt(ours, hf, ids, images)
    assert prepared.block_ids is not None and prepared.block_ids.max() == 1
    for a, b in prepared.chunks(9):  # never inside an image
        assert b == prepared.length or prepared.block_ids[b] < 0 or prepared.block_ids[b] != prepared.block_ids[b - 1]


def test_image_placeholders_must_match_features(multimodal_checkpoint):
    ours = load(multimodal_checkpoint("31b"))[0]
    images = ImageProcessor()([picture(50, 40, 2)], max_soft_tokens=70)
    ids = mm_prompt([images.num_soft_tokens[0] - 1])
    with pytest.raises(ValueError, match="image features and placeholders do not match"):
        ours.prepare_inputs(ids, **our_inputs(images))

"""Vision tower + embed_vision projection equal transformers' on the same random weights (float32).

Reference: Gemma4ForConditionalGeneration from tests/checkpoints/vision.py (tiny text decoder + tiny vision tower):
`model.vision_tower(...)` (Gemma4VisionModel) and `model.get_image_features(...)` (projected, split per image).
Our modules load the HF tensors `model.vision_tower.X` / `model.embed_vision.Y` under the same names with
strict=True. Inputs are real pictures through the image processor (batches of different sizes and budgets,
so padding, masking and pooling by position are exercised).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import checkpoints
from mlx_gemma4.processing.image import ImageProcessor
from mlx_gemma4.multimodal import MultimodalEmbedder
from mlx_gemma4.vision import VisionConfig, VisionTower, soft_tokens_per_image

REL_TOL = 1e-4
REFERENCE = Path("/work/shared/reference/gemma4")


def pictures(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((333, 517), (701, 129), (64, 64), (1, 400)):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        rgb = np.stack([230 * x, 200 * y, 128 + 90 * np.sin(25 * x * y + 3 * x)], -1) + rng.normal(0, 20, (h, w, 3))
        out.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return out


def load_ours(hf_model) -> tuple[VisionTower, MultimodalEmbedder, VisionConfig]:
    config = VisionConfig.from_dict(hf_model.config.vision_config.to_dict())
    tower = VisionTower(config)
    embed = MultimodalEmbedder(config.hidden_size, hf_model.config.text_config.hidden_size, config.rms_norm_eps)
    state = {k: mx.array(v.detach().numpy()) for k, v in hf_model.state_dict().items()}
    tower.load_weights([(k.removeprefix("model.vision_tower."), v) for k, v in state.items()
                        if k.startswith("model.vision_tower.")], strict=True)
    embed.load_weights([(k.removeprefix("model.embed_vision."), v) for k, v in state.items()
                        if k.startswith("model.embed_vision.")], strict=True)
    return tower, embed, config


def rel_err(ours: mx.array, theirs) -> float:
    ours, theirs = np.array(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module", params=[("e2b", "small"), ("31b", "large")], ids=["small-clipped", "large-std"])
def models(request):
    text_variant, vision_variant = request.param
    hf = checkpoints.make_multimodal_model(text_variant, vision_variant, seed=3)
    return hf, *load_ours(hf)


# (budget, pictures): a batch of 4 different shapes incl. a 1xN strip at 70, one picture at 140 (CPU time).
@pytest.mark.parametrize("budget,count", [(70, 4), (140, 1)])
def test_tower_and_projection_equal_transformers(models, budget, count):
    import torch

    hf, tower, embed, config = models
    features = ImageProcessor()(pictures(budget)[:count], max_soft_tokens=budget)
    pv, pos = torch.tensor(features.pixel_values), torch.tensor(features.position_ids)
    with torch.no_grad():
        hf_out = hf.model.get_image_features(pv, pos)  # runs model.vision_tower, then model.embed_vision
    hf_soft, hf_embeds = hf_out.last_hidden_state, hf_out.pooler_output

    soft = tower(mx.array(features.pixel_values), mx.array(features.position_ids))
    embeds = embed(soft)
    assert soft.shape == (sum(features.num_soft_tokens), config.hidden_size)
    assert [t.shape[0] for t in hf_embeds] == features.num_soft_tokens == soft_tokens_per_image(features.position_ids)
    err_soft = rel_err(soft, hf_soft)
    err_embed = rel_err(embeds, torch.cat(hf_embeds))
    print(f"budget {budget}: tower rel err {err_soft:.2e}, projected rel err {err_embed:.2e}")
    assert err_soft < REL_TOL
    assert err_embed < REL_TOL


def test_one_image_alone_equals_its_slice_of_a_batch(models):
    """Padding patches must not leak into real ones: an image's soft tokens don't depend on its batch mates."""
    _, tower, _, _ = models
    features = ImageProcessor()(pictures(1)[1:], max_soft_tokens=70)
    batch = np.array(tower(mx.array(features.pixel_values), mx.array(features.position_ids)))
    start = 0
    for i, n in enumerate(features.num_soft_tokens):
        alone = np.array(tower(mx.array(features.pixel_values[i:i + 1]), mx.array(features.position_ids[i:i + 1])))
        np.testing.assert_allclose(alone, batch[start:start + n], rtol=1e-4, atol=1e-4 * np.abs(batch).max())
        start += n


def test_clipping_and_standardize_are_exercised(models):
    """The random checkpoint has active clip bounds / standardization: turning them off changes the output."""
    hf, tower, _, config = models
    features = ImageProcessor()(pictures(2)[:2], max_soft_tokens=70)
    args = (mx.array(features.pixel_values), mx.array(features.position_ids))
    reference = np.array(tower(*args))
    if config.use_clipped_linears:
        linears = [m for _, m in tower.named_modules() if hasattr(m, "clipped") and m.clipped]
        assert linears and all(np.isfinite(float(m.input_max)) for m in linears)
        for m in linears:
            m.clipped = False
        try:
            changed = np.array(tower(*args))
        finally:
            for m in linears:
                m.clipped = True
    else:
        assert config.standardize
        saved = tower.std_scale
        tower.std_scale = mx.ones_like(saved)
        try:
            changed = np.array(tower(*args))
        finally:
            tower.std_scale = saved
    assert np.abs(changed - reference).max() > 1e-2 * np.abs(reference).max()


def test_parameter_names_match_hf_exactly(models):
    hf, tower, embed, _ = models
    from mlx.utils import tree_flatten

    hf_names = set(hf.state_dict())
    ours = {"model.vision_tower." + k for k, _ in tree_flatten(tower.parameters())}
    ours |= {"model.embed_vision." + k for k, _ in tree_flatten(embed.parameters())}
    assert ours == {k for k in hf_names if k.startswith(("model.vision_tower.", "model.embed_vision."))}


def test_config_from_published_configs():
    if not REFERENCE.exists():
        pytest.skip("reference configs not present on this machine")
    small = VisionConfig.from_dict(json.loads((REFERENCE / "config-e2b.json").read_text())["vision_config"])
    large = VisionConfig.from_dict(json.loads((REFERENCE / "config-31b.json").read_text())["vision_config"])
    assert (small.hidden_size, small.num_hidden_layers, small.head_dim, small.use_clipped_linears,
            small.standardize) == (768, 16, 64, True, False)
    assert (large.hidden_size, large.num_hidden_layers, large.head_dim, large.use_clipped_linears,
            large.standardize, large.rope_theta) == (1152, 27, 72, False, True, 100.0)


def test_config_rejects_unsupported_values():
    base = checkpoints.vision_config("small")
    for bad, match in [({"hidden_activation": "relu"}, "hidden_activation"),
                       ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type"),
                       ({"attention_bias": True}, "attention_bias"),
                       ({"model_type": "siglip_vision_model"}, "model_type"),
                       ({"head_dim": 18}, "divisible by 4"),
                       ({"num_key_value_heads": 3}, "multiple")]:
        with pytest.raises(ValueError, match=match):
            VisionConfig.from_dict(dict(base, **bad))


def test_tower_rejects_malformed_inputs():
    tower = VisionTower(VisionConfig.from_dict(checkpoints.vision_config("small")))
    good = ImageProcessor()(pictures(0)[:1], max_soft_tokens=70)
    pv, pos = mx.array(good.pixel_values), mx.array(good.position_ids)
    with pytest.raises(ValueError, match="pixel_values must be"):
        tower(pv[..., :100], pos)
    with pytest.raises(ValueError, match="position_ids must be"):
        tower(pv, pos[:, :10])
    with pytest.raises(ValueError, match="multiple of 9"):
        tower(pv[:, :100], pos[:, :100])
    with pytest.raises(ValueError, match="position table"):
        tower(pv, mx.where(pos >= 0, pos + 5000, pos))
    scrambled = np.array(good.position_ids)
    scrambled[0, 0] = (0, 40)  # a patch far outside the image's grid of cells
    with pytest.raises(ValueError, match="pooling cells"):
        tower(pv, mx.array(scrambled))


def test_bfloat16_weights_run_and_stay_close(models):
    """Checkpoints ship in bf16: the tower must run with bf16 weights (pooling/standardize kept in float32)."""
    hf, _, _, _ = models
    tower, embed, _ = load_ours(hf)
    features = ImageProcessor()(pictures(4)[:2], max_soft_tokens=70)
    args = (mx.array(features.pixel_values), mx.array(features.position_ids))
    reference = np.array(embed(tower(*args)))
    tower.set_dtype(mx.bfloat16)
    embed.set_dtype(mx.bfloat16)
    out = embed(tower(*args))
    assert out.dtype == mx.bfloat16
    err = np.abs(np.array(out.astype(mx.float32)) - reference).max() / np.abs(reference).max()
    assert np.isfinite(err) and err < 0.1, err


def test_video_frames_equal_transformers_video_features(models):
    """Video frames go through the same tower: compare with Gemma4Model.get_video_features."""
    import torch

    from mlx_gemma4.processing.video import VideoProcessor

    hf, tower, embed, _ = models
    frames = np.stack(pictures(5)[2:3] * 3)  # 3 frames of 64x64
    frames[1] = 255 - frames[1]
    video = VideoProcessor()(frames)
    pv, pos = torch.tensor(video.pixel_values), torch.tensor(video.position_ids)
    with torch.no_grad():
        theirs = hf.model.get_video_features(pv, pos, num_frames_per_video=torch.tensor([3])).pooler_output
    ours = embed(tower(mx.array(video.pixel_values), mx.array(video.position_ids)))
    theirs = torch.cat(theirs)  # split per video
    assert ours.shape[0] == video.num_soft_tokens
    assert rel_err(ours, theirs) < REL_TOL

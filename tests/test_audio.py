"""Audio tower + embed_audio parity with transformers (`Gemma4AudioModel`, `Gemma4Model.get_audio_features`) on
tiny random weights (tests/checkpoints/audio.py: norms 1 + 0.3*randn, per_dim_scale randn, finite clip bounds that
bite, a small logit cap and gradient-clipping bound), float32, 1e-4 relative."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoints
import mlx.core as mx
from mlx_gemma4.audio import AudioConfig, AudioTower, audio_soft_tokens, sanitize
from mlx_gemma4.multimodal import MultimodalEmbedder
from mlx_gemma4.processing.audio import AudioFeatureExtractor, num_audio_soft_tokens

torch = pytest.importorskip("torch")
from transformers import Gemma4AudioConfig, Gemma4Config  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4Model  # noqa: E402

RTOL = 1e-4

VARIANTS = {
    "tiny": {},
    # right context, chunk 3: windows see 3 frames back and 2 ahead
    "right_context": dict(attention_chunk_size=3, attention_context_left=4, attention_context_right=2),
    # chunk longer than half the window: the relative shift wraps rows (Transformer-XL reflow corner)
    "long_chunk": dict(attention_chunk_size=8, attention_context_left=2),
    "unclipped_gelu": dict(use_clipped_linears=False, hidden_act="gelu_pytorch_tanh", num_attention_heads=2),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def to_mlx(state_dict, prefix: str) -> dict:
    return {k[len(prefix):]: mx.array(v.detach().float().numpy()) for k, v in state_dict.items() if k.startswith(prefix)}


def hf_tower(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = Gemma4AudioModel(Gemma4AudioConfig(**checkpoints.tiny_audio_config(**overrides))).float().eval()
    checkpoints.randomize_audio_tower(model, seed)
    return model


def our_tower(hf_model) -> AudioTower:
    tower = AudioTower(AudioConfig.from_dict(hf_model.config.to_dict()))
    tower.load_weights(list(sanitize(to_mlx(hf_model.state_dict(), "")).items()), strict=True)
    return tower


def sound(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: a vibrato tone with harmonics, amplitude bursts and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    tone = sum(np.sin(k * phase) / k for k in range(1, 12))
    bursts = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(seed).normal(scale=0.02, size=t.shape)
    return (0.2 * tone * bursts + noise).astype(np.float32)


def batch_features(seed: int = 0):
    """Random log-mel-like features for 2 clips of 50 and 37 valid frames (padded batch)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 50, 128, generator=g) * 2.0 - 4.0
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 37:] = False
    features[1, 37:] = 0.0
    return features, mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tower_equals_transformers(variant):
    hf = hf_tower(**VARIANTS[variant])
    features, mask = batch_features()
    with torch.no_grad():
        ref = hf(features, mask)
    hidden, out_mask = our_tower(hf)(mx.array(features.numpy()), mx.array(mask.numpy()))
    np.testing.assert_array_equal(np.array(out_mask), ref.attention_mask.numpy())
    assert hidden.shape == tuple(ref.last_hidden_state.shape) == (2, 13, 24)
    assert rel_err(hidden, ref.last_hidden_state.numpy()) <= RTOL  # every position, padded ones included


def test_tower_without_mask_equals_all_valid():
    hf = hf_tower()
    features, _ = batch_features(seed=3)
    with torch.no_grad():
        ref = hf(features, torch.ones(features.shape[:2], dtype=torch.bool)).last_hidden_state.numpy()
    hidden, mask = our_tower(hf)(mx.array(features.numpy()))
    assert bool(np.array(mask).all()) and rel_err(hidden, ref) <= RTOL


def test_test_weights_exercise_clipping_cap_and_bounds():
    """Switching off each of clip bounds, gradient-clipping bound and logit cap in our tower moves the output
    away from transformers' by over 20x the parity tolerance: the parity tests would catch a missing one
    (measured: bounds 0.11, gradient clipping 0.09, logit cap 0.0044 relative)."""
    hf = hf_tower()
    features, mask = batch_features()
    with torch.no_grad():
        ref = hf(features, mask).last_hidden_state.numpy()
    feats, m = mx.array(features.numpy()), mx.array(mask.numpy())

    tower = our_tower(hf)
    assert rel_err(tower(feats, m)[0], ref) <= RTOL
    for _, module in tower.named_modules():
        if hasattr(module, "input_min"):
            module.input_min, module.output_min = mx.array(-np.inf), mx.array(-np.inf)
            module.input_max, module.output_max = mx.array(np.inf), mx.array(np.inf)
    assert rel_err(tower(feats, m)[0], ref) > 20 * RTOL

    for field_name, off in (("gradient_clipping", 1e10), ("attention_logit_cap", 1e6)):
        tower = our_tower(hf)
        setattr(tower.config, field_name, off)  # one config object shared by every submodule
        assert rel_err(tower(feats, m)[0], ref) > 20 * RTOL, field_name


@pytest.fixture(scope="module")
def hf_multimodal():
    """Gemma4Model (text e2b-like + tiny audio tower + embed_audio), float32, randomized."""
    config = Gemma4Config(text_config=checkpoints.TEXT_VARIANTS["e2b"], vision_config=None,
                          audio_config=checkpoints.tiny_audio_config())
    torch.manual_seed(0)
    model = Gemma4Model(config).float().eval()
    checkpoints.randomize_norms_and_scalars(model, 0)
    checkpoints.randomize_audio_tower(model.audio_tower, 0)
    return model


def load_ours(model):
    """Our tower + embedder from a transformers Gemma4Model's tensors, through `sanitize` (HF layout)."""
    weights = sanitize(to_mlx(model.state_dict(), ""))
    tower = AudioTower(AudioConfig.from_dict(model.config.audio_config.to_dict()))
    tower.load_weights([(k[len("audio_tower."):], v) for k, v in weights.items() if k.startswith("audio_tower.")],
                       strict=True)
    cfg = tower.config
    embedder = MultimodalEmbedder(cfg.output_proj_dims, model.config.text_config.hidden_size, cfg.rms_norm_eps)
    embedder.load_weights([(k[len("embed_audio."):], v) for k, v in weights.items() if k.startswith("embed_audio.")],
                          strict=True)
    return tower, embedder


def test_audio_features_equal_get_audio_features_on_sound(hf_multimodal):
    """Waveforms -> our features -> tower -> embed_audio equals Gemma4Model.get_audio_features on the
    same features; the valid soft tokens are exactly num_audio_soft_tokens per clip, in clip order."""
    clips = [sound(1.03), sound(0.61, seed=1)]
    feats = AudioFeatureExtractor()(clips)
    with torch.no_grad():
        ref = hf_multimodal.get_audio_features(torch.from_numpy(feats.features), torch.from_numpy(feats.mask),
                                               return_dict=True)
    ref_embeds, ref_mask = ref.pooler_output.numpy(), ref.attention_mask.numpy()
    tower, embedder = load_ours(hf_multimodal)
    hidden, mask = tower(mx.array(feats.features), mx.array(feats.mask))
    np.testing.assert_array_equal(np.array(mask), ref_mask)
    assert np.array(mask).sum(axis=1).tolist() == feats.num_soft_tokens == [num_audio_soft_tokens(len(c)) for c in clips]
    assert rel_err(hidden, ref.last_hidden_state.numpy()) <= RTOL
    embeds = embedder(hidden)
    assert embeds.shape == ref_embeds.shape and embeds.shape[-1] == 64
    assert rel_err(embeds, ref_embeds) <= RTOL

    tokens = audio_soft_tokens(tower, embedder, feats.features, feats.mask)
    assert tokens.shape == (sum(feats.num_soft_tokens), 64)
    assert rel_err(tokens, ref_embeds[ref_mask]) <= RTOL  # what HF scatters into the <|audio|> positions


def test_bfloat16_runs_close_to_float32(hf_multimodal):
    tower, embedder = load_ours(hf_multimodal)
    feats = AudioFeatureExtractor()([sound(0.3)])
    ref = np.array(audio_soft_tokens(tower, embedder, feats.features, feats.mask))
    tower.set_dtype(mx.bfloat16)
    embedder.set_dtype(mx.bfloat16)
    out = audio_soft_tokens(tower, embedder, mx.array(feats.features).astype(mx.bfloat16), feats.mask)
    assert out.dtype == mx.bfloat16 and np.isfinite(np.array(out.astype(mx.float32))).all()
    assert rel_err(out.astype(mx.float32), ref) < 0.1


# ---------------------------------------------------------------------------------------------------------
# Weights layout, config, bad input
# ---------------------------------------------------------------------------------------------------------


def test_sanitize_converts_hf_layout_once_with_any_prefix(hf_multimodal):
    sd = to_mlx(hf_multimodal.state_dict(), "")
    hf_keys = {f"model.{k}": v for k, v in sd.items() if k.startswith("audio_tower.")}
    once = sanitize(hf_keys)
    conv0 = "model.audio_tower.subsample_conv_projection.layer0.conv.weight"
    conv1 = "model.audio_tower.subsample_conv_projection.layer1.conv.weight"
    dw = "model.audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"
    assert hf_keys[conv0].shape == (128, 1, 3, 3) and once[conv0].shape == (128, 3, 3, 1)
    assert hf_keys[conv1].shape == (8, 128, 3, 3) and once[conv1].shape == (8, 3, 3, 128)
    assert hf_keys[dw].shape == (32, 1, 5) and once[dw].shape == (32, 5, 1)
    np.testing.assert_array_equal(np.array(once[dw])[:, :, 0], np.array(hf_keys[dw])[:, 0, :])
    twice = sanitize(once)
    assert all(np.array_equal(np.array(twice[k]), np.array(once[k])) for k in once)
    assert set(once) == set(hf_keys)


def test_parameter_names_are_hf_names(hf_multimodal):
    from mlx.utils import tree_flatten

    tower, embedder = load_ours(hf_multimodal)
    ours = {f"audio_tower.{k}" for k, _ in tree_flatten(tower.parameters())}
    ours |= {f"embed_audio.{k}" for k, _ in tree_flatten(embedder.parameters())}
    theirs = {k for k in hf_multimodal.state_dict() if k.startswith(("audio_tower.", "embed_audio."))}
    assert ours == theirs


# audio_config of google/gemma-4-E2B-it (shared/reference/gemma4/config-e2b.json)
PUBLISHED_AUDIO_CONFIG = {
    "_name_or_path": "", "architectures": None, "attention_chunk_size": 12, "attention_context_left": 13,
    "attention_context_right": 0, "attention_invalid_logits_value": -1000000000.0, "attention_logit_cap": 50.0,
    "chunk_size_feed_forward": 0, "conv_kernel_size": 5, "dtype": "bfloat16", "gradient_clipping": 10000000000.0,
    "hidden_act": "silu", "hidden_size": 1024, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_range": 0.02, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "model_type": "gemma4_audio", "num_attention_heads": 8, "num_hidden_layers": 12, "output_attentions": False,
    "output_hidden_states": False, "output_proj_dims": 1536, "problem_type": None, "residual_weight": 0.5,
    "return_dict": True, "rms_norm_eps": 1e-06, "subsampling_conv_channels": [128, 32], "use_clipped_linears": True,
}


def test_config_from_published_dict():
    cfg = AudioConfig.from_dict(PUBLISHED_AUDIO_CONFIG)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.output_proj_dims) == (1024, 12, 128, 1536)
    assert cfg.subsampling_conv_channels == [128, 32] and cfg.use_clipped_linears


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma3n_audio"}, "model_type"),
    ({"sscp_conv_kernel_size": [[3, 3], [3, 3]]}, "unsupported settings"),
    ({"hidden_act": "mish"}, "hidden_act"),
    ({"subsampling_conv_channels": [128, 32, 8]}, "subsampling_conv_channels"),
    ({"num_attention_heads": 7}, "divisible"),
    ({"attention_context_left": 0}, "attention_context_left"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        AudioConfig.from_dict({**PUBLISHED_AUDIO_CONFIG, **change})


def test_bad_tower_input():
    tower = AudioTower(AudioConfig.from_dict(checkpoints.tiny_audio_config()))
    with pytest.raises(ValueError, match="batch, frames, mel bins"):
        tower(mx.zeros((40, 128)))
    with pytest.raises(ValueError, match="feature_mask shape"):
        tower(mx.zeros((1, 40, 128)), mx.ones((1, 39), dtype=mx.bool_))
    with pytest.raises(ValueError, match="64 mel bins"):
        tower(mx.zeros((1, 40, 64)))
    with pytest.raises(ValueError, match="zero frames"):
        tower(mx.zeros((1, 0, 128)))


def test_saved_checkpoint_loads_by_hf_names(tmp_path):
    """A checkpoint written by transformers (model.audio_tower.*, model.embed_audio.*) loads through sanitize,
    and equals that checkpoint reloaded by transformers."""
    import json

    path = checkpoints.make_audio_checkpoint(tmp_path / "e2b-audio")
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    weights = sanitize({k[len("model."):]: v for k, v in weights.items()
                        if k.startswith(("model.audio_tower.", "model.embed_audio."))})
    config = json.loads((path / "config.json").read_text())
    tower = AudioTower(AudioConfig.from_dict(config["audio_config"]))
    tower.load_weights([(k[len("audio_tower."):], v) for k, v in weights.items() if k.startswith("audio_tower.")],
                       strict=True)
    embedder = MultimodalEmbedder(tower.config.output_proj_dims, config["text_config"]["hidden_size"],
                                  tower.config.rms_norm_eps)
    embedder.load_weights([(k[len("embed_audio."):], v) for k, v in weights.items() if k.startswith("embed_audio.")],
                          strict=True)
    feats = AudioFeatureExtractor()([sound(0.77, seed=2)])
    with torch.no_grad():
        ref = checkpoints.load_hf(path).model.get_audio_features(
            torch.from_numpy(feats.features), torch.from_numpy(feats.mask), return_dict=True)
    embeds = embedder(tower(mx.array(feats.features), mx.array(feats.mask))[0])
    assert rel_err(embeds, ref.pooler_output.numpy()) <= RTOL

"""Gemma 4 12B (`gemma4_unified`) against transformers on tiny random weights (tests/checkpoints/family.py):
the decoder, the encoder-free image and audio front ends, their processors, and the whole path through
load() / generate / the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

import checkpoints
from checkpoints import family
from mlx_gemma4 import load
from mlx_gemma4.config import ConfigError, ModelConfig
from mlx_gemma4.processing.unified import UnifiedAudioFeatureExtractor, UnifiedImageProcessor

T = checkpoints.MM_TOKEN_IDS
RTOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def pair(unified_chat_checkpoint):
    """(our model, our processor, transformers' model) for the multimodal 12B-like checkpoint."""
    model, processor = load(unified_chat_checkpoint, dtype="float32")
    return model, processor, family.load_hf_unified(unified_chat_checkpoint)


@pytest.fixture(scope="module")
def causal_lm_pair(tmp_path_factory):
    """The text-only Gemma4UnifiedForCausalLM layout (keys model.*, model_type gemma4_unified_text)."""
    path = family.make_unified_checkpoint(tmp_path_factory.mktemp("12b-causal"), wrapper="causal_lm")
    return load(path, dtype="float32")[0], family.load_hf_unified(path)


def prompt(seed=0, length=40):
    return np.random.RandomState(seed).randint(3, 480, (1, length))  # below the multimodal ids


def hf_logits(hf, ids, **media):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), **media).logits.float().numpy()


# ---- decoder ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["conditional", "causal_lm"])
def test_text_logits_match_transformers(pair, causal_lm_pair, layout):
    ours, hf = (pair[0], pair[2]) if layout == "conditional" else causal_lm_pair
    ids = prompt()
    out = ours(mx.array(ids))
    assert out.dtype == mx.float32 and out.shape == (1, 40, checkpoints.VOCAB)
    assert rel_err(out, hf_logits(hf, ids)) < RTOL


def test_chunked_prefill_and_decode_match_full_forward(pair):
    ours, _, hf = pair
    ids = prompt(1, 44)  # the window is 8: chunks and decode steps cross it several times
    ref = hf_logits(hf, ids)
    cache, pieces, pos = ours.make_cache(), [], 0
    for size in [5, 1, 13, 3] + [1] * 22:
        pieces.append(np.array(ours(mx.array(ids[:, pos:pos + size]), cache=cache)))
        pos += size
    assert pos == ids.shape[1]
    assert rel_err(np.concatenate(pieces, axis=1), ref) < RTOL


def greedy(model, inputs, n, chunk=None):
    cache = model.make_cache()
    spans = inputs.chunks(chunk) if chunk else [(0, inputs.length)]
    for a, b in spans:
        logits = model(**inputs.span(a, b), cache=cache)
    tokens = []
    for _ in range(n):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens


def test_greedy_equals_transformers_generate(pair):
    ours, _, hf = pair
    ids = prompt(4, 20)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert greedy(ours, ours.prepare_inputs(ids), 32) == ref[0, ids.shape[1]:].tolist()


# ---- processors ---------------------------------------------------------------------------------------------

def picture(height, width, seed):
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x * y / 50)], -1)
    return np.clip(base + rng.randint(-30, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def tone(seconds, seed):
    rng = np.random.RandomState(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.randn(t.size)).astype(np.float32)


def reference_image_module():
    """transformers' image_processing_gemma4_unified (real code), loaded with torchvision's resize replaced by
    the call torchvision makes for uint8 CPU tensors (interpolate, bicubic, antialias): torchvision cannot be
    installed beside this CPU torch (see test_processing_video.py). Only that import is stubbed, and only while
    the module loads."""
    import importlib.util

    import transformers.models.gemma4_unified as package

    name = "transformers.models.gemma4_unified._image_reference_for_tests"
    if name in sys.modules:
        return sys.modules[name]

    def resize(image, size, interpolation, antialias):
        return torch.nn.functional.interpolate(image[None], size=size, mode="bicubic", align_corners=False,
                                               antialias=antialias)[0]

    functional = SimpleNamespace(InterpolationMode=object, resize=resize)
    v2 = SimpleNamespace(functional=functional)
    stubs = {"torchvision": SimpleNamespace(transforms=SimpleNamespace(v2=v2)),
             "torchvision.transforms": SimpleNamespace(v2=v2), "torchvision.transforms.v2": v2,
             "torchvision.transforms.v2.functional": functional}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(name, f"{package.__path__[0]}/image_processing_gemma4_unified.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key)
            else:
                sys.modules[key] = value
    return module


def reference_images(images, budget):
    """Gemma4UnifiedImageProcessor._preprocess (real code, with TorchvisionBackend's rescale) on uint8 RGB arrays."""
    from transformers.image_processing_backends import TorchvisionBackend

    ref = reference_image_module()

    class Processor:
        aspect_ratio_preserving_resize = ref.Gemma4UnifiedImageProcessor.aspect_ratio_preserving_resize
        rescale_and_normalize = TorchvisionBackend.rescale_and_normalize
        rescale = TorchvisionBackend.rescale
        _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor

    tensors = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]
    out = ref.Gemma4UnifiedImageProcessor._preprocess(
        Processor(), tensors, do_resize=True, resample=None, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=False, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), return_tensors=None,
        patch_size=16, max_soft_tokens=budget, pooling_kernel_size=3)
    return out["pixel_values"].numpy(), out["image_position_ids"].numpy(), out["num_soft_tokens_per_image"]


@pytest.mark.parametrize("budget,sizes", [
    (70, [(200, 300), (96, 144)]),  # downscaled; upscaled
    (140, [(37, 911)]),  # a thin strip
    (280, [(480, 96), (144, 192)]),  # exact multiples of 48 px (no resize) next to a resized one
    (560, [(1000, 800)]),
])
def test_image_processor_equals_transformers(budget, sizes):
    images = [picture(h, w, i) for i, (h, w) in enumerate(sizes)]
    pixels, positions, counts = reference_images(images, budget)
    ours = UnifiedImageProcessor()(images, max_soft_tokens=budget)
    np.testing.assert_array_equal(ours.pixel_values, pixels)
    np.testing.assert_array_equal(ours.position_ids, positions)
    assert ours.num_soft_tokens == counts
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape[1:] == (budget, 48 * 48 * 3)


def test_audio_frames_and_token_counts_equal_transformers():
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    clips = [tone(0.37, 0), tone(0.04, 1), tone(1.0, 2)]  # 5920 samples (9.25 frames), exactly 1, exactly 25
    ref = Gemma4UnifiedAudioFeatureExtractor()(clips, return_tensors="np")
    ours = UnifiedAudioFeatureExtractor()(clips)
    np.testing.assert_array_equal(ours.features, ref["input_features"])
    np.testing.assert_array_equal(ours.mask, ref["input_features_mask"])
    stand_in = SimpleNamespace(feature_extractor=SimpleNamespace(audio_samples_per_token=640))
    assert ours.num_soft_tokens == [Gemma4UnifiedProcessor._compute_audio_num_tokens(stand_in, c, 16000)
                                    for c in clips] == [10, 1, 25]


def expected_prompt_ids(processor, tokenizer_dir, text, images, budget, clips):
    """The chat-template text with each placeholder replaced by transformers' Gemma4UnifiedProcessor
    replace_image_token / replace_audio_token (real methods), encoded by transformers' tokenizer."""
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    content = [{"type": "image"} for _ in images] + [{"type": "audio"} for _ in clips] + [{"type": "text",
                                                                                           "text": text}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}])
    tokens = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>",
                             boa_token="<|audio>", eoa_token="<audio|>", audio_token="<|audio|>")
    image_inputs = {"num_soft_tokens_per_image": reference_images(images, budget)[2]}
    audio_inputs = Gemma4UnifiedAudioFeatureExtractor()(clips, return_tensors="np")
    for kind, inputs, replace in (("image", image_inputs, Gemma4UnifiedProcessor.replace_image_token),
                                  ("audio", audio_inputs, Gemma4UnifiedProcessor.replace_audio_token)):
        parts = rendered.split(f"<|{kind}|>")
        rendered = parts[0] + "".join(replace(tokens, inputs, i) + part for i, part in enumerate(parts[1:]))
    return checkpoints.load_hf_tokenizer(tokenizer_dir).encode(rendered, add_special_tokens=False)


# ---- whole model with media ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media_prompt(pair):
    _, processor, _ = pair
    images = [picture(100, 150, 3), picture(96, 48, 4)]
    clips = [tone(0.3, 5), tone(0.1, 6)]
    ids, media = processor.prompt_inputs("Describe both.", images=images, audio=clips, max_soft_tokens=70)
    return images, clips, ids, media


def test_image_and_audio_prompt_ids_equal_transformers_processor(pair, media_prompt, unified_chat_checkpoint):
    _, processor, _ = pair
    images, clips, ids, media = media_prompt
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)

    assert ids == expected_prompt_ids(processor, unified_chat_checkpoint, "Describe both.", images, 70, clips)
    pixels, positions, _ = reference_images(images, 70)
    np.testing.assert_array_equal(media["pixel_values"], pixels)
    np.testing.assert_array_equal(media["image_position_ids"], positions)
    ref_audio = Gemma4UnifiedAudioFeatureExtractor()(clips, return_tensors="np")
    np.testing.assert_array_equal(media["input_features"], ref_audio["input_features"])
    np.testing.assert_array_equal(media["input_features_mask"], ref_audio["input_features_mask"])


def hf_media(ids, media):
    mm = np.zeros_like(ids)
    mm[ids == T["image_token_id"]] = 1
    return dict(pixel_values=torch.tensor(media["pixel_values"]),
                image_position_ids=torch.tensor(media["image_position_ids"]),
                input_features=torch.tensor(media["input_features"]),
                input_features_mask=torch.tensor(media["input_features_mask"]),
                mm_token_type_ids=torch.tensor(mm))


def test_image_and_audio_prompt_logits_and_greedy_match_transformers(pair, media_prompt):
    ours, _, hf = pair
    _, _, ids, media = media_prompt
    ids = np.array([ids])
    inputs = ours.prepare_inputs(ids, **media)
    assert inputs.block_ids is not None  # the image tokens attend to each other (bidirectional vision mask)
    out = ours(**inputs.span(0, inputs.length))
    ref = hf_logits(hf, ids, **hf_media(ids, media))
    assert rel_err(out, ref) < RTOL

    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor(ids), **hf_media(ids, media), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)
    # chunks of 7 tokens: longer than the window (8) only where an image block keeps a chunk whole
    assert greedy(ours, inputs, 12, chunk=7) == gen[0, ids.shape[1]:].tolist()


def test_media_changes_the_output_and_placeholders_must_match(pair, media_prompt):
    ours, _, _ = pair
    _, _, ids, media = media_prompt
    with_media = np.array(ours(**ours.prepare_inputs(np.array([ids]), **media).span(0, len(ids))))
    without = np.array(ours(mx.array([ids])))  # placeholders embed as padding
    assert rel_err(with_media, without) > 1e-2
    one_short = list(ids)
    one_short.remove(T["image_token_id"])
    with pytest.raises(ValueError, match="image features and placeholders do not match"):
        ours.prepare_inputs(np.array([one_short]), **media)


def test_generate_streams_the_same_tokens_as_manual_prefill(pair, media_prompt):
    from mlx_gemma4.generate import stream_generate

    ours, processor, _ = pair
    images, clips, ids, media = media_prompt
    tokens = [c.token for c in stream_generate(ours, processor, "Describe both.", images=images, audio=clips,
                                               max_soft_tokens=70, max_tokens=6, stop_token_ids=[],
                                               prefill_step_size=16)]
    assert tokens == greedy(ours, ours.prepare_inputs(np.array([ids]), **media), 6)


def test_generate_cli_with_image_and_audio_files(unified_chat_checkpoint, tmp_path):
    import soundfile
    from PIL import Image

    png, wav = tmp_path / "pic.png", tmp_path / "clip.wav"
    Image.fromarray(picture(120, 90, 7)).save(png)
    soundfile.write(wav, tone(0.5, 8), 16000)
    r = subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", "--model", str(unified_chat_checkpoint),
                        "--prompt", "What is this?", "--image", str(png), "--audio", str(wav), "--max-tokens", "4",
                        "--max-soft-tokens", "70"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "generation: 4 tokens" in r.stderr
    n_media = UnifiedImageProcessor()([picture(120, 90, 7)], 70).num_soft_tokens[0] + 25  # 0.5 s = 25 frames
    assert int(r.stderr.split("prompt: ")[1].split(" tokens")[0]) > n_media


def test_app_turn_with_image_and_audio_equals_generate(unified_chat_checkpoint, tmp_path):
    """The Gradio app's chat logic (apps/gemma4_app.py, in-process) on the 12B-like checkpoint."""
    pytest.importorskip("gradio", reason="the app needs gradio (pip install '.[app]')")
    import importlib.util

    import soundfile
    from PIL import Image

    from mlx_gemma4.generate import generate

    spec = importlib.util.spec_from_file_location("gemma4_app", ROOT / "apps" / "gemma4_app.py")
    app = importlib.util.module_from_spec(spec)
    sys.modules["gemma4_app"] = app  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(app)
    png, wav = tmp_path / "pic.png", tmp_path / "clip.wav"
    Image.fromarray(picture(80, 120, 9)).save(png)
    soundfile.write(wav, tone(0.3, 10), 16000)
    host = app.ModelHost()
    host.load(str(unified_chat_checkpoint))
    conv = app.Conversation()
    turn = app.Turn("what do you see and hear?", images=[str(png)], audios=[str(wav)])
    conv.turns.append(turn)
    list(app.respond(host, conv, turn, app.Settings(max_tokens=8, image_budget=70)))
    expected = generate(host.model, host.processor, turn.text, images=[str(png)], audio=[str(wav)], max_tokens=8,
                        max_soft_tokens=70)
    assert turn.error is None and turn.raw_reply == expected
    n_media = UnifiedImageProcessor()([picture(80, 120, 9)], 70).num_soft_tokens[0] + 15  # 0.3 s = 15 frames
    assert turn.generation_stats.prompt_tokens > n_media and turn.generation_stats.generation_tokens > 0


# ---- bad input ---------------------------------------------------------------------------------------------

def test_config_errors_name_the_problem():
    text = dict(family.UNIFIED_TEXT, model_type="gemma4_unified_text", global_head_dim=32)
    with pytest.raises(ConfigError, match="no per-layer embeddings or MoE"):
        ModelConfig.from_dict({"model_type": "gemma4_unified",
                               "text_config": dict(text, enable_moe_block=True, num_experts=4)})
    from mlx_gemma4.model import Gemma4

    bad_vision = dict(family.UNIFIED_VISION, model_type="gemma4_unified_vision", output_proj_dims=32)
    with pytest.raises(ConfigError, match="output_proj_dims .* must equal mm_embed_dim"):
        Gemma4(ModelConfig.from_dict({"model_type": "gemma4_unified", "text_config": text,
                                      "vision_config": bad_vision}))
    with pytest.raises(ConfigError, match="MTP drafter"):
        ModelConfig.from_dict({"model_type": "gemma4_unified_assistant", "text_config": text})


def test_image_outside_the_position_table_is_a_clear_error(pair):
    ours = pair[0]
    positions = np.full((1, 70, 2), -1)
    positions[0, 0] = (1120, 0)
    with pytest.raises(ValueError, match="outside the position table"):
        ours.image_features(np.zeros((1, 70, 6912), np.float32), positions)

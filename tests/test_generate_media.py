"""Image and audio prompts: placeholder expansion, media passed to the model, generate, CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import checkpoints
from mlx_gemma4.generate import stream_generate
from mlx_gemma4.loading import load
from mlx_gemma4.processing.audio import AudioFeatureExtractor

T = checkpoints.MM_TOKEN_IDS


def greedy_by_hand(model, ids: list[int], media: dict, n: int) -> list[int]:
    """n greedy tokens after prefilling model.prepare_inputs(ids, **media) in one call, decoding step by step."""
    inputs = model.prepare_inputs(mx.array([ids]), **media)
    cache = model.make_cache()
    logits = model(**inputs.span(0, inputs.length), cache=cache)
    tokens = []
    for _ in range(n):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens


def tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
            + 0.01 * rng.randn(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def audio_model(audio_chat_checkpoint):
    return load(audio_chat_checkpoint, dtype="float32")


def test_audio_prompt_expands_each_clip(audio_model):
    _, processor = audio_model
    clips = [tone(0.37, 0), tone(0.21, 1)]
    ids, media = processor.prompt_inputs("Describe these.", system="Be brief.", audio=clips)
    counts = AudioFeatureExtractor()(clips).num_soft_tokens
    text = processor.decode(ids)
    assert text.startswith("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n<|audio>")
    assert text.endswith("<audio|>Describe these.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    blocks = [i for i, t in enumerate(ids) if t == T["boa_token_id"]]
    assert len(blocks) == 2
    for start, n in zip(blocks, counts):
        assert ids[start + 1:start + 1 + n] == [T["audio_token_id"]] * n and ids[start + 1 + n] == T["eoa_token_index"]
    assert media["input_features"].shape[0] == 2 and media["input_features_mask"].shape[0] == 2


def test_audio_generation_equals_manual_prefill(audio_model):
    """stream_generate(audio=...) decodes exactly what prefilling model.prepare_inputs by hand does."""
    model, processor = audio_model
    clip = tone(0.3, 2)
    tokens = [c.token for c in stream_generate(model, processor, "What is it?", audio=[clip], max_tokens=8,
                                               stop_token_ids=[], prefill_step_size=16)]
    ids, media = processor.prompt_inputs("What is it?", audio=[clip])
    assert tokens == greedy_by_hand(model, ids, media, 8)
    # the audio matters: without it the continuation differs
    assert tokens != [c.token for c in stream_generate(model, processor, "What is it?", max_tokens=8,
                                                       stop_token_ids=[])]


def test_audio_errors(audio_model, chat_checkpoint):
    model, processor = audio_model
    with pytest.raises(ValueError, match=r"2 audio placeholder item\(s\) but 1 audio input"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "audio"}, {"type": "audio"},
                                                               {"type": "text", "text": "hi"}]}], audio=[tone(0.2, 0)])
    with pytest.raises(ValueError, match="too short|at least"):
        processor.prompt_inputs("hi", audio=[np.zeros(10, np.float32)])
    text_model, text_processor = load(chat_checkpoint("e2b"))
    with pytest.raises(ValueError, match="no audio tokens"):
        text_processor.prompt_inputs("hi", audio=[tone(0.2, 0)])


def test_generate_cli_with_audio_file(audio_chat_checkpoint, tmp_path):
    import soundfile

    wav = tmp_path / "clip.wav"
    soundfile.write(wav, tone(0.5, 3), 16000)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", "--model", str(audio_chat_checkpoint),
                        "--prompt", "What is this?", "--audio", str(wav), "--max-tokens", "5"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(root)), cwd=root,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "generation: 5 tokens" in r.stderr
    n_audio = AudioFeatureExtractor()([tone(0.5, 3)]).num_soft_tokens[0]
    assert n_audio > 5 and "prompt: " in r.stderr
    prompt_tokens = int(r.stderr.split("prompt: ")[1].split(" tokens")[0])
    assert prompt_tokens > n_audio  # the clip's soft tokens are part of the prompt
    bad = subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", "--model", str(audio_chat_checkpoint),
                          "--prompt", "hi", "--audio", str(tmp_path / "config.json")], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(root)), cwd=root, timeout=120)
    assert bad.returncode == 1 and "no such file" in bad.stderr


def test_generate_cli_audio_errors(audio_chat_checkpoint, tmp_path, capsys, monkeypatch):
    from mlx_gemma4 import cli as gen_cli

    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    base = ["--model", str(audio_chat_checkpoint), "--prompt", "hi"]
    assert gen_cli.main([*base, "--audio", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "junk.wav" in err and "Traceback" not in err
    # in --chat the bad clip fails its turn only: reported, and the conversation goes on
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert gen_cli.main([*base, "--audio", str(junk), "--chat"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "junk.wav" in err and "the conversation is kept" in err


def picture(seed: int, height: int = 64, width: int = 80) -> np.ndarray:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    return np.clip(base + rng.randint(0, 50, (height, width, 3)), 0, 255).astype(np.uint8)


def test_image_prompt_expands_and_generates_like_manual_prefill(vision_chat_checkpoint):
    from mlx_gemma4.processing.image import ImageProcessor

    model, processor = load(vision_chat_checkpoint, dtype="float32")
    images = [picture(0), picture(1, 96, 48)]
    ids, media = processor.prompt_inputs("Compare them.", images=images, max_soft_tokens=70)
    counts = ImageProcessor()(images, 70).num_soft_tokens
    text = processor.decode(ids)
    assert text.startswith("<bos><|turn>user\n\n\n<|image>") and "<image|>\n\nCompare them." in text
    blocks = [i for i, t in enumerate(ids) if t == T["boi_token_id"]]
    assert len(blocks) == 2
    for start, n in zip(blocks, counts):
        assert ids[start + 1:start + 1 + n] == [T["image_token_id"]] * n and ids[start + 1 + n] == T["eoi_token_id"]
    assert set(media) == {"pixel_values", "image_position_ids"}

    tokens = [c.token for c in stream_generate(model, processor, ids, media=media, max_tokens=6,
                                               stop_token_ids=[], prefill_step_size=16)]
    assert tokens == greedy_by_hand(model, ids, media, 6)
    via_images = [c.token for c in stream_generate(model, processor, "Compare them.", images=images,
                                                   max_tokens=6, stop_token_ids=[])]
    default_budget_ids, _ = processor.prompt_inputs("Compare them.", images=images)
    assert len(default_budget_ids) > len(ids)  # 280-token default budget: more soft tokens than 70
    assert len(via_images) == 6


def test_generate_cli_with_image_file(vision_chat_checkpoint, tmp_path):
    from PIL import Image

    from mlx_gemma4.processing.image import ImageProcessor

    png = tmp_path / "pic.png"
    Image.fromarray(picture(2)).save(png)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", "--model", str(vision_chat_checkpoint),
                        "--prompt", "What is this?", "--image", str(png), "--max-tokens", "4",
                        "--max-soft-tokens", "70"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(root)), cwd=root,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "generation: 4 tokens" in r.stderr
    n_image = ImageProcessor()([picture(2)], 70).num_soft_tokens[0]
    assert int(r.stderr.split("prompt: ")[1].split(" tokens")[0]) > n_image


def test_media_prompt_after_a_cached_prefix_equals_a_fresh_prefill(vision_chat_checkpoint):
    """A prompt cache holding the prompt up to (and including) the first image: the rest, with the second image,
    generates exactly what one fresh prefill of the whole prompt does, whether `media` covers both images (the
    cached one is dropped) or only the second; a cache that ends inside an image's soft tokens is refused."""
    from mlx_gemma4.engine import media_after, prefill
    from mlx_gemma4.prompt_cache import PromptCache

    model, processor = load(vision_chat_checkpoint, dtype="float32")
    ids, media = processor.prompt_inputs("Compare them.", images=[picture(3), picture(4, 48, 96)], max_soft_tokens=70)
    kw = dict(max_tokens=6, stop_token_ids=[], prefill_step_size=16)
    fresh = [c.token for c in stream_generate(model, processor, ids, media=media, **kw)]
    assert fresh == greedy_by_hand(model, ids, media, 6)

    first_image_end = ids.index(T["eoi_token_id"]) + 1
    first = {k: v[:1] for k, v in media.items()}
    second = {k: v[1:] for k, v in media.items()}
    for given in (media, second):
        cache = PromptCache.fresh(model)
        prefill(model, ids[:first_image_end], cache, media=first)
        chunks = list(stream_generate(model, processor, ids, media=given, prompt_cache=cache, **kw))
        assert chunks[-1].stats.cached_tokens == first_image_end
        assert [c.token for c in chunks] == fresh
    inside = ids.index(T["image_token_id"]) + 3
    with pytest.raises(ValueError, match="ends inside the soft tokens of one image input"):
        media_after(model, ids, inside, media)
    with pytest.raises(ValueError, match="3 image inputs for 2 image placeholder runs"):
        media_after(model, ids, first_image_end, {k: np.concatenate([v, v[:1]]) for k, v in media.items()})
    text_only = ids.index(T["boi_token_id"])  # a cached prefix before any image keeps every image
    assert media_after(model, ids, text_only, media)["pixel_values"].shape[0] == 2
    assert media_after(model, ids + [7], len(ids), media) is None  # nothing left but text

"""Media inside chat messages (transformers' content lists): prompt ids and media arrays equal transformers'
Gemma4Processor.apply_chat_template on the same messages, in every source form (path, URL, PIL image, array,
bytes, base64), interleaved with text in any turn; the images=/audio= keywords; the errors; the README example."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import checkpoints
from hardening_fixtures import StaticServer, hf_processor, mm_processor, mm_tokenizer_dir, picture, tone
from mlx_gemma4.errors import MediaError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mm_dir():
    return mm_tokenizer_dir()


@pytest.fixture(scope="module")
def processor():
    return mm_processor()


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    import soundfile

    out = tmp_path_factory.mktemp("media")
    Image.fromarray(picture(0)).save(out / "a.png")
    Image.fromarray(picture(1, 96, 48)).save(out / "b.jpg", quality=95)
    soundfile.write(out / "a.wav", tone(0.5, 0), 16000)
    soundfile.write(out / "b.flac", tone(0.3, 1), 22050)  # resampled to 16 kHz on load
    return out


def reference(mm_dir, messages, **kwargs):
    """transformers' ids and media arrays for `messages` (media given as paths, which transformers loads)."""
    out = hf_processor(str(mm_dir)).apply_chat_template(messages, tokenize=True, return_dict=True,
                                                          add_generation_prompt=True, **kwargs)
    media = {k: np.asarray(out[k]) for k in ("pixel_values", "image_position_ids", "input_features",
                                             "input_features_mask") if k in out}
    return list(out["input_ids"][0]), media


def assert_same(ours, ref):
    ids, media = ours
    ref_ids, ref_media = ref
    assert ids == ref_ids
    assert set(media) == set(ref_media)
    for key, value in ref_media.items():
        assert media[key].shape == value.shape, key
        np.testing.assert_array_equal(media[key], value, err_msg=key)


def conversation(image_a, image_b, audio_a, audio_b):
    """Media in the first user turn, the assistant turn and the last user turn, interleaved with text."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image_a, {"type": "text", "text": "What is this?"}, audio_a]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture and a tone."}]},
        {"role": "user", "content": [{"type": "text", "text": "And these two?"}, audio_b,
                                     {"type": "text", "text": "then"}, image_b]},
    ]


def test_media_in_messages_equal_transformers(processor, mm_dir, media_files):
    paths = conversation({"type": "image", "path": str(media_files / "a.png")},
                         {"type": "image", "url": str(media_files / "b.jpg")},
                         {"type": "audio", "audio": str(media_files / "a.wav")},
                         {"type": "audio", "path": str(media_files / "b.flac")})
    ref = reference(mm_dir, paths)
    assert ref[1]["pixel_values"].shape[0] == 2 and ref[1]["input_features"].shape[0] == 2
    assert_same(processor.prompt_inputs(paths), ref)

    # the same media as in-memory objects and encoded bytes
    from mlx_gemma4.processing.audio import load_audio

    objects = conversation({"type": "image", "image": Image.open(media_files / "a.png")},
                           {"type": "image", "image": (media_files / "b.jpg").read_bytes()},
                           {"type": "audio", "audio": load_audio(media_files / "a.wav")},
                           {"type": "audio", "audio": (media_files / "b.flac").read_bytes()})
    assert_same(processor.prompt_inputs(objects), ref)
    arrays = conversation({"type": "image", "image": np.asarray(Image.open(media_files / "a.png"))},
                          {"type": "image", "base64": base64.b64encode((media_files / "b.jpg").read_bytes()).decode()},
                          {"type": "audio", "audio": str(media_files / "a.wav")},
                          {"type": "audio", "url": "data:audio/flac;base64,"
                           + base64.b64encode((media_files / "b.flac").read_bytes()).decode()})
    assert_same(processor.prompt_inputs(arrays), ref)

    # images=/audio= keywords filling bare items: the same prompt
    bare = conversation({"type": "image"}, {"type": "image"}, {"type": "audio"}, {"type": "audio"})
    keywords = processor.prompt_inputs(bare, images=[media_files / "a.png", media_files / "b.jpg"],
                                       audio=[media_files / "a.wav", media_files / "b.flac"])
    assert_same(keywords, ref)


def test_string_prompt_with_keyword_media_equal_transformers(processor, mm_dir, media_files):
    image, clip = str(media_files / "b.jpg"), str(media_files / "a.wav")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "path": image}, {"type": "audio", "path": clip},
                                             {"type": "text", "text": "Describe."}]}]
    ref = reference(mm_dir, messages, processor_kwargs={"max_soft_tokens": 70})
    assert_same(processor.prompt_inputs("Describe.", system="Be brief.", images=image, audio=[clip],
                                        max_soft_tokens=70), ref)
    assert_same(processor.prompt_inputs(messages, max_soft_tokens=70), ref)


def test_video_in_messages(processor):
    """A video item (a list of frames) expands as Gemma4Processor.replace_video_token does (transformers' video
    processor itself needs torchvision, which is not installed: its placeholder rule is called directly)."""
    from types import SimpleNamespace

    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import VideoMetadata

    from mlx_gemma4.processing.video import VideoProcessor

    frames = [picture(s, 50, 70) for s in range(3)]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames},
                                             {"type": "text", "text": "What happens?"}]}]
    ids, media = processor.prompt_inputs(messages)
    features = VideoProcessor()(frames)
    np.testing.assert_array_equal(media["pixel_values_videos"], features.pixel_values)
    np.testing.assert_array_equal(media["video_position_ids"], features.position_ids)
    stand_in = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    meta = VideoMetadata(total_num_frames=3, fps=None, frames_indices=[0, 1, 2])
    expansion = Gemma4Processor.replace_video_token(
        stand_in, {"num_soft_tokens_per_video": [features.tokens_per_frame], "video_metadata": [meta]}, 0)
    rendered = processor.apply_chat_template(messages).replace("<|video|>", expansion)
    assert ids == processor.encode(rendered)
    assert ids.count(checkpoints.MM_TOKEN_IDS["video_token_id"]) == features.num_soft_tokens


def test_media_errors(processor, media_files):
    image = {"type": "image", "path": str(media_files / "a.png")}
    with pytest.raises(ValueError, match="both inside the messages .* and as images="):
        processor.prompt_inputs([{"role": "user", "content": [image]}], images=[media_files / "a.png"])
    with pytest.raises(ValueError, match=r"message 0, content item 1: an image item without its image"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}])
    with pytest.raises(ValueError, match="audio item without its audio"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match=r"2 image placeholder item\(s\) but 1 image input"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}],
                                images=[media_files / "a.png"])
    with pytest.raises(ValueError, match="0 image placeholders but 1 image inputs.*system turn"):
        processor.prompt_inputs([{"role": "system", "content": [image]}, {"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="unknown content type 'image_url'"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(ValueError, match="give the image once"):
        processor.prompt_inputs([{"role": "user", "content": [{**image, "url": str(media_files / "b.jpg")}]}])
    with pytest.raises(ValueError, match="needs a string 'text'"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(TypeError, match="a prompt must be a string or a list"):
        processor.prompt_inputs({"role": "user", "content": "hi"})
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "image", "path": "missing.png"}]}])
    with pytest.raises(MediaError, match="not valid base64"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "image", "base64": "@@not base64@@"}]}])
    with pytest.raises(MediaError, match="message 0, content item 0: cannot read media from a file: URL"):
        processor.prompt_inputs([{"role": "user", "content": [{"type": "image", "url": "file:///etc/passwd"}]}])
    # a placeholder the user typed is text, not a media slot (see test_control_tokens.py)
    ids, media = processor.prompt_inputs("look: <|image|>")
    assert media == {} and checkpoints.MM_TOKEN_IDS["image_token_id"] not in ids


def test_media_from_urls(processor, media_files, monkeypatch):
    from mlx_gemma4.processing import media as media_mod

    server = StaticServer({"/a.png": (media_files / "a.png").read_bytes(), "/big": b"\0" * 5000})
    try:
        by_path = processor.prompt_inputs([{"role": "user", "content": [{"type": "image", "path": str(media_files
                                                                                                    / "a.png")}]}])
        by_url = processor.prompt_inputs([{"role": "user", "content": [{"type": "image",
                                                                         "url": server.url + "/a.png"}]}])
        assert_same(by_url, by_path)
        with pytest.raises(MediaError, match="HTTP 404"):
            processor.prompt_inputs([{"role": "user", "content": [{"type": "image", "url": server.url + "/x.png"}]}])
        monkeypatch.setattr(media_mod, "MAX_FETCH_BYTES", 1000)
        with pytest.raises(MediaError, match="5000 bytes, more than the 1000-byte limit"):
            media_mod.fetch_url(server.url + "/big", max_bytes=1000)
        with pytest.raises(MediaError, match="larger than the 1000-byte limit"):
            media_mod.fetch_url(server.url + "/unsized", max_bytes=1000)
        with pytest.raises(MediaError, match="took longer than 0.5 s|timed out"):
            media_mod.fetch_url(server.url + "/slow", timeout=0.5)
        monkeypatch.setenv("MLX_GEMMA4_FETCH_URLS", "0")
        with pytest.raises(MediaError, match="turned off"):
            processor.prompt_inputs([{"role": "user", "content": [{"type": "image", "url": server.url + "/a.png"}]}])
    finally:
        server.close()


def test_readme_multimodal_example_runs_as_written(vision_chat_checkpoint, tmp_path, monkeypatch, capsys):
    """The README's Python block, run as written in a directory holding cat.png; only the Hub id is pointed at a
    tiny local vision checkpoint (no network here). The image must reach the model."""
    import mlx.core as mx

    import mlx_gemma4
    from mlx_gemma4.model import Gemma4

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if '"type": "image"' in b)
    block = "\n\n".join(p for p in block.split("\n\n") if "drafter" not in p)  # drafters: tests/test_drafter.py
    Image.fromarray(picture(3)).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    real_load = mlx_gemma4.load
    monkeypatch.setattr(mlx_gemma4, "load", lambda repo, **kw: real_load(vision_chat_checkpoint, **kw))
    seen = []
    real_prepare = Gemma4.prepare_inputs

    def prepare_inputs(self, input_ids, **media):
        seen.append({k: v for k, v in media.items() if v is not None})
        return real_prepare(self, input_ids, **media)

    monkeypatch.setattr(Gemma4, "prepare_inputs", prepare_inputs)
    exec(compile(block, "README.md", "exec"), {"input_ids": mx.array([[2, 10, 11, 12]])})
    assert any("pixel_values" in s for s in seen), "the README example's image never reached the model"
    assert capsys.readouterr().out.strip()

"""ChatSession with images and audio in any turn: each turn prefills only its new tokens (its media included)
and decodes exactly what one fresh prefill of the whole conversation, every earlier image and clip included,
decodes."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_gemma4.generate import stream_generate
from mlx_gemma4.loading import load
from mlx_gemma4.session import ChatSession, user_message
from test_generate_media import picture, tone

KW = dict(max_tokens=5, stop_token_ids=[], prefill_step_size=16)


@pytest.fixture(scope="module")
def vision(vision_chat_checkpoint):
    return load(vision_chat_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def audio(audio_chat_checkpoint):
    return load(audio_chat_checkpoint, dtype="float32")


def _fresh(model, processor, ids, media):
    """Greedy tokens after prefilling the whole prompt into a new cache."""
    return [c.token for c in stream_generate(model, processor, ids, media=media or None, **KW)]


def _send_checked(session, content, fresh_media, **turn):
    """Send a turn; check it reused the cache and decoded what a fresh prefill of all its ids (with
    `fresh_media`: the media of the whole conversation) decodes. Returns the turn's media."""
    message = user_message(content, turn.get("images"), turn.get("audio"))
    ids, media = session._turn_inputs(message, turn.get("max_soft_tokens"))
    cached = len(session.cache.tokens)
    expected = _fresh(session.model, session.processor, ids, fresh_media(media))
    chunks = list(session.send(content, **turn, **KW))
    assert [c.token for c in chunks] == expected
    assert chunks[-1].stats.cached_tokens == cached and chunks[-1].stats.prompt_tokens == len(ids) - cached
    return media


def _concat(*media):
    media = [m for m in media if m]
    return {k: np.concatenate([m[k] for m in media]) for k in media[0]} if media else {}


def test_image_turns_reuse_the_cache_and_equal_a_fresh_prefill(vision):
    model, processor = vision
    session = ChatSession(model, processor, system="Look closely.")
    list(session.send("hello there", **KW))
    first = _send_checked(session, "What is this?", lambda m: m, images=[picture(5)], max_soft_tokens=70)
    assert first["pixel_values"].shape[0] == 1  # only the new turn's image is processed
    _send_checked(session, "And what colour is it?", lambda m: _concat(first, m))
    second = _send_checked(session, "Compare with this one.", lambda m: _concat(first, m),
                           images=[picture(6, 48, 96)], max_soft_tokens=70)
    assert second["pixel_values"].shape[0] == 1

    # content lists (transformers' format) work as well as the images= keyword
    content = [{"type": "text", "text": "Now this:"}, {"type": "image", "image": picture(7)}]
    _send_checked(session, content, lambda m: _concat(first, second, m), max_soft_tokens=70)

    # after dropping the oldest turn the whole conversation, its images included, is prefilled again
    session.drop_oldest_turn()
    message = user_message("Last question.")
    ids, media = session._turn_inputs(message, 70)
    assert media["pixel_values"].shape[0] == 3 and session.cache.tokens == []
    expected = _fresh(model, processor, ids, media)
    chunks = list(session.send("Last question.", max_soft_tokens=70, **KW))
    assert [c.token for c in chunks] == expected and chunks[-1].stats.cached_tokens == 0


def test_audio_turn_after_text_equals_a_fresh_prefill(audio):
    model, processor = audio
    session = ChatSession(model, processor)
    list(session.send("hi", **KW))
    clip = _send_checked(session, "What do you hear?", lambda m: m, audio=[tone(0.4, 2)])
    assert clip["input_features"].shape[0] == 1
    _send_checked(session, "Louder?", lambda m: clip)


def test_a_session_can_start_from_a_prompt_cache(vision):
    from mlx_gemma4.engine import prefill
    from mlx_gemma4.prompt_cache import PromptCache, prefix_ids

    model, processor = vision
    cache = PromptCache.fresh(model)
    prefill(model, prefix_ids(processor, "", system="Look closely."), cache)
    cached = len(cache.tokens)
    session = ChatSession(model, processor, system="Look closely.", prompt_cache=cache)
    ids, media = session._turn_inputs(user_message("What is this?", images=[picture(8)]), 70)
    expected = _fresh(model, processor, ids, media)
    chunks = list(session.send("What is this?", images=[picture(8)], max_soft_tokens=70, **KW))
    assert chunks[-1].stats.cached_tokens == cached and [c.token for c in chunks] == expected


# -- the command line: --image/--audio with --chat and --prompt-cache ------------------------------------------
def _png(path, seed):
    from PIL import Image

    Image.fromarray(picture(seed)).save(path)
    return str(path)


def test_repl_takes_images_in_any_turn(vision_chat_checkpoint, tmp_path, capsys, monkeypatch):
    import io
    import sys

    from mlx_gemma4 import cli

    first, second = _png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {second}\nCompare them.\n/image {tmp_path}/nope.png\nok\n"))
    assert cli.main(["--model", str(vision_chat_checkpoint), "--chat", "--prompt", "What is this?", "--image", first,
                     "--max-tokens", "3", "--max-soft-tokens", "70"]) == 0
    err = capsys.readouterr().err
    stats = [line for line in err.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 3 and "cached" not in stats[0] and all("cached)" in line for line in stats[1:])
    assert f"(attached to your next message: {second})" in err
    assert "error: --image: no such file" in err and "the conversation is kept" in err
    prefilled = [int(line.split(" tokens")[0].split()[-1]) for line in stats]
    assert prefilled[0] > 70 and prefilled[1] > 70 > prefilled[2]  # each image's 70 soft tokens, in its own turn


def test_prompt_cache_with_images_and_with_chat(vision_chat_checkpoint, tmp_path, capsys, monkeypatch):
    import io
    import sys

    from mlx_gemma4 import cli

    model = str(vision_chat_checkpoint)
    cache = str(tmp_path / "system.safetensors")
    assert cli.prompt_cache_main(["--model", model, "--system", "Look closely.", "--out", cache]) == 0
    capsys.readouterr()
    common = ["--model", model, "--system", "Look closely.", "--prompt-cache", cache, "--max-tokens", "3",
              "--max-soft-tokens", "70"]
    assert cli.main([*common, "--prompt", "What is this?", "--image", _png(tmp_path / "c.png", 3)]) == 0
    assert "cached)" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("and now?\n"))
    assert cli.main([*common, "--chat", "--prompt", "hello"]) == 0
    stats = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 2 and all("cached)" in line for line in stats)

"""Prompt caches: save a prefix's KV caches, reload them, and generate exactly what generating without them
does, also when the prefix is several sliding windows long (rotating caches that have wrapped)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.cache import RotatingKVCache
from mlx_gemma4.engine import prefill
from mlx_gemma4.generate import stream_generate
from mlx_gemma4.loading import load
from mlx_gemma4.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache

SYSTEM = "You are a careful assistant. " * 3


def _greedy(model, processor, ids, prompt_cache=None, n=10):
    return [c.token for c in stream_generate(model, processor, ids, max_tokens=n, stop_token_ids=[],
                                             prompt_cache=prompt_cache)]


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_reloaded_prefix_generates_like_no_cache(chat_checkpoint, tmp_path, variant):
    model, processor = load(chat_checkpoint(variant), dtype="float32")
    ids = processor.prompt_ids("and what about the cat?", system=SYSTEM)
    prefix = ids[:-12]
    windows = {c.window for c in model.make_cache() if isinstance(c, RotatingKVCache)}
    assert len(prefix) > 3 * max(windows)  # the rotating caches have wrapped several times

    saved = PromptCache.fresh(model)
    prefill(model, prefix, saved)
    file = tmp_path / "prefix.safetensors"
    save_prompt_cache(file, saved, model, {"note": "test"})
    loaded, meta = load_prompt_cache(file, model)
    assert meta == {"note": "test"} and loaded.tokens == prefix and loaded.offset == len(prefix)
    for a, b in zip(saved.caches, loaded.caches):
        if a is not None:
            assert a.offset == b.offset
            for x, y in zip(a.state[:2], b.state[:2]):  # the file keeps a sliding cache's last window + 1
                np.testing.assert_array_equal(np.array(x[..., -y.shape[2]:, :]), np.array(y))
            if isinstance(a, RotatingKVCache):
                assert b.state[0].shape[2] == a.history

    with_cache = [c for c in stream_generate(model, processor, ids, max_tokens=10, stop_token_ids=[],
                                             prompt_cache=loaded)]
    assert with_cache[-1].stats.cached_tokens == len(prefix) and with_cache[-1].stats.prompt_tokens == 12
    assert [c.token for c in with_cache] == _greedy(model, processor, ids)


def test_cache_logits_match_full_prefill(chat_checkpoint, tmp_path):
    """Next-token logits after (reloaded prefix + rest) equal those of one full prefill (float32, 1e-5)."""
    model, processor = load(chat_checkpoint("e2b"), dtype="float32")
    ids = processor.prompt_ids("tell me more", system=SYSTEM)
    saved = PromptCache.fresh(model)
    prefill(model, ids[:30], saved)
    save_prompt_cache(tmp_path / "p.safetensors", saved, model)
    loaded, _ = load_prompt_cache(tmp_path / "p.safetensors", model)
    resumed = prefill(model, ids[30:], loaded)
    full = prefill(model, ids, PromptCache.fresh(model))
    np.testing.assert_allclose(np.array(resumed), np.array(full), atol=1e-5, rtol=1e-5)


def test_prompt_not_extending_cache_falls_back(chat_checkpoint):
    model, processor = load(chat_checkpoint("e2b"), dtype="float32")
    ids = processor.prompt_ids("a question")
    other = PromptCache.fresh(model)
    prefill(model, processor.encode("something else entirely"), other)
    with pytest.warns(UserWarning, match="does not extend the prompt cache"):
        tokens = _greedy(model, processor, ids, prompt_cache=other, n=5)
    assert tokens == _greedy(model, processor, ids, n=5)


def test_prompt_cache_errors(chat_checkpoint, tmp_path):
    e2b, _ = load(chat_checkpoint("e2b"), dtype="float32")
    b26, _ = load(chat_checkpoint("26b"), dtype="float32")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompt_cache(tmp_path / "none.safetensors", e2b)
    cache = PromptCache.fresh(e2b)
    prefill(e2b, list(range(5, 25)), cache)
    with pytest.raises(ValueError, match="safetensors"):
        save_prompt_cache(tmp_path / "c.bin", cache, e2b)
    save_prompt_cache(tmp_path / "c.safetensors", cache, e2b)
    with pytest.raises(ValueError, match="different model layout"):
        load_prompt_cache(tmp_path / "c.safetensors", b26)
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"x": mx.zeros(2)})
    with pytest.raises(ValueError, match="not a mlx-gemma4 prompt cache"):
        load_prompt_cache(tmp_path / "other.safetensors", e2b)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read prompt cache"):
        load_prompt_cache(tmp_path / "junk.safetensors", e2b)


def test_prompt_cache_cli_then_generate(chat_checkpoint, tmp_path, capsys):
    from mlx_gemma4 import cli

    path = str(chat_checkpoint("e2b"))
    file = str(tmp_path / "sys.safetensors")
    assert cli.prompt_cache_main(["--model", path, "--prompt", "hello world", "--system", SYSTEM, "--out", file]) == 0
    assert "saved" in capsys.readouterr().err
    assert cli.main(["--model", path, "--system", SYSTEM, "--prompt", "hello world and more",
                     "--prompt-cache", file, "--max-tokens", "4"]) == 0
    assert "cached)" in capsys.readouterr().err
    # a system-prompt-only prefix serves any user message
    assert cli.prompt_cache_main(["--model", path, "--system", SYSTEM, "--out", file]) == 0
    capsys.readouterr()
    assert cli.main(["--model", path, "--system", SYSTEM, "--prompt", "anything", "--prompt-cache", file,
                     "--max-tokens", "2"]) == 0
    assert "cached)" in capsys.readouterr().err


def test_prefix_ids_is_a_prefix_of_prompts(chat_checkpoint):
    from mlx_gemma4.processing import Processor
    from mlx_gemma4.prompt_cache import prefix_ids

    processor = Processor.from_pretrained(chat_checkpoint("e2b"))
    for system, prefix, prompt in [(SYSTEM, "", "anything"), (None, "Read this: the cat", "Read this: the cat sat"),
                                   (SYSTEM, "doc doc", "doc doc? question")]:
        ids = prefix_ids(processor, prefix, system=system)
        assert processor.prompt_ids(prompt, system=system)[: len(ids)] == ids
    raw = prefix_ids(processor, "the cat", use_chat_template=False)
    assert processor.prompt_ids("the cat sat", use_chat_template=False)[: len(raw)] == raw

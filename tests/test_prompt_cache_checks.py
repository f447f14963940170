"""Prompt caches are checked before use: a cache made with another model of the same layout (other weights), with
another tokenizer, with a truncated token list, with NaN keys or with a missing field is a PromptCacheError,
never a silently different answer; the same model loaded again (or a copy of its files) is accepted."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

import checkpoints
from mlx_gemma4.engine import prefill
from mlx_gemma4.errors import PromptCacheError
from mlx_gemma4.loading import load
from mlx_gemma4.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache


@pytest.fixture(scope="module")
def saved(chat_checkpoint, tmp_path_factory):
    """(checkpoint, model, processor, cache file, ids) for a prefix cache of the tiny E2B."""
    checkpoint = chat_checkpoint("e2b")
    model, processor = load(checkpoint, dtype="float32")
    ids = processor.prompt_ids("the cat sat on the mat and looked at the dog")
    cache = PromptCache.fresh(model)
    prefill(model, ids, cache)
    file = tmp_path_factory.mktemp("cache") / "prefix.safetensors"
    save_prompt_cache(file, cache, model, {"note": "x"}, processor=processor)
    return checkpoint, model, processor, file, ids


def rewrite(file, out, *, meta=None, arrays=None):
    """A copy of a cache file with metadata entries / arrays replaced (None value: removed)."""
    loaded, metadata = mx.load(str(file), return_metadata=True)
    for key, value in (meta or {}).items():
        metadata.pop(key) if value is None else metadata.__setitem__(key, value)
    for key, value in (arrays or {}).items():
        loaded.pop(key) if value is None else loaded.__setitem__(key, value)
    mx.save_safetensors(str(out), loaded, metadata=metadata)
    return out


def test_same_model_again_is_accepted(saved, tmp_path):
    checkpoint, model, processor, file, ids = saved
    again, processor_again = load(checkpoint, dtype="float32")
    cache, user = load_prompt_cache(file, again, processor_again)
    assert cache.tokens == ids and user == {"note": "x"}
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    load_prompt_cache(file, load(copy, dtype="float32")[0])


def test_other_weights_same_layout_are_refused(saved, tmp_path, tokenizer_dir):
    """The issue's report: a cache made with one model was accepted by another with the same layout."""
    _, _, _, file, _ = saved
    other_dir = checkpoints.make_text_checkpoint(tmp_path / "other", "e2b", seed=7)
    shutil.copytree(tokenizer_dir(checkpoints.VOCAB), other_dir, dirs_exist_ok=True)
    other, _ = load(other_dir, dtype="float32")
    with pytest.raises(PromptCacheError, match="made with a different model"):
        load_prompt_cache(file, other)


def test_other_tokenizer_is_refused(saved, tmp_path):
    _, model, processor, file, _ = saved
    tok_dir = checkpoints.make_tokenizer(tmp_path / "tok", checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)
    from mlx_gemma4.processing import Processor

    with pytest.raises(PromptCacheError, match="different tokenizer"):
        load_prompt_cache(file, model, Processor.from_pretrained(tok_dir))


def test_tampered_files_are_refused(saved, tmp_path):
    _, model, _, file, ids = saved
    cases = [
        ({"meta": {"tokens": json.dumps(ids[:-3])}}, "holds .* positions but the file stores"),
        ({"meta": {"tokens": json.dumps(ids[:-1] + [10**9])}}, r"token ids must be integers in \[0, 512\)"),
        ({"meta": {"offsets": None}}, "no 'offsets' entry"),
        ({"meta": {"offsets": "[1, 2"}}, "'offsets' is not valid JSON"),
        ({"meta": {"layout": json.dumps({"a": 1})}}, "'layout' must be a list"),
        ({"meta": {"model_fingerprint": None}}, "different model"),
        ({"meta": {"format": "mlx-gemma4-prompt-cache/1"}}, "older mlx-gemma4 prompt cache"),
        ({"arrays": {"layers.0.keys": None}}, "layer 0 has no keys"),
        ({"arrays": {"layers.1.values": mx.zeros((1, 1, 3, 16))}}, r"layer 1 values have shape \(1, 1, 3, 16\)"),
    ]
    nan_keys = mx.load(str(file))["layers.2.keys"]
    cases.append(({"arrays": {"layers.2.keys": mx.full(nan_keys.shape, float("nan"))}}, "NaN or infinite"))
    cases.append(({"arrays": {"layers.2.keys": nan_keys.astype(mx.int32)}}, "not floating point"))
    for i, (change, message) in enumerate(cases):
        bad = rewrite(file, tmp_path / f"bad{i}.safetensors", **change)
        with pytest.raises(PromptCacheError, match=message):
            load_prompt_cache(bad, model)

"""Our model speaks mlx-lm's model protocol: mlx-lm's `stream_generate`, its prompt-cache helpers, its
`BatchGenerator` and its speculative decoding drive an `mlx_gemma4` model and give our own `generate`'s tokens
(greedy, float32), also past the sliding windows."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models import cache as mlx_cache
from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

from mlx_gemma4 import load
from mlx_gemma4.cache import KVCache, RotatingKVCache
from mlx_gemma4.generate import stream_generate

N = 24


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    """(model, processor, mlx-lm TokenizerWrapper) per variant; no stop tokens, so every run makes N tokens."""
    made = {}

    def get(variant):
        if variant not in made:
            path = chat_checkpoint(variant)
            model, processor = load(path, dtype="float32")
            tokenizer = load_mlx_lm_tokenizer(path)
            tokenizer.eos_token_ids = []
            made[variant] = model, processor, tokenizer
        return made[variant]

    return get


def ours(model, processor, ids, n=N):
    return [c.token for c in stream_generate(model, processor, ids, max_tokens=n, stop_token_ids=[])]


def prompt(processor, repeat=1):
    return processor.prompt_ids("Tell me about the sliding window attention of Gemma. " * repeat)


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_mlx_lm_stream_generate_gives_our_tokens(loaded, variant):
    model, processor, tokenizer = loaded(variant)
    ids = prompt(processor, 3)
    assert len(ids) > 3 * model.config.text.sliding_window
    theirs = [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=N)]
    assert theirs == ours(model, processor, ids)


def test_mlx_lm_prompt_cache_helpers(loaded, tmp_path):
    """make_prompt_cache -> prefill through mlx-lm -> trim_prompt_cache (after the windows wrapped) ->
    save_prompt_cache / load_prompt_cache (rebuilt as mlx-lm's classes) -> continue: our tokens each way."""
    model, processor, tokenizer = loaded("e2b")
    ids = prompt(processor, 3)
    prefix, rest = ids[:-6], ids[-6:]
    cache = mlx_cache.make_prompt_cache(model)
    assert {type(c) for c in cache} == {KVCache, RotatingKVCache}
    for _ in mlx_lm.stream_generate(model, tokenizer, prefix, max_tokens=2, prompt_cache=cache):
        pass
    assert cache[0].offset == len(prefix) + 2  # every yielded token was fed back
    assert mlx_cache.trim_prompt_cache(cache, 2) == 2
    file = str(tmp_path / "prefix.safetensors")
    mlx_cache.save_prompt_cache(file, cache, {"note": "test"})
    reloaded, meta = mlx_cache.load_prompt_cache(file, return_metadata=True)
    assert meta == {"note": "test"}
    assert {type(c) for c in reloaded} == {mlx_cache.KVCache, mlx_cache.RotatingKVCache}

    want = ours(model, processor, ids)
    for c in (cache, reloaded):
        assert [r.token for r in mlx_lm.stream_generate(model, tokenizer, rest, max_tokens=N, prompt_cache=c)] == want


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_mlx_lm_generate_step_on_mlx_lm_caches(loaded, variant):
    """mlx-lm's generate_step on a list of mlx-lm's own cache classes (not ours): prefill in chunks shorter than
    the window and longer than it, so its ring buffers wrap both ways (the model's mask path), then decode."""
    model, processor, _ = loaded(variant)
    ids = prompt(processor, 3)
    window = model.config.text.sliding_window
    want = ours(model, processor, ids)
    for step in (window // 2 + 1, 2 * window + 3):
        caches = [mlx_cache.RotatingKVCache(max_size=c.window) if isinstance(c, RotatingKVCache)
                  else mlx_cache.KVCache() for c in model.make_cache()]
        got = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=N, prompt_cache=caches,
                                                prefill_step_size=step)]
        assert got == want
        assert {c.offset for c in caches} == {len(ids) + N}  # the prompt and every yielded token


def test_mlx_lm_kv_bits_is_refused_not_ignored(loaded):
    """generate_step(kv_bits=) quantizes the caches that offer `to_quantized` and silently skips the others:
    ours offer it and refuse (mlx-lm's own rotating cache raises NotImplementedError there)."""
    model, processor, _ = loaded("e2b")
    steps = generate_step(mx.array(prompt(processor)), model, max_tokens=2, prompt_cache=model.make_cache(),
                          kv_bits=4, quantized_kv_start=0, prefill_step_size=4)
    with pytest.raises(ValueError, match="kv_bits"):
        list(steps)


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_mlx_lm_batch_generator_gives_each_prompt_its_tokens(loaded, variant):
    """mlx-lm's continuous batching: prompts of different lengths prefilled together (right padding, its batch
    caches) and decoded together, with a late arrival."""
    model, processor, _ = loaded(variant)
    full = prompt(processor, 3)
    prompts = [full, full[:9], full[:30], full[:4]]
    gen = BatchGenerator(model, max_tokens=N)
    try:
        uids = gen.insert(prompts[:3])
        got = {u: [] for u in uids}
        for step in range(3 * N):
            if step == 5:
                late = gen.insert(prompts[3:])
                uids += late
                got[late[0]] = []
            for r in gen.next_generated():
                got[r.uid].append(r.token)
            if all(len(v) == N for v in got.values()):
                break
    finally:
        gen.close()
    for uid, ids in zip(uids, prompts):
        assert got[uid] == ours(model, processor, ids)


def test_mlx_lm_speculative_decoding_rolls_back_our_caches_past_the_window(loaded, text_checkpoint):
    """mlx-lm's speculative decoding trims rejected drafts from every cache; its own RotatingKVCache cannot be
    trimmed once wrapped, ours can. A different random model as drafter: drafts are rejected, caches rolled back."""
    model, processor, tokenizer = loaded("26b")
    drafter = load(text_checkpoint("e2b"), dtype="float32")[0]
    ids = prompt(processor, 3)
    spec = [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=N, draft_model=drafter,
                                                    num_draft_tokens=3)]
    assert spec == ours(model, processor, ids)


def test_readme_mlx_lm_and_batch_examples_run_as_written(chat_checkpoint, tmp_path, monkeypatch):
    """The README's mlx-lm and BatchEngine blocks, run as written after its first Python block's `load`; the
    checkpoint directory they name is the tiny e2b chat checkpoint."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    mlx_lm_block = next(b for b in blocks if "mlx_lm.stream_generate" in b)
    batch_block = next(b for b in blocks if "BatchEngine(" in b)
    (tmp_path / "gemma-4-E2B-it").symlink_to(chat_checkpoint("e2b"))
    monkeypatch.chdir(tmp_path)
    scope = {"load": load}
    exec(compile(mlx_lm_block, "README.md", "exec"), scope)
    assert scope["response"].finish_reason in ("stop", "length")
    scope["processor"] = load(tmp_path / "gemma-4-E2B-it")[1]
    exec(compile(batch_block, "README.md", "exec"), scope)
    assert [r.finish_reason in ("stop", "length") and len(r.tokens) >= 1 for r in scope["requests"]] == [True] * 2

"""generate / stream_generate / ChatSession on tiny checkpoints, checked against transformers' greedy decoding."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_gemma4.generate import generate, stream_generate
from mlx_gemma4.session import ChatSession, user_message
from mlx_gemma4.loading import load
from mlx_gemma4.processing import Processor

PROMPT = "hello world, the cat sat on the mat and then it went to the park"


@pytest.fixture(scope="module")
def e2b(chat_checkpoint):
    return load(chat_checkpoint("e2b"), dtype="float32")


def _hf_greedy(path, ids, n):
    import checkpoints
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared CI machine
    try:
        hf = checkpoints.load_hf(path)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    finally:
        torch.set_num_threads(threads)
    return out[0, len(ids):].tolist()


def _greedy_without_cache(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[-n:]


def test_greedy_equals_transformers_past_sliding_window(chat_checkpoint, e2b):
    model, processor = e2b
    ids = processor.prompt_ids(PROMPT)
    assert len(ids) > 3 * 8  # several times the sliding window (8)
    n = 20
    tokens = [c.token for c in stream_generate(model, processor, ids, max_tokens=n, stop_token_ids=[])]
    assert tokens == _hf_greedy(chat_checkpoint("e2b"), ids, n)


@pytest.mark.parametrize("variant", ["26b", "31b"])
def test_cached_greedy_equals_full_recompute(chat_checkpoint, variant):
    """The KV-cache path (rotating sliding-window caches, chunked prefill) picks what recomputing the whole
    sequence each step picks (the model itself is checked against transformers in test_model)."""
    model, processor = load(chat_checkpoint(variant), dtype="float32")
    ids = processor.prompt_ids(PROMPT)
    assert len(ids) > 2 * 16
    n = 12
    tokens = [c.token for c in stream_generate(model, processor, ids, max_tokens=n, stop_token_ids=[],
                                               prefill_step_size=10)]
    assert tokens == _greedy_without_cache(model, ids, n)


def test_stream_yields_pieces_and_stats(e2b):
    model, processor = e2b
    chunks = list(stream_generate(model, processor, PROMPT, max_tokens=12, stop_token_ids=[]))
    assert len(chunks) == 12 and all(c.token is not None for c in chunks)
    stats = chunks[-1].stats
    assert stats.finish_reason == "length" and stats.generation_tokens == 12
    assert stats.prompt_tokens == len(processor.prompt_ids(PROMPT))
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.peak_memory_gb > 0
    assert stats.blas and "tok/s" in stats.summary()
    text = "".join(c.text for c in chunks)
    assert text == processor.decode([c.token for c in chunks])
    assert generate(model, processor, PROMPT, max_tokens=12, stop_token_ids=[]) == text


def test_stops_on_stop_token_without_printing_it(e2b):
    model, processor = e2b

    def force_turn_end_at_4(tokens, logits):
        step = tokens.shape[1] - n_prompt
        if step == 4:
            return mx.where(mx.arange(logits.shape[-1]) == 106, 100.0, -100.0)[None]
        return logits

    n_prompt = len(processor.prompt_ids(PROMPT))
    chunks = list(stream_generate(model, processor, PROMPT, max_tokens=50, logits_processors=[force_turn_end_at_4]))
    assert chunks[-1].stats.finish_reason == "stop" and chunks[-1].stats.generation_tokens == 4
    assert "<turn|>" not in "".join(c.text for c in chunks)
    assert 106 in processor.stop_token_ids and 1 in processor.stop_token_ids


def test_seed_reproduces_sampling(e2b):
    model, processor = e2b
    kw = dict(max_tokens=10, temperature=1.0, top_k=50, seed=11, stop_token_ids=[])
    a = [c.token for c in stream_generate(model, processor, PROMPT, **kw)]
    b = [c.token for c in stream_generate(model, processor, PROMPT, **kw)]
    c = [c.token for c in stream_generate(model, processor, PROMPT, **{**kw, "seed": 12})]
    assert a == b and a != c


def test_prompt_forms(e2b):
    model, processor = e2b
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    from_messages = generate(model, processor, messages, max_tokens=5, stop_token_ids=[])
    assert from_messages == generate(model, processor, PROMPT, system="Be brief.", max_tokens=5, stop_token_ids=[])
    raw_ids = processor.prompt_ids(PROMPT, use_chat_template=False)
    assert raw_ids[0] == 2 and 105 not in raw_ids
    assert generate(model, processor, PROMPT, use_chat_template=False, max_tokens=5, stop_token_ids=[]) == \
        generate(model, processor, raw_ids, max_tokens=5, stop_token_ids=[])
    with pytest.raises(ValueError, match="max_tokens"):
        next(stream_generate(model, processor, PROMPT, max_tokens=0))


def test_chat_session_reuses_cache_and_matches_fresh_prefill(e2b):
    model, processor = e2b
    session = ChatSession(model, processor, system="You are terse.")
    first = list(session.send(PROMPT, max_tokens=6, stop_token_ids=[]))
    cached = len(session.cache.tokens)
    assert cached == first[-1].stats.prompt_tokens + 5  # the 6th token is not fed yet
    turn_ids = session._turn_inputs(user_message("and the world?"))[0]
    assert turn_ids[:cached] == session.cache.tokens
    second = list(session.send("and the world?", max_tokens=6, stop_token_ids=[]))
    assert second[-1].stats.cached_tokens == cached
    assert second[-1].stats.prompt_tokens == len(turn_ids) - cached
    tail = processor.decode(session.cache.tokens[cached:cached + second[-1].stats.prompt_tokens])
    assert tail.endswith("<turn|>\n<|turn>user\nand the world?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    # the cached continuation generates what a fresh prefill of the same ids generates
    fresh = [c.token for c in stream_generate(model, processor, turn_ids, max_tokens=6, stop_token_ids=[])]
    assert [c.token for c in second] == fresh


def test_processor_from_pretrained(chat_checkpoint, text_checkpoint):
    proc = Processor.from_pretrained(chat_checkpoint("e2b"))
    assert proc.tokenizer.vocab_size == 512 and "<|turn>" in proc.chat_template
    assert Processor.from_pretrained(text_checkpoint("e2b")) is None  # weights only: no tokenizer


def test_chat_session_after_stop_token_closes_turn_once(e2b):
    model, processor = e2b
    session = ChatSession(model, processor)

    def end_turn_at_3(tokens, logits):
        if tokens.shape[1] - start[0] == 3:
            return mx.where(mx.arange(logits.shape[-1]) == 106, 100.0, -100.0)[None]
        return logits

    start = [len(session._turn_inputs(user_message(PROMPT))[0])]
    first = list(session.send(PROMPT, max_tokens=20, logits_processors=[end_turn_at_3]))
    assert first[-1].stats.finish_reason == "stop" and session.cache.tokens[-1] == 106  # fed, not printed
    cached = len(session.cache.tokens)
    ids = session._turn_inputs(user_message("next"))[0]
    expected = "<turn|>\n<|turn>user\nnext<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert processor.decode(ids[cached - 1:]) == expected


def test_media_prefill_path_matches_text_path(e2b):
    """The multimodal prefill (model.prepare_inputs + chunk spans) with no media present generates exactly what
    the text path does, also after a prompt cache prefix."""
    from mlx_gemma4.engine import prefill
    from mlx_gemma4.prompt_cache import PromptCache

    model, processor = e2b
    ids = processor.prompt_ids(PROMPT)
    kw = dict(max_tokens=8, stop_token_ids=[], prefill_step_size=7)
    via_media = [c.token for c in stream_generate(model, processor, ids, media={"pixel_values": None}, **kw)]
    assert via_media == [c.token for c in stream_generate(model, processor, ids, **kw)]
    cache = PromptCache.fresh(model)
    prefill(model, ids[:10], cache)
    after_cache = [c.token for c in stream_generate(model, processor, ids, media={"pixel_values": None},
                                                    prompt_cache=cache, **kw)]
    assert after_cache == via_media


def test_tools_and_thinking_reach_the_prompt(e2b):
    model, processor = e2b

    def lookup(word: str) -> str:
        """Look a word up.

        Args:
            word: The word.
        """

    for kwargs in ({"tools": [lookup]}, {"enable_thinking": True}):
        chunks = list(stream_generate(model, processor, PROMPT, max_tokens=2, stop_token_ids=[], **kwargs))
        ids = processor.prompt_ids(PROMPT, **kwargs)
        assert chunks[-1].stats.prompt_tokens == len(ids) and ids != processor.prompt_ids(PROMPT)
    text = processor.decode(processor.prompt_ids(PROMPT, tools=[lookup]))
    assert "<|tool>declaration:lookup{" in text

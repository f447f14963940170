"""The batched decoding engine (continuous batching): every request gets the tokens it gets alone, whenever it
joins or others leave; per-request samplers, stop tokens, cancellation, prompt caches, media, threads, asyncio."""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import load
from mlx_gemma4.batch import BatchEngine
from mlx_gemma4.engine import ContextError, generate_step, prefill
from mlx_gemma4.prompt_cache import PromptCache
from mlx_gemma4.sample import make_logits_processors, make_sampler

N = 16


def prompts(n, window, seed=0):
    """Lengths from 2 to several windows, so sliding windows wrap before and during decoding."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(2, 3 * window + 5, n).astype(int)
    return [rng.integers(3, 500, int(k)).tolist() for k in lengths]


def solo(model, ids, n=N, sampler=None, processors=(), cache=None):
    cache = cache or PromptCache.fresh(model)
    return list(generate_step(model, ids, cache, sampler or make_sampler(), max_tokens=n,
                              logits_processors=processors))


def run(engine, requests_at: dict[int, list], max_steps=500):
    """Drive the engine by hand: submit requests_at[step] (kwargs dicts) at that step; all requests in order."""
    made = []
    for step in range(max_steps):
        for kwargs in requests_at.get(step, []):
            made.append(engine.submit(**kwargs))
        if not engine.step() and step > max(requests_at):
            break
    assert all(r.done for r in made)
    return made


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_eight_requests_joining_at_different_steps_each_get_their_solo_tokens(text_model, variant):
    m = text_model(variant)
    seqs = prompts(8, m.config.text.sliding_window)
    lengths = [N, 5, N, 9, N, 3, N, 12]  # some leave early, others join after them
    engine = BatchEngine(m, max_batch=8, prefill_step_size=16)  # long prompts prefill in several steps
    arrivals = {0: [0, 1], 1: [2], 4: [3, 4], 9: [5], 10: [6], 17: [7]}
    at = {s: [dict(ids=seqs[i], max_tokens=lengths[i]) for i in idx] for s, idx in arrivals.items()}
    made = run(engine, at)
    order = [i for s in sorted(arrivals) for i in arrivals[s]]
    for i, request in zip(order, made):
        assert request.tokens == solo(m, seqs[i], lengths[i]), f"request {i}"
        assert request.finish_reason == "length"


def test_stop_tokens_cancellation_and_limits(text_model):
    m = text_model("e2b")
    seqs = prompts(4, m.config.text.sliding_window, seed=1)
    ref = [solo(m, ids) for ids in seqs]
    stop = ref[0][6]
    engine = BatchEngine(m, max_batch=3)
    a = engine.submit(seqs[0], max_tokens=N, stop_token_ids=[stop])
    b = engine.submit(seqs[1], max_tokens=N)
    c = engine.submit(seqs[2], max_tokens=N)
    d = engine.submit(seqs[3], max_tokens=1)  # waits for room (max_batch=3), then ends with its first token
    for _ in range(6):
        engine.step()
    c.cancel()
    while engine.step():
        pass
    assert a.finish_reason == "stop" and a.tokens == ref[0][: ref[0].index(stop)]
    assert b.finish_reason == "length" and b.tokens == ref[1]
    assert c.finish_reason == "cancelled" and c.tokens == ref[2][: len(c.tokens)] and len(c.tokens) < N
    assert d.finish_reason == "length" and d.tokens == ref[3][:1]
    assert engine.active == 0


def test_per_request_samplers_and_logits_processors(text_model):
    m = text_model("e2b")
    seqs = prompts(3, m.config.text.sliding_window, seed=2)
    settings = [dict(sampler=make_sampler(0.8, top_k=20, seed=7)),
                dict(processors=make_logits_processors(1.5)),
                dict()]
    engine = BatchEngine(m)
    made = [engine.submit(ids, max_tokens=N, sampler=s.get("sampler"), logits_processors=s.get("processors", ()))
            for ids, s in zip(seqs, settings)]
    while engine.step():
        pass
    again = [dict(sampler=make_sampler(0.8, top_k=20, seed=7)), dict(processors=make_logits_processors(1.5)), {}]
    for ids, request, s in zip(seqs, made, again):
        assert request.tokens == solo(m, ids, sampler=s.get("sampler"), processors=s.get("processors", ()))


def test_prompt_cache_in_and_out(text_model):
    """A request starts from a prompt cache (only the rest is prefilled) and leaves its caches for the next
    turn, which continues exactly like a fresh run of the whole conversation."""
    m = text_model("26b")
    first, second = prompts(2, m.config.text.sliding_window, seed=3)[::-1]
    prefix = PromptCache.fresh(m)
    prefill(m, first[:-4], prefix)
    engine = BatchEngine(m)
    turn1 = engine.submit(first, max_tokens=N, prompt_cache=prefix, keep_cache=True)
    other = engine.submit(second, max_tokens=N)
    while engine.step():
        pass
    assert turn1.cached_tokens == len(first) - 4 and turn1.tokens == solo(m, first)
    history = turn1.cache.tokens
    assert history == first + turn1.tokens  # the last token was fed too
    follow = history + second[:5]
    turn2 = engine.submit(follow, max_tokens=N, prompt_cache=turn1.cache)
    while engine.step():
        pass
    assert turn2.tokens == solo(m, follow) and other.tokens == solo(m, second)


def test_image_prompt_decodes_in_the_batch_like_generate(vision_chat_checkpoint):
    from mlx_gemma4.generate import stream_generate

    m, processor = load(vision_chat_checkpoint, dtype="float32")
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    ids, media = processor.prompt_inputs("What is in it?", images=[image], max_soft_tokens=70)
    want = [c.token for c in stream_generate(m, processor, "What is in it?", images=[image], max_soft_tokens=70,
                                             max_tokens=N, stop_token_ids=[])]
    engine = BatchEngine(m)
    text = engine.submit(processor.prompt_ids("Hello"), max_tokens=N)
    request = engine.submit(ids, media=media, max_tokens=N)
    while engine.step():
        pass
    assert request.tokens == want and text.tokens == solo(m, processor.prompt_ids("Hello"))


def test_threads_and_asyncio_against_the_running_loop(text_model):
    m = text_model("e2b")
    seqs = prompts(6, m.config.text.sliding_window, seed=4)
    engine = BatchEngine(m, max_batch=4)
    engine.start()
    try:
        results = {}

        def client(i):
            results[i] = list(engine.submit(seqs[i], max_tokens=N))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()

        async def streams():
            async def one(i):
                return [t async for t in engine.submit(seqs[i], max_tokens=N).stream()]

            return await asyncio.gather(*(one(i) for i in range(3, 6)))

        for i, tokens in zip(range(3, 6), asyncio.run(streams())):
            results[i] = tokens
        for t in threads:
            t.join()
    finally:
        engine.stop()
    for i, ids in enumerate(seqs):
        assert results[i] == solo(m, ids), f"request {i}"


def test_bad_requests(text_model):
    m = text_model("e2b")
    engine = BatchEngine(m)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([5, 6], max_tokens=0)
    context = m.config.text.max_position_embeddings
    with pytest.raises(ContextError, match="no room"):
        engine.submit([5] * context, max_tokens=4)
    full = engine.submit([5] * (context - 3), max_tokens=8)  # the context fills up after 3 tokens
    good = engine.submit([5, 6, 7], max_tokens=4)
    bad = engine.submit([5, 6, 7], max_tokens=4, media={"pixel_values": np.zeros((1, 4, 4), np.float32),
                                                        "image_position_ids": np.zeros((1, 4, 2), np.int32)})
    while engine.step():
        pass
    assert bad.finish_reason == "error" and bad.error is not None
    with pytest.raises(RuntimeError, match="generation failed"):
        list(bad)
    assert good.tokens == solo(m, [5, 6, 7], 4)
    assert full.finish_reason == "context" and len(full.tokens) == 3


def test_log_probabilities(text_model):
    m = text_model("e2b")
    ids = prompts(3, m.config.text.sliding_window, seed=5)[2]
    engine = BatchEngine(m)
    request = engine.submit(ids, max_tokens=6, top_logprobs=3)
    plain = engine.submit(ids, max_tokens=6)
    while engine.step():
        pass
    logits = np.array(m(mx.array([ids + request.tokens[:-1]])))[0, len(ids) - 1:].astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    want = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))  # log-softmax
    assert plain.logprobs == [] and len(request.logprobs) == 6
    for row, token, (logprob, top) in zip(want, request.tokens, request.logprobs):
        assert len(top) == 3 and top[0][0] == token  # greedy: the chosen id is the most likely
        np.testing.assert_allclose([logprob] + [lp for _, lp in top], [row[token]] + sorted(row)[::-1][:3],
                                   rtol=1e-4, atol=1e-4)

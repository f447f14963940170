"""The model's context (max_position_embeddings) bounds prompt + reply: a prompt over it is refused before any
prefill, a reply that reaches it ends with finish_reason "context" and keeps what was generated, and a chat
turn over it leaves the conversation as it was (the REPL reports it and offers /reset or dropping old turns)."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from mlx_gemma4 import cli
from mlx_gemma4.engine import ContextError, prefill
from mlx_gemma4.generate import generate, stream_generate
from mlx_gemma4.loading import load
from mlx_gemma4.prompt_cache import PromptCache
from mlx_gemma4.session import ChatSession

PROMPT = "hello world, the cat sat on the mat"


@pytest.fixture(scope="module")
def e2b(chat_checkpoint):
    return load(chat_checkpoint("e2b"), dtype="float32")


@pytest.fixture
def context(e2b, monkeypatch):
    """context(n): the loaded model's context becomes n tokens for this test."""
    def set_context(n: int) -> None:
        monkeypatch.setattr(e2b[0].config.text, "max_position_embeddings", n)
    return set_context


def _never_called(*args, **kwargs):
    raise AssertionError("the model ran although the prompt does not fit")


def test_prompt_over_the_context_is_refused_before_prefill(e2b, context, monkeypatch):
    model, processor = e2b
    ids = processor.prompt_ids(PROMPT)
    context(len(ids))  # the prompt fits exactly, but leaves no room for a reply
    cache = PromptCache.fresh(model)
    monkeypatch.setattr(type(model), "__call__", _never_called)
    with pytest.raises(ContextError, match=rf"the prompt is {len(ids)} tokens.*context of {len(ids)} tokens"):
        next(stream_generate(model, processor, PROMPT, prompt_cache=cache))
    assert cache.tokens == [] and cache.offset == 0
    with pytest.raises(ContextError, match=f"do not fit the model's context of {len(ids) - 1}"):
        context(len(ids) - 1)
        prefill(model, ids, cache)
    assert cache.offset == 0


def test_reply_that_fills_the_context_ends_with_what_it_generated(e2b, context):
    model, processor = e2b
    ids = processor.prompt_ids(PROMPT)
    unlimited = [c.token for c in stream_generate(model, processor, ids, max_tokens=8, stop_token_ids=[])]
    context(len(ids) + 5)
    chunks = list(stream_generate(model, processor, ids, max_tokens=8, stop_token_ids=[]))
    assert [c.token for c in chunks] == unlimited[:5]
    assert chunks[-1].stats.finish_reason == "context" and chunks[-1].stats.generation_tokens == 5
    assert generate(model, processor, ids, max_tokens=8, stop_token_ids=[]) == processor.decode(unlimited[:5])
    exact = list(stream_generate(model, processor, ids, max_tokens=5, stop_token_ids=[]))
    assert exact[-1].stats.finish_reason == "length"  # max_tokens reached first: not a context stop


def test_prompt_after_a_cache_counts_the_cached_tokens(e2b, context):
    model, processor = e2b
    ids = processor.prompt_ids(PROMPT)
    cache = PromptCache.fresh(model)
    prefill(model, ids[:10], cache)
    context(len(ids))
    with pytest.raises(ContextError, match=f"the prompt is {len(ids) - 10} tokens after 10 cached tokens"):
        next(stream_generate(model, processor, ids, prompt_cache=cache))
    assert cache.tokens == ids[:10] and cache.offset == 10


def test_chat_turn_over_the_context_keeps_the_conversation(e2b, context):
    model, processor = e2b
    session = ChatSession(model, processor)
    first = list(session.send("hi", max_tokens=3, stop_token_ids=[]))
    messages, tokens = list(session.messages), list(session.cache.tokens)
    context(len(tokens) + 40)
    with pytest.raises(ContextError):
        list(session.send(PROMPT * 2, max_tokens=3, stop_token_ids=[]))
    assert session.messages == messages and session.cache.tokens == tokens and session.turns == 1
    # a short turn still fits and continues from the cache
    second = list(session.send("ok", max_tokens=2, stop_token_ids=[]))
    assert second[-1].stats.cached_tokens == len(tokens) and session.turns == 2
    assert first[-1].stats.finish_reason == "length"

    session.drop_oldest_turn()
    assert session.turns == 1 and session.messages[0] == {"role": "user", "content": "ok"}
    assert session.cache.tokens == []  # the rest is prefilled again on the next turn
    session.reset()
    assert session.messages == [] and session.cache.tokens == []


def test_reply_cut_by_the_caller_is_kept(e2b):
    model, processor = e2b
    session = ChatSession(model, processor)
    stream = session.send(PROMPT, max_tokens=10, stop_token_ids=[])
    pieces = [next(stream).text for _ in range(3)]
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert session.cache.offset == len(session.cache.tokens)
    follow = list(session.send("and then?", max_tokens=3, stop_token_ids=[]))
    assert follow[-1].stats.cached_tokens > 0  # the cut reply stays in the cache


@pytest.fixture(scope="module")
def small_context_checkpoint(chat_checkpoint, tmp_path_factory):
    """The e2b chat checkpoint with a 60-token context."""
    out = tmp_path_factory.mktemp("e2b-context-60")
    shutil.copytree(chat_checkpoint("e2b"), out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 60}))
    return out


def _chat(path, stdin: str, *flags, monkeypatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return cli.main(["--model", str(path), "--chat", "--max-tokens", "3", *flags])


def test_repl_reports_an_overflowing_turn_and_goes_on(small_context_checkpoint, capsys, monkeypatch):
    long_turn = "the cat sat on the mat " * 6
    assert _chat(small_context_checkpoint, f"hello\n{long_turn}\n/reset\nhi\n", monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert "error: the prompt is" in err and "context of 60 tokens" in err and "/reset" in err
    assert "Traceback" not in err and "(new conversation)" in err
    stats = [line for line in err.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 2 and "cached" not in stats[1]  # the turn after /reset starts a fresh conversation


def test_repl_drops_oldest_turns_when_asked(small_context_checkpoint, capsys, monkeypatch):
    turns = "".join(f"turn number {i} is here\n" for i in range(4))
    assert _chat(small_context_checkpoint, turns, "--drop-oldest-turns", monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert "(dropped the oldest turn to make room)" in err and "error:" not in err
    assert len([line for line in err.splitlines() if line.startswith("prompt:")]) == 4

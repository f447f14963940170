"""The server through the official `openai` and `anthropic` clients, on tiny checkpoints (a server per checkpoint,
started in the test process): answers equal `generate()` greedy on the same model, streamed and not, through
every API; prompts (tools, tool results, thinking, images, audio) equal transformers' rendering; prefix reuse
is exact; 8 concurrent clients each get their solo answer; bad input is a shaped 4xx and the next request is
answered as before."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import mlx.core as mx
import pytest

import checkpoints
from server_fixtures import API_KEY, start_server
from mlx_gemma4.generate import generate
from mlx_gemma4.server.output import parse_output

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
N = 12  # tokens per answer


def reference(server, messages, *, max_tokens=N, tools=None, enable_thinking=False, **kwargs) -> str:
    """What the server should answer: generate() greedy on the same model and prompt."""
    return generate(server.model, server.processor, messages, max_tokens=max_tokens, tools=tools,
                    enable_thinking=enable_thinking, **kwargs)


def chat(server, messages, **kwargs):
    return server.openai().chat.completions.create(model="tiny", messages=messages, max_tokens=kwargs.pop(
        "max_tokens", N), temperature=kwargs.pop("temperature", 0), **kwargs)


def stream_chat(server, messages, **kwargs):
    chunks = list(server.openai().chat.completions.create(
        model="tiny", messages=messages, max_tokens=kwargs.pop("max_tokens", N), temperature=0, stream=True,
        stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    return text, reasoning, chunks


@pytest.fixture(scope="module")
def text_server(chat_checkpoint):
    server = start_server(chat_checkpoint("e2b"))
    yield server
    server.stop()


# -- answers equal generate() -------------------------------------------------------------------------------------
def test_chat_completions_equal_generate(text_server):
    expected = parse_output(reference(text_server, HELLO))
    reply = chat(text_server, HELLO)
    assert reply.choices[0].message.content == expected.content
    assert reply.choices[0].finish_reason == "length"
    ids = text_server.processor.prompt_ids(HELLO)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == N
    text, _, chunks = stream_chat(text_server, HELLO)
    assert text == expected.content
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-2].choices[0].finish_reason == "length"


def test_anthropic_messages_equal_generate(text_server):
    system = "Answer briefly."
    expected = parse_output(reference(text_server, [{"role": "system", "content": system}, *HELLO]))
    client = text_server.anthropic()
    message = client.messages.create(model="tiny", max_tokens=N, system=system, messages=HELLO,
                                     extra_body={"temperature": 0, "top_k": 1})
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == expected.content
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == N
    with client.messages.stream(model="tiny", max_tokens=N, system=system, messages=HELLO) as stream:
        assert "".join(stream.text_stream) == expected.content
        final = stream.get_final_message()
    assert final.content[0].text == expected.content and final.stop_reason == "max_tokens"


def test_responses_equal_generate(text_server):
    expected = parse_output(reference(text_server, [{"role": "system", "content": "Be kind."}, *HELLO]))
    client = text_server.openai()
    response = client.responses.create(model="tiny", instructions="Be kind.", input=HELLO[0]["content"],
                                       max_output_tokens=N)
    assert response.output_text == expected.content and response.status == "incomplete"
    with client.responses.stream(model="tiny", instructions="Be kind.", input=HELLO, max_output_tokens=N) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == expected.content


def test_completions_raw_prompt_equal_generate(text_server):
    prompt = "The capital of France is"
    expected = generate(text_server.model, text_server.processor, prompt, use_chat_template=False, max_tokens=N)
    reply = text_server.openai().completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(text_server.processor.encode(prompt))
    streamed = text_server.openai().completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0,
                                                       stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_sampling_settings(text_server):
    """Seeded sampling repeats; a stop string cuts the answer; log-probabilities describe the greedy choice."""
    settings = dict(temperature=0.9, top_p=0.9, seed=7, extra_body={"top_k": 40, "min_p": 0.05})
    first = chat(text_server, HELLO, **settings).choices[0].message.content
    assert chat(text_server, HELLO, **settings).choices[0].message.content == first
    greedy = chat(text_server, HELLO).choices[0].message.content
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    cut = chat(text_server, HELLO, stop=[stop])
    assert cut.choices[0].message.content == greedy[: greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    reply = chat(text_server, HELLO, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == N
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    penalized = chat(text_server, HELLO, presence_penalty=1.5, frequency_penalty=1.0,
                     extra_body={"repetition_penalty": 1.3})
    assert penalized.choices[0].message.content == parse_output(reference(
        text_server, HELLO, repetition_penalty=1.3, logits_processors=mlx_lm_penalties(1.5, 1.0))).content


def mlx_lm_penalties(presence: float, frequency: float):
    from mlx_lm.sample_utils import make_frequency_penalty, make_presence_penalty

    return [make_presence_penalty(presence), make_frequency_penalty(frequency)]


def test_multi_turn_reuses_the_prefix_exactly(text_server):
    """The next request of a conversation prefills only what follows the previous prompt's model-turn start (the
    sliding window of 8 is long past), reports it as cached, and answers what generate() from scratch does."""
    conversation = [{"role": "system", "content": "You are a careful assistant."}, *HELLO]
    for turn in range(3):
        reply = chat(text_server, conversation)
        print("TURN", turn, reply.usage)
        assert reply.choices[0].message.content == parse_output(reference(text_server, conversation)).content
        cached = reply.usage.prompt_tokens_details.cached_tokens
        # (a first turn may reuse the few tokens it shares with other tests' prompts: `<bos><|turn>system\n`)
        assert cached < 8 if turn == 0 else cached > 20
        conversation += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": f"Tell me more, part {turn}."}]
    assert len(text_server.generator.prefixes) >= 1 and text_server.generator.prefixes.nbytes > 0


def test_thinking_goes_to_reasoning(text_server, monkeypatch):
    script = "<|channel>thought\nLet me think {about} it.<channel|>The answer is 4."
    rig(text_server, monkeypatch, script)
    body = {"chat_template_kwargs": {"enable_thinking": True}}
    reply = chat(text_server, HELLO, extra_body=body, max_tokens=64)
    message = reply.choices[0].message
    assert message.content == "The answer is 4." and message.reasoning_content == "Let me think {about} it."
    assert reply.usage.prompt_tokens == len(text_server.processor.prompt_ids(HELLO, enable_thinking=True))
    text, reasoning, _ = stream_chat(text_server, HELLO, extra_body={"reasoning_effort": "high"}, max_tokens=64)
    assert (text, reasoning) == ("The answer is 4.", "Let me think {about} it.")
    message = text_server.anthropic().messages.create(model="tiny", max_tokens=64, messages=HELLO,
                                                      thinking={"type": "enabled", "budget_tokens": 1024})
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "Let me think {about} it."), ("text", "The answer is 4.")]


# -- tool calls -----------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                     "tags": {"type": "array", "items": {"type": "string"}}},
                   "required": ["city"]}}}
CALL_TEXT = ('Checking.<|tool_call>call:get_weather{city:<|"|>Paris, {FR} "ville"<|"|>,days:3,'
             'tags:[<|"|>a<|"|>,<|"|>ü<|"|>],opts:{deep:{ok:true}}}<tool_call|><|tool_response>')
CALL_ARGS = {"city": 'Paris, {FR} "ville"', "days": 3, "tags": ["a", "ü"], "opts": {"deep": {"ok": True}}}


def rig(server, monkeypatch, script: str) -> None:
    """Make the model write `script` (then its end of turn): a logits processor forcing each token in turn."""
    ids = server.processor.tokenizer.encode(script, add_bos=False) + [server.processor.tokenizer.token_id("turn_end")]
    vocab = server.model.config.text.vocab_size
    original = type(server.generator)._processors

    def processors(self, prompt, settings):
        start = len(prompt.ids)

        def force(tokens, logits):
            n = min(tokens.shape[-1] - start, len(ids) - 1)
            return mx.where(mx.arange(vocab) == ids[n], 0.0, -1e9)[None].astype(logits.dtype)

        return [*original(self, prompt, settings), force]

    monkeypatch.setattr(type(server.generator), "_processors", processors)


def test_forced_tool_call_through_both_clients(text_server, monkeypatch):
    rig(text_server, monkeypatch, CALL_TEXT)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = chat(text_server, messages, tools=[WEATHER], max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL_ARGS
    text, _, chunks = stream_chat(text_server, messages, tools=[WEATHER], max_tokens=200)
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert text == "Checking." and len(streamed) == 1 and json.loads(streamed[0].function.arguments) == CALL_ARGS
    assert chunks[-2].choices[0].finish_reason == "tool_calls"

    anthropic_tool = {"name": "get_weather", "description": "Weather in a city.",
                      "input_schema": WEATHER["function"]["parameters"]}
    client = text_server.anthropic()
    message = client.messages.create(model="tiny", max_tokens=200, messages=messages, tools=[anthropic_tool])
    assert message.stop_reason == "tool_use" and [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].name == "get_weather" and message.content[1].input == CALL_ARGS
    with client.messages.stream(model="tiny", max_tokens=200, messages=messages, tools=[anthropic_tool]) as stream:
        final = stream.get_final_message()
    assert final.content[1].input == CALL_ARGS and final.stop_reason == "tool_use"

    response = text_server.openai().responses.create(model="tiny", input="Weather in Paris?", max_output_tokens=200,
                                                     tools=[{"type": "function", **WEATHER["function"]}])
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and json.loads(calls[0].arguments) == CALL_ARGS and response.output_text == "Checking."


def test_tool_choice(text_server, monkeypatch):
    """A named function or "required": the prompt ends in the start of the call, which the model completes;
    "none": the tool-call token is banned."""
    messages = [{"role": "user", "content": "Weather?"}]
    base = len(text_server.processor.prompt_ids(messages, tools=[WEATHER]))
    none = chat(text_server, messages, tools=[WEATHER], tool_choice="none", logprobs=True, top_logprobs=5)
    assert none.usage.prompt_tokens == base and not none.choices[0].message.tool_calls
    assert all(t.token != "<|tool_call>" for e in none.choices[0].logprobs.content for t in e.top_logprobs)
    rig(text_server, monkeypatch, 'city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>')
    named = chat(text_server, messages, tools=[WEATHER], max_tokens=40,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.usage.prompt_tokens == base + len(text_server.processor.tokenizer.encode(
        "<|tool_call>call:get_weather{", add_bos=False))
    (call,) = named.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    rig(text_server, monkeypatch, 'call:get_weather{city:<|"|>Rome<|"|>}<tool_call|><|tool_response>')
    required = chat(text_server, messages, tools=[WEATHER], max_tokens=40, tool_choice="required")
    assert json.loads(required.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    message = text_server.anthropic().messages.create(
        model="tiny", max_tokens=40, messages=messages, tool_choice={"type": "any"},
        tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}])
    assert message.content[-1].type == "tool_use" and message.content[-1].input == {"city": "Rome"}


def test_tool_result_round_trip(text_server, chat_checkpoint):
    """The call the model made, its result and the answer after it go back in as history; the prompt is
    transformers' rendering of the equivalent HF messages, and the answer is generate()'s on those."""
    openai_messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": json.dumps(CALL_ARGS)}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": '{"temp": 21}'}]
    hf_messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}],
         "tool_responses": [{"name": "get_weather", "response": {"temp": 21}}]}]
    reply = chat(text_server, openai_messages, tools=[WEATHER])
    hf_ids = checkpoints.load_hf_tokenizer(chat_checkpoint("e2b")).apply_chat_template(
        hf_messages, tools=[WEATHER], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(hf_ids)
    assert reply.choices[0].message.content == parse_output(
        reference(text_server, hf_messages, tools=[WEATHER])).content
    # the same history through Anthropic's client: tool_use / tool_result blocks
    message = text_server.anthropic().messages.create(model="tiny", max_tokens=N, extra_body={"temperature": 0},
                                                      tools=[{"name": "get_weather", "description": "Weather in a city.",
                                                              "input_schema": WEATHER["function"]["parameters"]}],
                                                      messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "t1", "name": "get_weather", "input": CALL_ARGS}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": '{"temp": 21}'}]}])
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(hf_ids)
    assert message.content[0].text == reply.choices[0].message.content
    # and through the Responses API: function_call / function_call_output items
    response = text_server.openai().responses.create(
        model="tiny", max_output_tokens=N, temperature=0, tools=[{"type": "function", **WEATHER["function"]}],
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
               {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": json.dumps(CALL_ARGS)},
               {"type": "function_call_output", "call_id": "c1", "output": '{"temp": 21}'}])
    assert response.usage.input_tokens == len(hf_ids)
    assert response.output_text == reply.choices[0].message.content


# -- concurrency ----------------------------------------------------------------------------------------------------
def test_eight_concurrent_clients_get_their_solo_answers(text_server):
    prompts = [[{"role": "user", "content": f"Question {i}: {'why ' * i}is the sky blue?"}] for i in range(8)]
    lengths = [N + 2 * i for i in range(8)]
    expected = [parse_output(reference(text_server, p, max_tokens=n)).content for p, n in zip(prompts, lengths)]

    async def run():
        client = text_server.async_openai()

        async def one(i):
            await asyncio.sleep(0.05 * i)  # arrive while the others decode
            if i % 2:
                reply = await client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=lengths[i],
                                                             temperature=0)
                return reply.choices[0].message.content
            stream = await client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=lengths[i],
                                                          temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        return await asyncio.gather(*(one(i) for i in range(8)))

    assert asyncio.run(run()) == expected


def test_client_disconnect_cancels(text_server):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.Client(base_url=text_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while text_server.generator.engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text_server.generator.engine.active == 0
    assert chat(text_server, HELLO).choices[0].message.content == parse_output(reference(text_server, HELLO)).content


# -- bad input --------------------------------------------------------------------------------------------------------
def raw(server, path, *, body=None, content=None, key=API_KEY, headers=None):
    headers = {"Authorization": f"Bearer {key}", **(headers or {})}
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


BAD_REQUESTS = [
    ("malformed_json", "/v1/chat/completions", dict(content=b'{"messages": [', headers={"content-type": "application/json"}), 400),
    ("not_an_object", "/v1/chat/completions", dict(body=[1, 2]), 400),
    ("missing_messages", "/v1/chat/completions", dict(body={"model": "tiny"}), 400),
    ("unknown_role", "/v1/chat/completions", dict(body={"messages": [{"role": "robot", "content": "hi"}]}), 400),
    ("max_tokens_zero", "/v1/chat/completions", dict(body={"messages": HELLO, "max_tokens": 0}), 400),
    ("max_tokens_negative", "/v1/completions", dict(body={"prompt": "hi", "max_tokens": -3}), 400),
    ("n_two", "/v1/chat/completions", dict(body={"messages": HELLO, "n": 2}), 400),
    ("temperature_nan", "/v1/chat/completions", dict(content=b'{"messages": [{"role": "user", "content": "x"}], '
                                                             b'"temperature": NaN}'), 400),
    ("not_an_image", "/v1/chat/completions", dict(body={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}]}]}),
     400),
    ("file_url", "/v1/chat/completions", dict(body={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}), 400),
    ("local_path", "/v1/messages", dict(body={"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "/etc/passwd"}}]}]}), 400),
    ("wrong_key", "/v1/chat/completions", dict(body={"messages": HELLO}, key="nope"), 401),
    ("wrong_key_anthropic", "/v1/messages", dict(body={"messages": HELLO, "max_tokens": 5}, key="nope"), 401),
    ("anthropic_missing_max_tokens", "/v1/messages", dict(body={"messages": HELLO}), 400),
    ("unknown_route", "/v1/embeddings", dict(body={"input": "x"}), 404),
    ("bad_tool_choice", "/v1/chat/completions", dict(body={"messages": HELLO, "tool_choice": "required"}), 400),
]


@pytest.mark.parametrize("name,path,kwargs,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_shaped_4xx(text_server, name, path, kwargs, status):
    response = raw(text_server, path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def test_oversized_body_and_long_prompt_then_normal_answer(text_server):
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (50 << 20) + b'"}]}'
    response = raw(text_server, "/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    context = text_server.generator.context_length
    long_prompt = [{"role": "user", "content": "x " * context}]
    started = time.monotonic()
    response = raw(text_server, "/v1/chat/completions", body={"messages": long_prompt})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 10  # refused before any prefill
    import openai

    with pytest.raises(openai.BadRequestError, match="context"):
        chat(text_server, long_prompt)
    assert chat(text_server, HELLO).choices[0].message.content == parse_output(reference(text_server, HELLO)).content


def test_models_and_health(text_server):
    assert [m.id for m in text_server.openai().models.list()] == ["tiny-gemma4"]
    assert httpx.get(text_server.url + "/health").json()["status"] == "ok"
    assert httpx.get(text_server.url + "/v1/models").status_code == 401


# -- the command line and the README's examples ---------------------------------------------------------------------
def readme_section(title: str) -> str:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_command_line_server_answers_the_readme_examples(text_server, chat_checkpoint):
    """`python -m mlx_gemma4.server` as the README starts it (on the tiny checkpoint, float32, a free port), then
    the README's openai and anthropic snippets and curl line, run as written against it: each prints
    generate()'s answer."""
    import contextlib
    import re
    import shlex
    import socket
    import subprocess
    import sys

    section = readme_section("Use it from your tools")
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    command = next(b for kind, b in blocks if kind == "bash" and "mlx_gemma4.server" in b).split("#")[0]
    python_blocks = [b for kind, b in blocks if kind == "python"]
    curl = next(b for kind, b in blocks if kind == "bash" and b.startswith("curl"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    local = lambda text: text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")  # noqa: E731
    argv = shlex.split(command.replace("google/gemma-4-E2B-it", str(chat_checkpoint("e2b")))
                       .replace("--port 8080", f"--port {port}")) + ["--dtype", "float32", "--log-level", "warning"]
    assert argv[:3] == ["python", "-m", "mlx_gemma4.server"]
    process = subprocess.Popen([sys.executable, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        question = [{"role": "user", "content": "Why is the sky blue?"}]
        expected = parse_output(reference(text_server, question, max_tokens=100)).content
        assert len(python_blocks) == 2
        for block in python_blocks:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(local(block), "README.md", "exec"), {})
            assert printed.getvalue() == expected + "\n"
        reply = json.loads(subprocess.run(["bash", "-c", local(curl)], capture_output=True, text=True,
                                          check=True).stdout)
        assert reply["choices"][0]["message"]["content"] == parse_output(
            reference(text_server, [{"role": "user", "content": "Hi!"}], max_tokens=50)).content
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- images and audio -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_server(multimodal_checkpoint, tmp_path_factory):
    import shutil

    out = tmp_path_factory.mktemp("server-e2b-vision-audio")
    shutil.copytree(multimodal_checkpoint("e2b", audio=True), out, dirs_exist_ok=True)
    checkpoints.make_tokenizer(out, checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)
    server = start_server(out)
    server.directory = out
    yield server
    server.stop()


def png_bytes(array) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def wav_bytes(samples) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, 16000, format="WAV")
    return out.getvalue()


def test_image_and_audio_prompts(media_server, tmp_path):
    from hardening_fixtures import hf_processor, picture, tone

    image, audio = png_bytes(picture(3, 72, 96)), wav_bytes(tone(0.4, 2))
    (tmp_path / "a.png").write_bytes(image)
    (tmp_path / "a.wav").write_bytes(audio)
    openai_messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "text", "text": "What do you see and hear?"},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}]}]
    hf_messages = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "a.png")},
                                                {"type": "text", "text": "What do you see and hear?"},
                                                {"type": "audio", "path": str(tmp_path / "a.wav")}]}]
    hf = hf_processor(str(media_server.directory)).apply_chat_template(
        hf_messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    reply = chat(media_server, openai_messages)
    assert reply.usage.prompt_tokens == len(hf["input_ids"][0])
    expected = parse_output(reference(media_server, hf_messages)).content
    assert reply.choices[0].message.content == expected
    text, _, _ = stream_chat(media_server, openai_messages)
    assert text == expected
    # the same image through Anthropic's client (base64 source)
    message = media_server.anthropic().messages.create(
        model="tiny", max_tokens=N, extra_body={"temperature": 0}, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(image).decode()}},
            {"type": "text", "text": "What do you see?"}]}])
    hf_image = [{"role": "user", "content": [hf_messages[0]["content"][0], {"type": "text", "text": "What do you see?"}]}]
    assert message.content[0].text == parse_output(reference(media_server, hf_image)).content
    # a different image of the same size gives another answer (prefix reuse tells images apart)
    other = png_bytes(picture(4, 72, 96))
    other_messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(other).decode()}},
        *openai_messages[0]["content"][1:]]}]
    (tmp_path / "b.png").write_bytes(other)
    hf_other = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "b.png")},
                                             *hf_messages[0]["content"][1:]]}]
    assert chat(media_server, other_messages).choices[0].message.content == parse_output(
        reference(media_server, hf_other)).content


def test_remote_image_urls_are_fetched_with_limits(media_server):
    from hardening_fixtures import StaticServer, picture

    image = png_bytes(picture(5, 48, 64))
    files = StaticServer({"/a.png": image, "/big": b"x" * (30 << 20)})
    try:
        def ask(url):
            return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "Describe."}]}]

        data_url = "data:image/png;base64," + base64.b64encode(image).decode()
        assert chat(media_server, ask(files.url + "/a.png")).choices[0].message.content == \
            chat(media_server, ask(data_url)).choices[0].message.content
        response = raw(media_server, "/v1/chat/completions", body={"messages": ask(files.url + "/big")})
        assert response.status_code == 400 and "limit" in response.json()["error"]["message"]
        response = raw(media_server, "/v1/chat/completions", body={"messages": ask(files.url + "/missing.png")})
        assert response.status_code == 400 and "404" in response.json()["error"]["message"]
        media_server.generator.fetch["allow"] = False  # what --no-fetch-urls sets
        try:
            response = raw(media_server, "/v1/chat/completions", body={"messages": ask(files.url + "/a.png")})
            assert response.status_code == 400 and response.json()["error"]["code"] == "url_fetch_disabled"
        finally:
            media_server.generator.fetch["allow"] = True
    finally:
        files.close()


def concurrent_streams(server, prompts, **kwargs) -> list[str]:
    """The streamed answers of one client thread per prompt, all at once."""
    results = [None] * len(prompts)

    def ask(i):
        results[i] = stream_chat(server, prompts[i], **kwargs)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- MoE ----------------------------------------------------------------------------------------------------------------
def test_moe_server_equals_generate(chat_checkpoint):
    server = start_server(chat_checkpoint("26b"))
    try:
        prompts = [HELLO, [{"role": "user", "content": "Name three colors, please."}]]
        expected = [parse_output(reference(server, p)).content for p in prompts]

        assert concurrent_streams(server, prompts) == expected
        assert server.anthropic().messages.create(model="tiny", max_tokens=N, messages=prompts[1]).content[0].text == \
            expected[1]
    finally:
        server.stop()


# -- --draft-model (speculative decoding) -------------------------------------------------------------------------
def test_draft_model_server_equals_generate(chat_checkpoint, tmp_path):
    """With a drafter the same APIs answer what generate() without one does (greedy: the same tokens), streamed
    and not, through both clients; two concurrent clients queue; a conversation's next turn reuses its prefix;
    log-probabilities are a 400 naming the field."""
    from checkpoints import family

    server = start_server(chat_checkpoint("26b"), family.make_assistant_checkpoint(tmp_path / "d", "26b"))
    try:
        assert type(server.generator.engine).__name__ == "DraftEngine"
        prompts = [HELLO, [{"role": "user", "content": "Name three colors, please."}]]
        expected = [parse_output(reference(server, p, max_tokens=20)).content for p in prompts]
        assert concurrent_streams(server, prompts, max_tokens=20) == expected
        assert chat(server, HELLO, max_tokens=20).choices[0].message.content == expected[0]
        assert server.anthropic().messages.create(model="tiny", max_tokens=20, messages=prompts[1]).content[0].text \
            == expected[1]
        follow = [*HELLO, {"role": "assistant", "content": expected[0]}, {"role": "user", "content": "And then?"}]
        reply = chat(server, follow, max_tokens=20)
        assert reply.choices[0].message.content == parse_output(reference(server, follow, max_tokens=20)).content
        assert reply.usage.prompt_tokens_details.cached_tokens > 10
        response = raw(server, "/v1/chat/completions", body={"messages": HELLO, "logprobs": True})
        assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"
    finally:
        server.stop()

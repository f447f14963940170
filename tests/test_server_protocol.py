"""The server's protocol pieces without a model: the model's output split into reasoning / content / tool calls
(whole and streamed in any pieces), and the three APIs' histories rendered exactly as transformers renders the
equivalent Hugging Face messages."""

from __future__ import annotations

import json
import random

import pytest

from mlx_gemma4.processing.chat import ToolCall, parse_tool_calls
from mlx_gemma4.server.errors import APIError
from mlx_gemma4.server.messages import anthropic_messages, openai_chat, responses_input
from mlx_gemma4.server.output import OutputParser, collect, parse_output

Q = '<|"|>'


def call(name: str, args: str) -> str:
    return f"<|tool_call>call:{name}{args}<tool_call|>"


# (model output, expected calls, expected content, expected reasoning)
TOOL_CALL_TABLE = {
    "plain": (call("get_weather", "{city:" + Q + "Paris" + Q + "}"), [ToolCall("get_weather", {"city": "Paris"})],
              "", ""),
    "nested_objects_arrays": (
        call("plan", "{steps:[{name:" + Q + "a" + Q + ",deps:[]},{name:" + Q + "b" + Q + ",deps:[" + Q + "a" + Q
             + "]}],meta:{depth:{x:{y:{}}}}}"),
        [ToolCall("plan", {"steps": [{"name": "a", "deps": []}, {"name": "b", "deps": ["a"]}],
                           "meta": {"depth": {"x": {"y": {}}}}})], "", ""),
    "numbers_booleans_null": (
        call("f", "{i:-3,f:2.5e-3,big:12345678901234567890,t:true,f2:false,n:null}"),
        [ToolCall("f", {"i": -3, "f": 2.5e-3, "big": 12345678901234567890, "t": True, "f2": False, "n": None})],
        "", ""),
    "strings_with_braces_quotes_unicode": (
        call("write", "{path:" + Q + "a {b}.json" + Q + ",text:" + Q + 'say "hi", {x: [1]} \\n é 🌍 ✓' + Q + "}"),
        [ToolCall("write", {"path": "a {b}.json", "text": 'say "hi", {x: [1]} \\n é 🌍 ✓'})], "", ""),
    "code_argument_with_newlines": (
        call("run", "{code:" + Q + "def f(x):\n    return {'k': [x, ']']}\n" + Q + "}"),
        [ToolCall("run", {"code": "def f(x):\n    return {'k': [x, ']']}\n"})], "", ""),
    "several_calls_and_text": (
        "Let me check." + call("a", "{}") + call("ns.b-2", "{q:" + Q + "," + Q + "}"),
        [ToolCall("a", {}), ToolCall("ns.b-2", {"q": ","})], "Let me check.", ""),
    "whitespace_and_json_quotes": (
        call("f", ' { city : "Paris, FR" , "n" : 2 , s: ' + Q + "x" + Q + " } "),
        [ToolCall("f", {"city": "Paris, FR", "n": 2, "s": "x"})], "", ""),
    "thinking_then_call": (
        "<|channel>thought\nThe user wants weather.<channel|>" + call("w", "{c:" + Q + "Oslo" + Q + "}"),
        [ToolCall("w", {"c": "Oslo"})], "", "The user wants weather."),
    "thinking_then_answer": ("<|channel>thought\nhmm <no tags> here<channel|>The answer is 4.", [],
                             "The answer is 4.", "hmm <no tags> here"),
    "lookalike_markup_in_text": ("Use <|tool to call and a < b, <|channel is not a channel.", [],
                                 "Use <|tool to call and a < b, <|channel is not a channel.", ""),
    "malformed_call_kept_as_text": (call("f", "{a:" + Q + "open}"), [], call("f", "{a:" + Q + "open}"), ""),
    "cut_off_call_kept_as_text": ("Sure<|tool_call>call:f{a:1", [], "Sure<|tool_call>call:f{a:1", ""),
    "unclosed_thought": ("<|channel>thought\nstill thinking", [], "", "still thinking"),
}


def pieces(text: str, how: str, seed: int = 0) -> list[str]:
    if how == "whole":
        return [text]
    if how == "chars":
        return list(text)
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i:i + n])
        i += n
    return out


def stream(text: str, how: str, stop=(), seed: int = 0):
    parser = OutputParser(stop)
    deltas = []
    for piece in pieces(text, how, seed):
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return deltas, parser


@pytest.mark.parametrize("case", list(TOOL_CALL_TABLE))
@pytest.mark.parametrize("how", ["whole", "chars", "random"])
def test_tool_call_table(case, how):
    text, calls, content, reasoning = TOOL_CALL_TABLE[case]
    for seed in range(3 if how == "random" else 1):
        deltas, parser = stream(text, how, seed=seed)
        out = collect(deltas, parser.stopped_by)
        assert out.tool_calls == calls and out.content == content and out.reasoning == reasoning
        assert out == parse_output(text)
    if calls:  # the processor's parser reads the same calls from the raw text
        assert parse_tool_calls(text) == calls


def test_no_markup_in_streamed_content():
    text = ("<|channel>thought\nplan<channel|>Hello " + call("f", "{x:" + Q + "a}b?" + Q + "}")
            + " world" + call("g", "{}"))
    for how in ("chars", "random"):
        deltas, _ = stream(text, how)
        for d in deltas:
            if d.kind == "content":
                assert not any(m in d.text for m in ("<|", "|>", "call:")), d


@pytest.mark.parametrize("how", ["whole", "chars", "random"])
def test_stop_strings_cut_the_content(how):
    deltas, parser = stream("one two STOP three", how, stop=["STOP", "zzz"])
    assert collect(deltas).content == "one two " and parser.stopped_by == "STOP"
    # a stop string's prefix at the end is released when the text ends
    deltas, parser = stream("one two ST", how, stop=["STOP"])
    assert collect(deltas).content == "one two ST" and parser.stopped_by is None
    # markers are not stop-string matches; stop strings are matched in the answer only
    deltas, parser = stream("<|channel>thought\nSTOP<channel|>ok STOP", how, stop=["STOP"])
    out = collect(deltas)
    assert (out.reasoning, out.content, parser.stopped_by) == ("STOP", "ok ", "STOP")


# -- histories ------------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City."},
                                                     "days": {"type": "integer"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time.",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}

# What a transformers user writes for Gemma 4: results in the calling assistant message's tool_responses, and the
# answer that follows them in the same turn.
HF_HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time in Tokyo?"},
    {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
        {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}}],
     "tool_responses": [{"name": "get_weather", "response": {"temp": 21, "sky": "clear {ish}"}},
                        {"name": "get_time", "response": "09:30"}],
     "content": "Paris: 21, clear. Tokyo: 09:30."},
    {"role": "user", "content": "Thanks!"},
]

OPENAI_HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time in Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Asia/Tokyo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear {ish}"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "09:30"},
    {"role": "assistant", "content": "Paris: 21, clear. Tokyo: 09:30."},
    {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
]

ANTHROPIC_BODY = {
    "system": "Be brief.",
    "tools": [{"name": t["function"]["name"], "description": t["function"]["description"],
               "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)],
    "messages": [
        {"role": "user", "content": "Weather in Paris and the time in Tokyo?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 2}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"tz": "Asia/Tokyo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": '{"temp": 21, "sky": "clear {ish}"}'}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "09:30"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris: 21, clear. Tokyo: 09:30."}]},
        {"role": "user", "content": "Thanks!"}]}

RESPONSES_BODY = {
    "instructions": "Be brief.",
    "tools": [{"type": "function", **t["function"]} for t in (WEATHER, TIME)],
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and the time in Tokyo?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris","days":2}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": '{"tz":"Asia/Tokyo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": '{"temp": 21, "sky": "clear {ish}"}'},
        {"type": "function_call_output", "call_id": "c2", "output": "09:30"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Paris: 21, clear. Tokyo: 09:30."}]},
        {"role": "user", "content": "Thanks!"}]}


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir):
    import checkpoints
    from mlx_gemma4.processing.processor import Processor

    directory = tokenizer_dir()
    return Processor.from_pretrained(directory), checkpoints.load_hf_tokenizer(directory)


@pytest.mark.parametrize("thinking", [False, True])
def test_histories_render_as_transformers_renders_the_hf_messages(tokenizers, thinking):
    processor, hf = tokenizers
    reference = hf.apply_chat_template(HF_HISTORY, tools=[WEATHER, TIME], tokenize=True, return_dict=False,
                                       add_generation_prompt=True, enable_thinking=thinking)
    for conversation in (openai_chat({"messages": OPENAI_HISTORY, "tools": [WEATHER, TIME]}),
                         anthropic_messages(ANTHROPIC_BODY), responses_input(RESPONSES_BODY)):
        ids = processor.prompt_ids(conversation.messages, tools=conversation.tools, enable_thinking=thinking)
        assert ids == reference
        assert conversation.tool_names == ["get_weather", "get_time"]


def test_results_matched_by_id_not_order():
    items = list(RESPONSES_BODY["input"])
    items[3], items[4] = items[4], items[3]  # the outputs arrive c2 before c1
    conversation = responses_input({**RESPONSES_BODY, "input": items})
    names = [r["name"] for r in conversation.messages[2]["tool_responses"]]
    assert names == ["get_time", "get_weather"]
    assert conversation.messages[2]["tool_responses"][1]["response"] == {"temp": 21, "sky": "clear {ish}"}


def test_tool_result_continues_the_model_turn(tokenizers):
    """A request whose last message is a tool result prompts the model to go on in its own turn."""
    processor, hf = tokenizers
    conversation = openai_chat({"messages": OPENAI_HISTORY[:5], "tools": [WEATHER, TIME]})
    text = processor.decode(processor.prompt_ids(conversation.messages, tools=conversation.tools))
    assert text.endswith("<|tool_response>response:get_time{value:<|\"|>09:30<|\"|>}<tool_response|>"
                         "<|channel>thought\n<channel|>")
    reference = hf.apply_chat_template([*HF_HISTORY[:2], {**HF_HISTORY[2], "content": None}], tools=[WEATHER, TIME],
                                       tokenize=True, return_dict=False, add_generation_prompt=True)
    assert processor.prompt_ids(conversation.messages, tools=conversation.tools) == reference


BAD_BODIES = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "x"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain,hi"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%%"}}]}]},
     "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]}, "tools[0].type"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_chat_bodies_are_400_naming_the_field(body, param):
    with pytest.raises(APIError) as info:
        openai_chat(body)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.openai_body()["error"]["type"] == "invalid_request_error"


def test_bad_anthropic_and_responses_bodies():
    with pytest.raises(APIError, match="unknown role 'system'"):
        anthropic_messages({"messages": [{"role": "system", "content": "x"}]})
    with pytest.raises(APIError, match="unsupported content block 'document'"):
        anthropic_messages({"messages": [{"role": "user", "content": [{"type": "document"}]}]})
    with pytest.raises(APIError, match="previous_response_id"):
        responses_input({"input": "hi", "previous_response_id": "resp_1"})
    with pytest.raises(APIError, match="only function tools"):
        responses_input({"input": "hi", "tools": [{"type": "web_search"}]})
    with pytest.raises(APIError, match="file ids"):
        responses_input({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]})
    assert json.dumps(APIError(401, "no").anthropic_body()) == (
        '{"type": "error", "error": {"type": "authentication_error", "message": "no"}}')


# -- fuzzing: any JSON body is either accepted or a 400 naming the problem, never another exception ------------
def _fuzz_bodies():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=8),
                        st.sampled_from(["user", "assistant", "tool", "system", "text", "image_url", "image",
                                         "tool_use", "tool_result", "function", "auto", "required", "data:image/png;base64,AA",
                                         "file:///etc/passwd", "input_audio", "function_call_output"]))
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
            ["role", "content", "type", "text", "tool_calls", "function", "name", "arguments", "id", "tool_call_id",
             "image_url", "url", "source", "data", "input", "tool_use_id", "input_audio", "call_id", "output"]),
            inner, max_size=4)), max_leaves=12)
    keys = st.sampled_from(["messages", "input", "prompt", "system", "instructions", "tools", "tool_choice",
                            "max_tokens", "max_completion_tokens", "max_output_tokens", "temperature", "top_p",
                            "top_k", "min_p", "seed", "stop", "stop_sequences", "n", "logprobs", "top_logprobs",
                            "stream", "stream_options", "response_format", "reasoning_effort", "thinking",
                            "chat_template_kwargs", "repetition_penalty", "presence_penalty", "max_soft_tokens"])
    return st.dictionaries(keys, values, max_size=6)


def test_fuzzed_request_bodies_are_accepted_or_400():
    from types import SimpleNamespace

    from hypothesis import HealthCheck, given, settings

    from mlx_gemma4.server.anthropic_api import MessagesRequest
    from mlx_gemma4.server.openai_api import ChatRequest, CompletionRequest
    from mlx_gemma4.server.responses_api import ResponsesRequest

    generator = SimpleNamespace(model_id="m", max_tokens=16, sampling_defaults={})
    seen = {"ok": 0, "400": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_fuzz_bodies())
    def check(body):
        for request in (ChatRequest, CompletionRequest, ResponsesRequest, MessagesRequest):
            try:
                request(dict(body), generator)
                seen["ok"] += 1
            except APIError as e:
                assert e.status == 400 and e.message
                seen["400"] += 1

    check()
    assert seen["400"] > 0

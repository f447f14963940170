"""Chat formatting equals transformers' apply_chat_template; tool schemas; tool-call and thinking parsing."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from mlx_gemma4.processing.chat import (
    BUILTIN_TEMPLATE, ToolCall, function_schema, load_chat_template, parse_tool_calls, render_chat, split_thinking,
)
from mlx_gemma4.processing.tokenizer import Tokenizer


def get_weather(city: str, unit: str = "celsius", days: int | None = None, tags: list[str] | None = None) -> dict:
    """Get the current weather for a city.

    Args:
        city: The city name, for example
            "Paris, France".
        unit: Temperature unit (choices: ["celsius", "fahrenheit"])
        days: How many days of forecast.
        tags: Extra labels.

    Returns:
        The weather report.
    """
    return {}


def set_mode(mode: Literal["fast", "slow"], level: float, options: dict[str, int], verbose: bool = False):
    """Switch the device mode.

    Args:
        mode: The mode.
        level: Level between 0 and 1.
        options: Named integer options.
        verbose: Print more.
    """


SEARCH_SCHEMA = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "What to look for."},
        "limit": {"type": ["integer", "null"], "description": "Max results."},
        "filters": {"type": "object", "properties": {"site": {"type": "string"}}, "required": ["site"]},
        "langs": {"type": "array", "items": {"type": "string"}}},
        "required": ["query"]}}}

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
HISTORY = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "<|channel>thought\nGreet back.<channel|>Hi, how can I help?"},
    {"role": "user", "content": [{"type": "text", "text": "  What is 2+2?  "}]},
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}], "content": None},
    {"role": "user", "tool_responses": [{"name": "get_weather", "response": {"temp": 21, "sky": "clear"}}]},
]

CASES = {
    "user_only": ([HISTORY[0]], {}),
    "system_multiturn": ([SYSTEM, *HISTORY], {}),
    "thinking_on": ([SYSTEM, *HISTORY], {"enable_thinking": True}),
    "thinking_on_no_system": (HISTORY, {"enable_thinking": True}),
    "tools_dicts": ([SYSTEM, *TOOL_TURNS], {"tools": [SEARCH_SCHEMA]}),
    "tools_functions": (TOOL_TURNS, {"tools": [get_weather, set_mode]}),
    "tools_thinking": (TOOL_TURNS, {"tools": [get_weather, SEARCH_SCHEMA], "enable_thinking": True}),
    "no_generation_prompt": ([SYSTEM, *HISTORY[:2]], {"add_generation_prompt": False}),
}


@pytest.fixture(scope="module")
def setup(tokenizer_dir):
    import checkpoints

    directory = tokenizer_dir(262144)
    return Tokenizer.from_pretrained(directory), load_chat_template(directory), checkpoints.load_hf_tokenizer(directory)


@pytest.mark.parametrize("case", list(CASES))
def test_render_equals_transformers(setup, case):
    tok, template, hf = setup
    messages, kwargs = CASES[case]
    kwargs = {"add_generation_prompt": True, "enable_thinking": False, **kwargs}
    ours = render_chat(template, messages, special_tokens=tok.special_tokens_map, **kwargs)
    ref = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == ref
    ids = tok.encode(ours)
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids.count(2) == 1 and ids[0] == 2  # <bos> once: the template writes it, encode does not add another


def test_thinking_off_closes_the_thought_channel(setup):
    tok, template, _ = setup
    off = render_chat(template, [{"role": "user", "content": "hi"}], special_tokens=tok.special_tokens_map)
    assert off == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    on = render_chat(template, [{"role": "user", "content": "hi"}], special_tokens=tok.special_tokens_map,
                     enable_thinking=True)
    assert on == "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n"


@pytest.mark.parametrize("func", [get_weather, set_mode])
def test_function_schema_equals_transformers(func):
    from transformers.utils import get_json_schema

    assert function_schema(func) == get_json_schema(func)


def test_function_schema_errors():
    def no_doc(x: int):
        pass

    def undocumented_arg(x: int, y: int):
        """Adds.

        Args:
            x: first
        """

    def no_hint(x):
        """Doc.

        Args:
            x: thing
        """

    with pytest.raises(ValueError, match="no docstring"):
        function_schema(no_doc)
    with pytest.raises(ValueError, match="'y'"):
        function_schema(undocumented_arg)
    with pytest.raises(ValueError, match="type hint"):
        function_schema(no_hint)


def test_template_lookup_order(tmp_path):
    assert load_chat_template(tmp_path) == BUILTIN_TEMPLATE.read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"


def test_template_errors_are_clear():
    with pytest.raises(ValueError, match="syntax error"):
        render_chat("{% if %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="chat template failed: no system"):
        render_chat("{{ raise_exception('no system') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat("x", [])
    with pytest.raises(ValueError, match="role"):
        render_chat("x", [{"content": "no role"}])


def test_template_helpers_like_transformers():
    t = "{{ messages[0]['content'] | tojson }}|{% generation %}G{% endgeneration %}|{{ strftime_now('%Y') | length }}"
    assert render_chat(t, [{"role": "user", "content": "é<x>"}]) == '"é<x>"|G|4'


def test_parse_tool_calls():
    text = ('Sure.<|tool_call>call:get_weather{city:<|"|>Paris, {FR}<|"|>,days:3,scale:-1.5e2,ok:true,none:null,'
            'opts:{<|"|>quoted key<|"|>:[1,<|"|>a,b<|"|>,false],nested:{x:{}}},empty:[]}<tool_call|>'
            '<|tool_call>call:ns.search_v2{}<tool_call|>')
    calls = parse_tool_calls(text)
    assert calls == [
        ToolCall("get_weather", {"city": "Paris, {FR}", "days": 3, "scale": -150.0, "ok": True, "none": None,
                                 "opts": {"quoted key": [1, "a,b", False], "nested": {"x": {}}}, "empty": []}),
        ToolCall("ns.search_v2", {}),
    ]
    assert parse_tool_calls("no calls here") == []
    assert calls[0].to_message()["function"]["name"] == "get_weather"


def test_parsed_tool_call_round_trips_through_template(setup):
    tok, template, _ = setup
    args = {"city": "Paris", "days": 2, "opts": {"metric": True, "langs": ["fr", "en"]}}
    rendered = render_chat(template, [{"role": "user", "content": "q"},
                                      {"role": "assistant",
                                       "tool_calls": [{"function": {"name": "w", "arguments": args}}]}],
                           special_tokens=tok.special_tokens_map, add_generation_prompt=False)
    assert parse_tool_calls(rendered) == [ToolCall("w", args)]


@pytest.mark.parametrize("bad", ['<|tool_call>get{a:1}<tool_call|>', '<|tool_call>call:f{a:<|"|>x}<tool_call|>',
                                 '<|tool_call>call:f{a 1}<tool_call|>'])
def test_parse_tool_calls_rejects_malformed(bad):
    with pytest.raises(ValueError, match="malformed tool call"):
        parse_tool_calls(bad)


def test_split_thinking():
    thought = "<|channel>thought\nLet me see.<channel|>The answer is 4."
    assert split_thinking(thought) == ("Let me see.", "The answer is 4.")
    assert split_thinking("plain") == ("", "plain")
    assert split_thinking("<|channel>thought\nunfinished") == ("unfinished", "")

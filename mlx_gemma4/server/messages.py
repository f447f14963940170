"""Request bodies of the three APIs -> the Hugging Face messages and tools our processor (and transformers'
`apply_chat_template`) renders.

Gemma 4's template has no `tool` role: a tool's result goes in the `tool_responses` list of the assistant
message that made the call (`{"name": ..., "response": ...}`), rendered inside the model's turn right after
the call, `<|tool_call>call:f{...}<tool_call|><|tool_response>response:f{...}<tool_response|>`, and the model
continues that same turn. So the equivalent HF history of an OpenAI `[assistant(tool_calls), tool, tool,
assistant(answer)]` is one assistant message with `tool_calls`, `tool_responses` and the answer as `content`:
exactly the text the model generated across the call. OpenAI `tool` messages, Anthropic `tool_result` blocks
and Responses `function_call_output` items all become such `tool_responses` (`fold_tool_results`); a result
that is JSON is given to the template as its value (rendered in Gemma's argument syntax), anything else as text.

Media: images as `data:` or http(s) URLs (fetched by the server, see `fetch_remote_media`), audio as base64;
anything else that names a file (`file://` URLs, local paths) is refused: clients send their data, the server
never reads its own disk on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request

OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


# -- field checks --------------------------------------------------------------------------------------------
def require(body: dict, key: str, kind, where: str | None = None):
    """body[key], which must exist and be of `kind` (a type or tuple of types), else a 400 naming it."""
    where = where or key
    if not isinstance(body, dict) or key not in body or body[key] is None:
        raise bad_request(f"'{where}' is required", where, "missing_field")
    return expect(body[key], kind, where)


def optional(body: dict, key: str, kind, default=None, where: str | None = None):
    value = body.get(key) if isinstance(body, dict) else None
    return default if value is None else expect(value, kind, where or key)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object"}


def expect(value, kind, where: str):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise bad_request(f"'{where}' must be {names}, got {type(value).__name__}", where, "invalid_type")
    return value


# -- the common form ---------------------------------------------------------------------------------------------
@dataclass
class Conversation:
    """HF messages (content strings or lists of text/image/audio items) and tool schemas for the template."""

    messages: list[dict]
    tools: list[dict] | None = None
    tool_names: list[str] = field(default_factory=list)


def function_tool(name, description, parameters, where: str) -> dict:
    expect(name, str, f"{where}.name")
    if not name:
        raise bad_request(f"'{where}.name' must not be empty", f"{where}.name")
    function = {"name": name, "description": description if isinstance(description, str) else ""}
    if parameters is not None:
        function["parameters"] = expect(parameters, dict, f"{where}.parameters")
    return {"type": "function", "function": function}


def tool_arguments(arguments, where: str) -> dict:
    """A tool call's arguments as the template takes them (a mapping): JSON text is parsed."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise bad_request(f"'{where}' is not valid JSON: {e.msg}", where) from e
    if not isinstance(arguments, dict):
        raise bad_request(f"'{where}' must be a JSON object", where)
    return arguments


def tool_result_value(content: str):
    """A tool's output for the template: the JSON value it holds, else the text."""
    try:
        return json.loads(content)
    except (json.JSONDecodeError, ValueError):
        return content


def fold_tool_results(messages: list[dict]) -> list[dict]:
    """Neutral messages (OpenAI-like: assistant `tool_calls` with ids, `{"role": "tool", "tool_call_id",
    "content"}` results) -> Gemma 4's HF form (see the module docstring)."""
    out: list[dict] = []
    open_call: dict | None = None  # the assistant message whose tool results are being collected
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            if open_call is None:
                raise bad_request(f"messages[{i}]: a tool result must follow an assistant message with tool calls "
                                  "(or other tool results)", f"messages[{i}]")
            calls = open_call["tool_calls"]
            responses = open_call.setdefault("tool_responses", [])
            ids = [c.get("id") for c in calls]
            call_id = message.get("tool_call_id")
            if call_id in ids:
                name = calls[ids.index(call_id)]["function"]["name"]
            elif message.get("name"):
                name = message["name"]
            elif len(responses) < len(calls):
                name = calls[len(responses)]["function"]["name"]
            else:
                raise bad_request(f"messages[{i}]: tool result {call_id!r} answers none of the preceding tool calls",
                                  f"messages[{i}].tool_call_id")
            responses.append({"name": name, "response": tool_result_value(message["content"])})
            continue
        if role == "assistant" and open_call is not None and open_call.get("tool_responses") \
                and not message.get("tool_calls") and not open_call.get("content"):
            open_call["content"] = message.get("content") or ""  # the answer that continues the same model turn
            open_call = None
            continue
        message = dict(message)
        open_call = message if role == "assistant" and message.get("tool_calls") else None
        out.append(message)
    for message in out:  # ids are the APIs', not the template's
        for call in message.get("tool_calls") or []:
            call.pop("id", None)
    return out


# -- media ---------------------------------------------------------------------------------------------------
def image_item(url, where: str) -> dict:
    """An image given by URL: `data:` URLs and http(s) URLs only."""
    expect(url, str, where)
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        if not lowered.startswith("data:image/") and not lowered.startswith("data:application/octet-stream"):
            raise bad_request(f"'{where}': a data URL for an image must have an image/* type", where, "invalid_image")
        return {"type": "image", "url": url}
    if lowered.startswith(("http://", "https://")):
        return {"type": "image", "url": url}
    raise bad_request(f"'{where}': images must be data: URLs or http(s) URLs; files on the server "
                      f"({url.split(':', 1)[0] + ':' if '://' in url else 'local paths'}) are not read",
                      where, "invalid_image_url")


def base64_bytes(data, where: str) -> bytes:
    expect(data, str, where)
    try:
        out = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"'{where}' is not valid base64 ({e})", where, "invalid_base64") from e
    if not out:
        raise bad_request(f"'{where}' is empty", where)
    return out


def text_of(content, where: str, allowed=("text",)) -> str:
    """A content that must be text: a string or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    parts = expect(content, list, where)
    texts = []
    for j, part in enumerate(parts):
        kind = expect(part, dict, f"{where}[{j}]").get("type")
        if kind not in allowed:
            raise bad_request(f"'{where}[{j}]': only text is supported here, got {kind!r}", f"{where}[{j}].type")
        texts.append(expect(part.get("text"), str, f"{where}[{j}].text"))
    return "".join(texts)


# -- OpenAI chat completions -------------------------------------------------------------------------------------
def openai_content(content, where: str) -> str | list[dict]:
    """A user message's content: a string, or parts (text, image_url, input_audio) -> HF content items."""
    if isinstance(content, str):
        return content
    parts = expect(content, list, where)
    out = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        kind = expect(part, dict, at).get("type")
        if kind == "text":
            out.append({"type": "text", "text": require(part, "text", str, f"{at}.text")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            out.append(image_item(url, f"{at}.image_url.url"))
        elif kind == "input_audio":
            audio = require(part, "input_audio", dict, f"{at}.input_audio")
            out.append({"type": "audio", "audio": base64_bytes(audio.get("data"), f"{at}.input_audio.data")})
        else:
            raise bad_request(f"'{at}.type': unsupported content part {kind!r} (supported: text, image_url, "
                              "input_audio)", f"{at}.type")
    return out


def openai_tool_calls(calls, where: str) -> list[dict]:
    out = []
    for j, call in enumerate(expect(calls, list, where)):
        at = f"{where}[{j}]"
        function = require(call, "function", dict, f"{at}.function")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": require(function, "name", str, f"{at}.function.name"),
                                 "arguments": tool_arguments(function.get("arguments") or {},
                                                             f"{at}.function.arguments")}})
    return out


def openai_tools(tools) -> tuple[list[dict] | None, list[str]]:
    if tools is None:
        return None, []
    out = []
    for j, tool in enumerate(expect(tools, list, "tools")):
        at = f"tools[{j}]"
        if expect(tool, dict, at).get("type", "function") != "function":
            raise bad_request(f"'{at}.type': only function tools are supported, got {tool.get('type')!r}",
                              f"{at}.type")
        function = require(tool, "function", dict, f"{at}.function")
        out.append(function_tool(function.get("name"), function.get("description"), function.get("parameters"),
                                 f"{at}.function"))
    return out or None, [t["function"]["name"] for t in out]


def openai_chat(body: dict) -> Conversation:
    """`messages` and `tools` of a chat completions request."""
    messages = require(body, "messages", list)
    if not messages:
        raise bad_request("'messages' must not be empty", "messages")
    neutral = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        role = require(expect(message, dict, at), "role", str, f"{at}.role")
        if role not in OPENAI_ROLES:
            raise bad_request(f"'{at}.role': unknown role {role!r} (expected one of {', '.join(OPENAI_ROLES)})",
                              f"{at}.role")
        content = message.get("content")
        if role in ("system", "developer"):
            neutral.append({"role": "system", "content": text_of(require(message, "content", (str, list), f"{at}.content"),
                                                                f"{at}.content")})
        elif role == "user":
            neutral.append({"role": "user", "content": openai_content(
                require(message, "content", (str, list), f"{at}.content"), f"{at}.content")})
        elif role == "assistant":
            out = {"role": "assistant",
                   "content": "" if content is None else text_of(content, f"{at}.content", ("text", "refusal"))}
            if message.get("tool_calls"):
                out["tool_calls"] = openai_tool_calls(message["tool_calls"], f"{at}.tool_calls")
            neutral.append(out)
        else:
            neutral.append({"role": "tool", "tool_call_id": message.get("tool_call_id"), "name": message.get("name"),
                            "content": text_of(require(message, "content", (str, list), f"{at}.content"),
                                               f"{at}.content")})
    tools, names = openai_tools(body.get("tools"))
    return Conversation(fold_tool_results(neutral), tools, names)


# -- OpenAI Responses ----------------------------------------------------------------------------------------------
def responses_content(content, where: str, role: str) -> str | list[dict]:
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(expect(content, list, where)):
        at = f"{where}[{j}]"
        kind = expect(part, dict, at).get("type")
        if kind in ("input_text", "output_text", "text", "refusal"):
            out.append({"type": "text", "text": require(part, "refusal" if kind == "refusal" else "text", str,
                                                       f"{at}.text")})
        elif kind == "input_image" and role == "user":
            if part.get("file_id"):
                raise bad_request(f"'{at}': file ids need the Files API, which this server does not have; send "
                                  "the image as image_url", f"{at}.file_id")
            out.append(image_item(part.get("image_url"), f"{at}.image_url"))
        else:
            raise bad_request(f"'{at}.type': unsupported content part {kind!r} in a {role} message", f"{at}.type")
    if role != "user":
        return "".join(p["text"] for p in out)
    return out


def responses_input(body: dict) -> Conversation:
    """`input`, `instructions` and `tools` of a Responses request (stateless: no previous_response_id)."""
    if body.get("previous_response_id"):
        raise bad_request("this server keeps no responses: send the whole conversation in 'input' "
                          "(previous_response_id is not supported)", "previous_response_id")
    items = require(body, "input", (str, list))
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    neutral: list[dict] = []
    instructions = optional(body, "instructions", str)
    if instructions:
        neutral.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        at = f"input[{i}]"
        kind = expect(item, dict, at).get("type", "message")
        if kind == "message":
            role = require(item, "role", str, f"{at}.role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"'{at}.role': unknown role {role!r}", f"{at}.role")
            role = "system" if role == "developer" else role
            content = responses_content(require(item, "content", (str, list), f"{at}.content"), f"{at}.content", role)
            if role == "system" and neutral and neutral[-1]["role"] == "system":
                neutral[-1]["content"] += "\n\n" + content  # instructions + a system message: one system turn
            else:
                neutral.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": require(item, "name", str, f"{at}.name"),
                                 "arguments": tool_arguments(item.get("arguments") or {}, f"{at}.arguments")}}
            last = neutral[-1] if neutral else None
            if last is not None and last["role"] == "assistant" and "tool_responses" not in last:
                last.setdefault("tool_calls", []).append(call)
            else:
                neutral.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = require(item, "output", (str, list), f"{at}.output")
            neutral.append({"role": "tool", "tool_call_id": item.get("call_id"),
                            "content": text_of(output, f"{at}.output", ("input_text", "output_text", "text"))})
        elif kind == "reasoning":
            continue  # the model's earlier thinking: Gemma 4's template drops it from the history anyway
        else:
            raise bad_request(f"'{at}.type': unsupported input item {kind!r} (supported: message, function_call, "
                              "function_call_output, reasoning)", f"{at}.type")
    tools = []
    for j, tool in enumerate(optional(body, "tools", list, [])):
        at = f"tools[{j}]"
        if expect(tool, dict, at).get("type") != "function":
            raise bad_request(f"'{at}.type': only function tools are supported, got {tool.get('type')!r}",
                              f"{at}.type")
        tools.append(function_tool(tool.get("name"), tool.get("description"), tool.get("parameters"), at))
    return Conversation(fold_tool_results(neutral), tools or None, [t["function"]["name"] for t in tools])


# -- Anthropic Messages --------------------------------------------------------------------------------------------
def anthropic_image(block: dict, where: str) -> dict:
    source = require(block, "source", dict, f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        return {"type": "image", "image": base64_bytes(source.get("data"), f"{where}.source.data")}
    if kind == "url":
        return image_item(source.get("url"), f"{where}.source.url")
    raise bad_request(f"'{where}.source.type': unsupported image source {kind!r} (base64 or url)",
                      f"{where}.source.type")


def anthropic_messages(body: dict) -> Conversation:
    """`system`, `messages` and `tools` of a Messages request."""
    messages = require(body, "messages", list)
    if not messages:
        raise bad_request("'messages' must not be empty", "messages")
    neutral: list[dict] = []
    system = body.get("system")
    if system:
        neutral.append({"role": "system", "content": text_of(system, "system")})
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        role = require(expect(message, dict, at), "role", str, f"{at}.role")
        if role not in ("user", "assistant"):
            raise bad_request(f"'{at}.role': unknown role {role!r} (expected user or assistant)", f"{at}.role")
        content = require(message, "content", (str, list), f"{at}.content")
        if isinstance(content, str):
            neutral.append({"role": role, "content": content})
            continue
        items, calls, thinking = [], [], []
        for j, block in enumerate(content):
            bat = f"{at}.content[{j}]"
            kind = expect(block, dict, bat).get("type")
            if kind == "text":
                items.append({"type": "text", "text": require(block, "text", str, f"{bat}.text")})
            elif kind == "image" and role == "user":
                items.append(anthropic_image(block, bat))
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": require(block, "name", str, f"{bat}.name"),
                                           "arguments": tool_arguments(block.get("input") or {}, f"{bat}.input")}})
            elif kind == "tool_result" and role == "user":
                result = block.get("content")
                text = "" if result is None else text_of(result, f"{bat}.content")
                neutral.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                thinking.append(block.get("thinking") or "")
            else:
                raise bad_request(f"'{bat}.type': unsupported content block {kind!r} in a {role} message", f"{bat}.type")
        if role == "assistant":
            out = {"role": "assistant", "content": "".join(it["text"] for it in items)}
            if calls:
                out["tool_calls"] = calls
            if any(thinking):
                out["reasoning_content"] = "".join(thinking)
            neutral.append(out)
        elif items:
            neutral.append({"role": "user", "content": items})
    tools = []
    for j, tool in enumerate(optional(body, "tools", list, [])):
        at = f"tools[{j}]"
        kind = expect(tool, dict, at).get("type", "custom")
        if kind not in ("custom", None) and "input_schema" not in tool:
            raise bad_request(f"'{at}': only client tools (name, description, input_schema) are supported, got "
                              f"{kind!r}", f"{at}.type")
        tools.append(function_tool(tool.get("name"), tool.get("description"), tool.get("input_schema"), at))
    return Conversation(fold_tool_results(neutral), tools or None, [t["function"]["name"] for t in tools])


# -- after parsing ------------------------------------------------------------------------------------------------
def remote_urls(messages: list[dict]) -> list[dict]:
    """The media items that name http(s) URLs (the server fetches them with its limits)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            out += [it for it in content if isinstance(it.get("url"), str) and not it["url"].startswith("data:")]
    return out


def fetch_remote_media(messages: list[dict], *, allow: bool, max_bytes: int, timeout: float) -> None:
    """Replace http(s) media URLs by their bytes, fetched within the limits (400 on failure, or when fetching is
    turned off)."""
    from ..errors import MediaError
    from ..processing.media import fetch_url

    for item in remote_urls(messages):
        url = item.pop("url")
        if not allow:
            raise bad_request(f"this server does not fetch media from URLs ({url[:80]}); send the data as a "
                              "data: URL or base64", code="url_fetch_disabled")
        try:
            item[item["type"]] = fetch_url(url, max_bytes=max_bytes, timeout=timeout)
        except MediaError as e:
            raise bad_request(str(e), code="invalid_image_url") from e


def count_media(messages: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if item.get("type") != "text":
                    counts[item["type"]] = counts.get(item["type"], 0) + 1
    return counts


def as_json_arguments(arguments: Any) -> str:
    """Tool call arguments as the JSON text OpenAI clients expect."""
    return json.dumps(arguments, ensure_ascii=False)

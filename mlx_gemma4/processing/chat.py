"""Chat formatting with the checkpoint's Jinja chat template, rendered the way transformers renders it, and
parsing of what the model writes back (thinking channel, tool calls).

Rendering environment (transformers `render_jinja_template`): a sandboxed Jinja environment with
trim_blocks + lstrip_blocks and the loop-controls extension, a `tojson` filter that does not HTML-escape,
globals `raise_exception`, `strftime_now`, `namespace`, and `{% generation %}` blocks rendered as their body.
Messages drop keys whose value is None; `reasoning`/`thinking` are aliased to `reasoning_content`; Python
functions given as tools become JSON schemas from their type hints and Google-style docstrings.

Gemma 4 format: `<bos><|turn>system\\n[<|think|>]{system}[<|tool>declaration:...<tool|>]<turn|>\\n<|turn>user\\n
{text}<turn|>\\n<|turn>model\\n`; with thinking off the generation prompt ends in an empty, closed thought
channel `<|channel>thought\\n<channel|>`.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ..errors import read_json

BUILTIN_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "gemma4.jinja"


# -- finding the template -------------------------------------------------------------------------------------
def load_chat_template(directory: str | Path | None) -> str:
    """The checkpoint's template (`checkpoint_chat_template`), else the built-in Gemma 4 template."""
    template = checkpoint_chat_template(directory) if directory is not None else None
    return template if template is not None else BUILTIN_TEMPLATE.read_text()


def checkpoint_chat_template(directory: str | Path) -> str | None:
    """`chat_template.jinja`, else `chat_template` in tokenizer_config.json (a string, or a list of
    {name, template} whose "default" entry is used), else None."""
    directory = Path(directory)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        template = read_json(config_file).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template
    return None


# -- rendering ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=jinja2.utils.Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from e


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages) -> list[dict]:
    if isinstance(messages, dict) or isinstance(messages, str):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with a 'role' key, got {message!r:.200}")
        if not isinstance(message["role"], str):
            raise ValueError(f"message {i}: the role must be a string, got {message['role']!r:.80}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    if not out:
        raise ValueError("cannot format an empty conversation")
    return out


def render_chat(template: str, messages, *, tools=None, add_generation_prompt: bool = True,
                enable_thinking: bool = False, special_tokens: dict[str, str] | None = None,
                mark: Callable[[Any], Any] | None = None, **kwargs) -> str:
    """Render `messages` with `template`. `special_tokens` (bos_token, eos_token, ...) and kwargs are template
    variables, like transformers' apply_chat_template(..., tokenize=False, enable_thinking=...). `mark`, if
    given, is applied to the messages, the tool schemas and kwargs (everything a caller provides, not the
    special tokens) before rendering: see processing.messages.mark_control_tokens."""
    import jinja2

    compiled = _compile(template)
    messages = _normalize_messages(messages)
    tool_schemas = None if tools is None else [tool_schema(t) for t in tools]
    if mark is not None:
        messages, tool_schemas, kwargs = mark(messages), mark(tool_schemas), mark(kwargs)
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return compiled.render(messages=messages, tools=tool_schemas, documents=None,
                               add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                               **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e
    except RecursionError as e:
        raise ValueError("chat template failed: the messages are nested too deeply") from e


@lru_cache(maxsize=8)
def template_literal_text(template: str) -> str:
    """The template's literal text and string constants, joined by NUL characters (so that a substring search
    cannot match across two of them): the added tokens found in it are the control tokens the template writes."""
    from jinja2 import nodes

    ast = _compile(template).environment.parse(template)
    literals = {n.data for n in ast.find_all(nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(literals))


# -- Python functions as tools --------------------------------------------------------------------------------
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null",
               list: "array", tuple: "array", dict: "object"}


def _type_schema(hint) -> dict:
    """JSON schema of a type hint: basic types, list/tuple/dict, Optional/Union, Literal, Enum."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return {}
    if origin is None:
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return _enum_schema([m.value for m in hint])
        if hint in _JSON_TYPES:
            return {"type": _JSON_TYPES[hint]}
        raise TypeError(f"cannot describe type hint {hint!r} as JSON schema; pass a JSON schema dict instead")
    if origin is typing.Union or origin is getattr(types, "UnionType", None):
        members = [_type_schema(a) for a in args if a is not type(None)]
        if len(members) == 1:
            schema = members[0]
        elif all(set(m) == {"type"} and isinstance(m["type"], str) for m in members):
            names = sorted({m["type"] for m in members})
            schema = {"type": names[0] if len(names) == 1 else names}
        else:
            schema = {"anyOf": members}
        if type(None) in args:
            schema["nullable"] = True
        return schema
    if origin is typing.Literal:
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or Ellipsis in args:
            raise TypeError(f"cannot describe {hint!r}: use list[...] for variable-length sequences")
        return {"type": "array", "prefixItems": [_type_schema(a) for a in args]}
    if origin is dict:
        if len(args) == 2:
            return {"type": "object", "additionalProperties": _type_schema(args[1])}
        return {"type": "object"}
    raise TypeError(f"cannot describe type hint {hint!r} as JSON schema; pass a JSON schema dict instead")


def _enum_schema(values: list) -> dict:
    kinds = list(dict.fromkeys(_JSON_TYPES[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(summary, {arg: description}, returns) of a Google-style docstring."""
    sections = re.split(r"\n\s*(Args|Arguments|Returns|Raises):\s*\n", "\n" + doc)
    summary = sections[0].strip()
    blocks = dict(zip(sections[1::2], sections[2::2]))
    args: dict[str, str] = {}
    current, args_indent = None, 0
    for line in (blocks.get("Args") or blocks.get("Arguments") or "").splitlines():
        m = re.match(r"^\s*(\w+)\s*(?:\([^()]*\))?:\s*(.*)$", line)
        indent = len(line) - len(line.lstrip())
        if m and (current is None or indent <= args_indent):
            current, args_indent = m.group(1), indent
            args[current] = m.group(2).strip()
        elif current is not None and line.strip():
            args[current] = (args[current] + " " + line.strip()).strip()
    returns = blocks.get("Returns")
    return summary, args, (" ".join(returns.split()) if returns else None)


def function_schema(func: Callable) -> dict:
    """{"type": "function", "function": {name, description, parameters}} from type hints and the docstring."""
    name = getattr(func, "__name__", "tool")
    doc = inspect.getdoc(func)
    if not doc:
        raise ValueError(f"tool {name} has no docstring to describe it")
    summary, arg_docs, returns_doc = _parse_docstring(doc)
    hints = typing.get_type_hints(func)
    params = list(inspect.signature(func).parameters.values())
    if params and params[0].name in ("self", "cls") and params[0].annotation is inspect.Parameter.empty:
        params = params[1:]
    properties, required = {}, []
    for p in params:
        if p.name not in hints:
            raise ValueError(f"tool {name}: argument {p.name!r} has no type hint")
        if p.name not in arg_docs:
            raise ValueError(f"tool {name}: the docstring does not describe argument {p.name!r}")
        schema = _type_schema(hints[p.name])
        desc = arg_docs[p.name]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", desc, flags=re.IGNORECASE)
        if choices:
            schema["enum"] = json.loads(choices.group(1))
            desc = desc[: choices.start()].strip()
        schema["description"] = desc
        properties[p.name] = schema
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    parameters: dict = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out: dict = {"name": name, "description": summary, "parameters": parameters}
    if "return" in hints:
        try:
            ret = _type_schema(hints["return"])
            if returns_doc:
                ret["description"] = returns_doc
            out["return"] = ret
        except TypeError:
            pass
    return {"type": "function", "function": out}


def tool_schema(tool) -> dict:
    if isinstance(tool, dict):
        return tool
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        return function_schema(tool)
    raise TypeError(f"a tool must be a JSON-schema dict or a Python function, got {type(tool).__name__}")


# -- parsing the model's output -------------------------------------------------------------------------------
STRING_DELIMITER = '<|"|>'


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def to_message(self) -> dict:
        """The OpenAI/transformers form chat templates read in `message["tool_calls"]`."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str) -> list[ToolCall]:
    """All `<|tool_call>call:name{key:value,...}<tool_call|>` blocks in `text`, arguments as Python values.
    Raises ValueError on a malformed block."""
    calls = []
    for m in re.finditer(r"<\|tool_call>(.*?)<tool_call\|>", text, re.DOTALL):
        body = m.group(1)
        head = re.match(r"\s*call:([\w.\-]+)", body)
        if head is None:
            raise ValueError(f"malformed tool call (expected 'call:name{{...}}'): {body!r}")
        parser = _ArgumentParser(body, head.end())
        args = parser.value()
        parser.skip_space()
        if not isinstance(args, dict) or parser.pos != len(body):
            raise ValueError(f"malformed tool call arguments: {body!r}")
        calls.append(ToolCall(head.group(1), args))
    return calls


class _ArgumentParser:
    """Gemma's argument syntax: {key:value,...} with bare or <|"|>-quoted keys, <|"|>strings<|"|>, [lists],
    numbers, true/false/null; whitespace between items is skipped, and JSON "strings" (keys or values) are read
    as JSON when a model writes them."""

    _KEY = re.compile(r"[^:{}\[\],]+")
    _BARE = re.compile(r"[^,{}\[\]]*")

    def __init__(self, text: str, pos: int = 0):
        self.text, self.pos = text, pos
        self._json = json.JSONDecoder()

    def _error(self, what: str) -> ValueError:
        return ValueError(f"malformed tool call: {what} at position {self.pos} of {self.text!r}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _at(self, s: str) -> bool:
        self.skip_space()
        return self.text.startswith(s, self.pos)

    def _expect(self, s: str) -> None:
        if not self._at(s):
            raise self._error(f"expected {s!r}")
        self.pos += len(s)

    def _string(self) -> str | None:
        """A <|"|>-delimited or JSON double-quoted string at the position, else None."""
        if self._at(STRING_DELIMITER):
            self.pos += len(STRING_DELIMITER)
            end = self.text.find(STRING_DELIMITER, self.pos)
            if end < 0:
                raise self._error("unterminated string")
            s, self.pos = self.text[self.pos:end], end + len(STRING_DELIMITER)
            return s
        if self._at('"'):
            try:
                s, self.pos = self._json.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as e:
                raise self._error(f"malformed JSON string ({e.msg})") from e
            return s
        return None

    def value(self):
        t = self.text
        s = self._string()
        if s is not None:
            return s
        if self._at("{"):
            self.pos += 1
            out = {}
            while not self._at("}"):
                if out:
                    self._expect(",")
                key = self._string()
                if key is None:
                    self.skip_space()
                    m = self._KEY.match(t, self.pos)
                    if m is None:
                        raise self._error("expected a key")
                    key, self.pos = m.group(0).strip(), m.end()
                self._expect(":")
                out[key] = self.value()
            self.pos += 1
            return out
        if self._at("["):
            self.pos += 1
            items = []
            while not self._at("]"):
                if items:
                    self._expect(",")
                items.append(self.value())
            self.pos += 1
            return items
        m = self._BARE.match(t, self.pos)
        token = m.group(0).strip()
        if not token:
            raise self._error("expected a value")
        self.pos = m.end()
        literals = {"true": True, "false": False, "null": None, "none": None}
        if token.lower() in literals:
            return literals[token.lower()]
        try:
            return int(token)
        except ValueError:
            pass
        try:
            return float(token)
        except ValueError:
            return token  # a bare word the model left unquoted


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer): the `<|channel>thought\\n...<channel|>` parts of `text`, and the rest."""
    thoughts, answer, rest = [], [], text
    while "<|channel>" in rest:
        before, _, after = rest.partition("<|channel>")
        answer.append(before)
        inner, closed, rest = after.partition("<channel|>")
        thoughts.append(inner[len("thought\n"):] if inner.startswith("thought\n") else inner)
        if not closed:
            rest = ""
    answer.append(rest)
    return "\n".join(t.strip() for t in thoughts if t.strip()), "".join(answer).strip()

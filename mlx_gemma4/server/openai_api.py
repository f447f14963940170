"""OpenAI's chat completions and (legacy) completions: request fields -> prompt and settings, results ->
response bodies and stream chunks. Also the request fields the other APIs share (sampling, thinking)."""

from __future__ import annotations

import json
import time
from typing import AsyncIterator

from .errors import bad_request
from .generation import Finished, Generator, Prompt, Sampling, Step, new_id
from .messages import Conversation, as_json_arguments, expect, openai_chat, optional

EFFORT_THINKS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True, "xhigh": True}


# -- request fields ----------------------------------------------------------------------------------------------
def sampling(body: dict, generator: Generator, max_tokens_keys=("max_completion_tokens", "max_tokens"),
             stop_key: str = "stop") -> Sampling:
    """Sampling settings from the fields every API accepts in the body (extensions like top_k, min_p,
    repetition_penalty included: clients without an argument for them send them in the body)."""
    n = optional(body, "n", int, 1)
    if n != 1:
        raise bad_request(f"n must be 1 (this server generates one choice per request), got {n}", "n")
    max_tokens = generator.max_tokens
    for key in max_tokens_keys:
        if body.get(key) is not None:
            max_tokens = expect(body[key], int, key)
            if max_tokens < 1:
                raise bad_request(f"{key} must be >= 1, got {max_tokens}", key)
            break
    stop = body.get(stop_key)
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request(f"'{stop_key}' must be a string or a list of strings", stop_key)
    defaults = generator.sampling_defaults
    settings = Sampling(
        max_tokens=max_tokens,
        temperature=optional(body, "temperature", float, defaults.get("temperature", 0.0)),
        top_p=optional(body, "top_p", float, defaults.get("top_p", 1.0)),
        top_k=optional(body, "top_k", int, defaults.get("top_k", 0)),
        min_p=optional(body, "min_p", float, defaults.get("min_p", 0.0)),
        seed=optional(body, "seed", int),
        repetition_penalty=optional(body, "repetition_penalty", float),
        presence_penalty=optional(body, "presence_penalty", float),
        frequency_penalty=optional(body, "frequency_penalty", float),
        stop=stop)
    settings.check()
    return settings


def thinking(body: dict) -> bool | None:
    """chat_template_kwargs.enable_thinking, else reasoning_effort (or Responses' reasoning.effort); None: the
    server's default."""
    kwargs = optional(body, "chat_template_kwargs", dict, {})
    if kwargs.get("enable_thinking") is not None:
        return expect(kwargs["enable_thinking"], bool, "chat_template_kwargs.enable_thinking")
    effort = body.get("reasoning_effort")
    where = "reasoning_effort"
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort, where = body["reasoning"].get("effort"), "reasoning.effort"
    if effort is None:
        return None
    if effort not in EFFORT_THINKS:
        raise bad_request(f"{where} must be one of {', '.join(EFFORT_THINKS)}, got {effort!r}", where)
    return EFFORT_THINKS[effort]


def json_instruction(response_format, where: str) -> str | None:
    """Structured output as a prompt-side instruction (no constrained decoding): json_object and json_schema."""
    if response_format is None:
        return None
    kind = expect(response_format, dict, where).get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return "Answer with one JSON object and nothing else."
    if kind == "json_schema":
        schema = response_format.get("json_schema", response_format)
        schema = schema.get("schema", schema) if isinstance(schema, dict) else schema
        return ("Answer with one JSON object, and nothing else, that follows this JSON schema:\n"
                + json.dumps(schema, ensure_ascii=False))
    raise bad_request(f"'{where}.type' must be text, json_object or json_schema, got {kind!r}", f"{where}.type")


def add_instruction(conversation: Conversation, instruction: str | None) -> None:
    if not instruction:
        return
    messages = conversation.messages
    if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + instruction}
    else:
        messages.insert(0, {"role": "system", "content": instruction})


def openai_tool_choice(value, where: str = "tool_choice"):
    """"auto" | "none" | "required" | {"type": "function", "function": {"name"}} (chat) or {"type": "function",
    "name"} (Responses) -> "auto" | "none" | "required" | {"name": ...}."""
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = (value.get("function") or {}).get("name") or value.get("name")
        return {"name": expect(name, str, f"{where}.function.name")}
    raise bad_request(f"'{where}' must be auto, none, required or a named function", where)


# -- chat completions --------------------------------------------------------------------------------------------
class ChatRequest:
    def __init__(self, body: dict, generator: Generator):
        self.model = body.get("model") or generator.model_id
        self.stream = bool(optional(body, "stream", bool, False))
        self.include_usage = bool((optional(body, "stream_options", dict, {}) or {}).get("include_usage"))
        self.settings = sampling(body, generator)
        if optional(body, "logprobs", bool, False):
            self.settings.top_logprobs = optional(body, "top_logprobs", int, 0)
            self.settings.check()
        self.conversation = openai_chat(body)
        add_instruction(self.conversation, json_instruction(body.get("response_format"), "response_format"))
        self.thinking = thinking(body)
        self.tool_choice = openai_tool_choice(body.get("tool_choice"))
        self.max_soft_tokens = optional(body, "max_soft_tokens", int)
        self.id, self.created = new_id("chatcmpl-"), int(time.time())

    def prompt(self, generator: Generator) -> Prompt:
        return generator.chat_prompt(self.conversation, enable_thinking=self.thinking, tool_choice=self.tool_choice,
                                     max_soft_tokens=self.max_soft_tokens)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    async def body(self, steps: AsyncIterator[Step | Finished]) -> dict:
        content, reasoning, calls, logprobs = [], [], [], []
        async for step in steps:
            if isinstance(step, Finished):
                done = step
                continue
            for d in step.deltas:
                if d.kind == "content":
                    content.append(d.text)
                elif d.kind == "reasoning":
                    reasoning.append(d.text)
                else:
                    calls.append(tool_call_entry(d.call, len(calls))[1])
            if step.logprob is not None:
                logprobs.append(step.logprob)
        message = {"role": "assistant", "content": "".join(content) if content or not calls else None}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason,
                  "logprobs": {"content": logprobs} if self.settings.top_logprobs is not None else None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(done)}

    async def chunks(self, steps: AsyncIterator[Step | Finished]) -> AsyncIterator[dict]:
        head = self._head("chat.completion.chunk")

        def chunk(delta: dict, finish=None, logprob=None) -> dict:
            lp = {"content": [logprob] if logprob else []} if self.settings.top_logprobs is not None else None
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        calls = 0
        async for step in steps:
            if isinstance(step, Finished):
                yield chunk({}, step.finish_reason)
                if self.include_usage:
                    yield {**head, "choices": [], "usage": usage(step)}
                return
            logprob = step.logprob
            for d in step.deltas:
                if d.kind == "tool_call":
                    yield chunk({"tool_calls": [tool_call_entry(d.call, calls)[0]]})
                    calls += 1
                else:
                    yield chunk({"reasoning_content" if d.kind == "reasoning" else "content": d.text}, logprob=logprob)
                    logprob = None
            if logprob is not None:  # a token whose text is still held back
                yield chunk({"content": ""}, logprob=logprob)


def tool_call_entry(call, index: int) -> tuple[dict, dict]:
    """(streamed delta entry with its index, message entry) of a parsed tool call."""
    entry = {"id": new_id("call_"), "type": "function",
             "function": {"name": call.name, "arguments": as_json_arguments(call.arguments)}}
    return {"index": index, **entry}, entry


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


# -- completions (raw prompt, no template) ---------------------------------------------------------------------
class CompletionRequest:
    def __init__(self, body: dict, generator: Generator):
        self.model = body.get("model") or generator.model_id
        self.stream = bool(optional(body, "stream", bool, False))
        self.include_usage = bool((optional(body, "stream_options", dict, {}) or {}).get("include_usage"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is None:
            raise bad_request("'prompt' is required", "prompt", "missing_field")
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string (one prompt per request)", "prompt")
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        self.text = prompt
        for key in ("echo", "suffix"):
            if body.get(key):
                raise bad_request(f"'{key}' is not supported", key)
        if (optional(body, "best_of", int, 1) or 1) != 1:
            raise bad_request("'best_of' must be 1", "best_of")
        self.settings = sampling(body, generator, max_tokens_keys=("max_tokens",))
        top = optional(body, "logprobs", int)
        if top is not None:
            self.settings.top_logprobs = top
            self.settings.check()
        self.id, self.created = new_id("cmpl-"), int(time.time())

    def prompt(self, generator: Generator) -> Prompt:
        return generator.text_prompt(self.text)

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if self.settings.top_logprobs is None:
            return None
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    async def body(self, steps: AsyncIterator[Step | Finished]) -> dict:
        text, entries = [], []
        async for step in steps:
            if isinstance(step, Finished):
                done = step
                continue
            text += [d.text for d in step.deltas]
            if step.logprob is not None:
                entries.append(step.logprob)
        choice = {"index": 0, "text": "".join(text), "logprobs": self._logprobs(entries),
                  "finish_reason": done.finish_reason}
        return {**self._head(), "choices": [choice], "usage": usage(done)}

    async def chunks(self, steps: AsyncIterator[Step | Finished]) -> AsyncIterator[dict]:
        async for step in steps:
            if isinstance(step, Finished):
                yield {**self._head(), "choices": [{"index": 0, "text": "", "logprobs": None,
                                                    "finish_reason": step.finish_reason}]}
                if self.include_usage:
                    yield {**self._head(), "choices": [], "usage": usage(step)}
                return
            entries = [step.logprob] if step.logprob is not None else []
            yield {**self._head(), "choices": [{"index": 0, "text": "".join(d.text for d in step.deltas),
                                                "logprobs": self._logprobs(entries), "finish_reason": None}]}

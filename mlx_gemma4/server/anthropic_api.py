"""Anthropic's Messages API (`POST /v1/messages`): request -> prompt and settings, results -> a message with
`thinking` / `text` / `tool_use` content blocks, or its stream of events (message_start, content_block_start /
_delta / _stop per block, message_delta, message_stop)."""

from __future__ import annotations

import json
from typing import AsyncIterator

from .errors import bad_request
from .generation import Finished, Generator, Prompt, Step, new_id
from .messages import anthropic_messages, expect, optional, require
from .openai_api import sampling

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_tool_choice(value):
    if value is None:
        return None
    kind = expect(value, dict, "tool_choice").get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        return {"name": require(value, "name", str, "tool_choice.name")}
    raise bad_request(f"'tool_choice.type' must be auto, any, tool or none, got {kind!r}", "tool_choice.type")


class MessagesRequest:
    def __init__(self, body: dict, generator: Generator):
        self.model = body.get("model") or generator.model_id
        self.stream = bool(optional(body, "stream", bool, False))
        require(body, "max_tokens", int)
        self.settings = sampling(body, generator, max_tokens_keys=("max_tokens",), stop_key="stop_sequences")
        self.conversation = anthropic_messages(body)
        config = optional(body, "thinking", dict)
        self.thinking = None if config is None else config.get("type") in ("enabled", "adaptive")
        self.tool_choice = anthropic_tool_choice(body.get("tool_choice"))
        self.max_soft_tokens = optional(body, "max_soft_tokens", int)
        self.id = new_id("msg_")

    def prompt(self, generator: Generator) -> Prompt:
        return generator.chat_prompt(self.conversation, enable_thinking=self.thinking, tool_choice=self.tool_choice,
                                     max_soft_tokens=self.max_soft_tokens)

    def _message(self, content: list, done: Finished | None) -> dict:
        stop = STOP_REASONS[done.finish_reason] if done else None
        if done and done.stop_sequence is not None:
            stop = "stop_sequence"
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop, "stop_sequence": done.stop_sequence if done else None,
                "usage": usage(done) if done else {"input_tokens": 0, "output_tokens": 0}}

    async def body(self, steps: AsyncIterator[Step | Finished]) -> dict:
        blocks: list[dict] = []
        async for step in steps:
            if isinstance(step, Finished):
                return self._message(blocks, step)
            for d in step.deltas:
                kind = {"content": "text", "reasoning": "thinking"}.get(d.kind, "tool_use")
                if kind == "tool_use":
                    blocks.append(tool_use_block(d.call))
                elif blocks and blocks[-1]["type"] == kind:
                    blocks[-1][kind] += d.text
                else:
                    blocks.append({"type": kind, kind: d.text, **({"signature": ""} if kind == "thinking" else {})})
        raise AssertionError("generation ended without finishing")

    async def events(self, steps: AsyncIterator[Step | Finished], prompt_tokens: int) -> AsyncIterator[tuple]:
        """(event name, data) pairs."""
        start = self._message([], None)
        start["usage"] = {"input_tokens": prompt_tokens, "output_tokens": 0}
        yield "message_start", {"type": "message_start", "message": start}
        index, open_kind = -1, None

        def close():
            return "content_block_stop", {"type": "content_block_stop", "index": index}

        async for step in steps:
            if isinstance(step, Finished):
                if open_kind is not None:
                    yield close()
                message = self._message([], step)
                yield "message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": message["stop_reason"],
                                                  "stop_sequence": message["stop_sequence"]},
                                        "usage": message["usage"]}
                yield "message_stop", {"type": "message_stop"}
                return
            for d in step.deltas:
                kind = {"content": "text", "reasoning": "thinking"}.get(d.kind, "tool_use")
                if kind != open_kind or kind == "tool_use":
                    if open_kind is not None:
                        yield close()
                    index, open_kind = index + 1, kind
                    block = tool_use_block(d.call) if kind == "tool_use" else {"type": kind, kind: ""}
                    if kind == "tool_use":
                        arguments, block["input"] = json.dumps(block["input"], ensure_ascii=False), {}
                    if kind == "thinking":
                        block["signature"] = ""
                    yield "content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": block}
                if kind == "tool_use":
                    yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "input_json_delta", "partial_json": arguments}}
                else:
                    delta_type = "text_delta" if kind == "text" else "thinking_delta"
                    yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": delta_type, kind: d.text}}


def tool_use_block(call) -> dict:
    return {"type": "tool_use", "id": new_id("toolu_"), "name": call.name, "input": call.arguments}


def usage(done: Finished) -> dict:
    return {"input_tokens": done.prompt_tokens - done.cached_tokens, "output_tokens": done.completion_tokens,
            "cache_read_input_tokens": done.cached_tokens, "cache_creation_input_tokens": 0}

"""OpenAI's Responses API (`POST /v1/responses`), the stateless subset agents (the OpenAI Agents SDK, Codex-style
tools) use: `input` as a string or items (messages with text/image parts, `function_call` and
`function_call_output` items), `instructions`, function `tools`; output items `reasoning`, `message` and
`function_call`, streamed as `response.*` events."""

from __future__ import annotations

import time
from typing import AsyncIterator

from .generation import Finished, Generator, Prompt, Step, new_id
from .messages import as_json_arguments, optional, responses_input
from .openai_api import add_instruction, json_instruction, openai_tool_choice, sampling, thinking


class ResponsesRequest:
    def __init__(self, body: dict, generator: Generator):
        self.model = body.get("model") or generator.model_id
        self.stream = bool(optional(body, "stream", bool, False))
        self.settings = sampling(body, generator, max_tokens_keys=("max_output_tokens",), stop_key="stop")
        self.conversation = responses_input(body)
        text = optional(body, "text", dict, {})
        add_instruction(self.conversation, json_instruction(text.get("format"), "text.format"))
        self.thinking = thinking(body)
        self.tool_choice = openai_tool_choice(body.get("tool_choice"))
        self.max_soft_tokens = optional(body, "max_soft_tokens", int)
        self.id, self.created = new_id("resp_"), int(time.time())
        self.echo = {"instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
                     "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
                     "parallel_tool_calls": body.get("parallel_tool_calls", True),
                     "temperature": self.settings.temperature, "top_p": self.settings.top_p,
                     "max_output_tokens": body.get("max_output_tokens"), "text": {"format": {"type": "text"}, **text},
                     "reasoning": body.get("reasoning"), "truncation": "disabled", "store": False,
                     "previous_response_id": None, "user": body.get("user")}

    def prompt(self, generator: Generator) -> Prompt:
        return generator.chat_prompt(self.conversation, enable_thinking=self.thinking, tool_choice=self.tool_choice,
                                     max_soft_tokens=self.max_soft_tokens)

    def response(self, output: list[dict], done: Finished | None) -> dict:
        status = "in_progress" if done is None else "incomplete" if done.finish_reason == "length" else "completed"
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "output": output, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": usage(done) if done else None, **self.echo}

    async def body(self, steps: AsyncIterator[Step | Finished]) -> dict:
        items = OutputItems()
        async for step in steps:
            if isinstance(step, Finished):
                list(items.close())
                return self.response(items.output, step)
            for d in step.deltas:
                list(items.add(d))
        raise AssertionError("generation ended without finishing")

    async def events(self, steps: AsyncIterator[Step | Finished]) -> AsyncIterator[tuple]:
        """(event name, data) pairs, numbered by sequence_number."""
        number = 0

        def event(name: str, data: dict) -> tuple:
            nonlocal number
            number += 1
            return name, {"type": name, "sequence_number": number - 1, **data}

        yield event("response.created", {"response": self.response([], None)})
        yield event("response.in_progress", {"response": self.response([], None)})
        items = OutputItems()
        async for step in steps:
            if isinstance(step, Finished):
                for name, data in items.close():
                    yield event(name, data)
                final = self.response(items.output, step)
                yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                            {"response": final})
                return
            for d in step.deltas:
                for name, data in items.add(d):
                    yield event(name, data)


class OutputItems:
    """The response's output items, built from deltas in order; `add`/`close` yield the stream events."""

    def __init__(self):
        self.output: list[dict] = []
        self._open: dict | None = None  # the reasoning or message item receiving text

    def add(self, delta):
        kind = {"content": "message", "reasoning": "reasoning"}.get(delta.kind, "function_call")
        if self._open is not None and (kind == "function_call" or self._open["type"] != kind):
            yield from self.close()
        if kind == "function_call":
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": new_id("call_"),
                    "name": delta.call.name, "arguments": "", "status": "in_progress"}
            index = len(self.output)
            self.output.append(item)
            arguments = as_json_arguments(delta.call.arguments)
            yield "response.output_item.added", {"output_index": index, "item": dict(item)}
            yield "response.function_call_arguments.delta", {"item_id": item["id"], "output_index": index,
                                                             "delta": arguments}
            item.update(arguments=arguments, status="completed")
            yield "response.function_call_arguments.done", {"item_id": item["id"], "output_index": index,
                                                            "name": item["name"], "arguments": arguments}
            yield "response.output_item.done", {"output_index": index, "item": item}
            return
        if self._open is None:
            index = len(self.output)
            if kind == "message":
                item = {"type": "message", "id": new_id("msg_"), "status": "in_progress", "role": "assistant",
                        "content": []}
            else:
                item = {"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": [],
                        "status": "in_progress"}
            self.output.append(item)
            self._open = item
            yield "response.output_item.added", {"output_index": index, "item": {**item, "content": []}}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "message" else \
                {"type": "reasoning_text", "text": ""}
            item["content"].append(part)
            if kind == "message":
                yield "response.content_part.added", {"item_id": item["id"], "output_index": index,
                                                      "content_index": 0, "part": dict(part)}
        item, index = self._open, self.output.index(self._open)
        item["content"][0]["text"] += delta.text
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        yield name, {"item_id": item["id"], "output_index": index, "content_index": 0, "delta": delta.text,
                     **({"logprobs": []} if kind == "message" else {})}

    def close(self):
        item, self._open = self._open, None
        if item is None:
            return
        index = self.output.index(item)
        part = item["content"][0]
        item["status"] = "completed"
        if item["type"] == "message":
            yield "response.output_text.done", {"item_id": item["id"], "output_index": index, "content_index": 0,
                                                "text": part["text"], "logprobs": []}
            yield "response.content_part.done", {"item_id": item["id"], "output_index": index, "content_index": 0,
                                                 "part": part}
        else:
            yield "response.reasoning_text.done", {"item_id": item["id"], "output_index": index, "content_index": 0,
                                                   "text": part["text"]}
        yield "response.output_item.done", {"output_index": index, "item": item}


def usage(done: Finished) -> dict:
    return {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": done.prompt_tokens + done.completion_tokens}

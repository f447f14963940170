"""Chat sessions: multi-turn conversations that keep the KV caches between turns, so each turn only prefills
its new tokens. Used by the REPL (`cli.py`) and the app."""

from __future__ import annotations

from typing import Iterator

from .generate import GenerationChunk, stream_generate
from .prompt_cache import PromptCache


class ChatSession:
    """Multi-turn chat that keeps the KV caches between turns and only prefills each turn's new tokens.

    Each new turn feeds the template's text between the cached history and the new generation prompt (the
    close of the previous reply and the new user turn). The cache holds the reply as generated (with its empty
    thought channel), where re-rendering the history would drop that; the difference is the template's own
    history formatting, which a cache that cannot be rewound (sliding windows) cannot replay."""

    def __init__(self, model, processor, *, system: str | None = None, enable_thinking: bool = False, tools=None):
        self.model, self.processor = model, processor
        self.enable_thinking, self.tools = enable_thinking, tools
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = PromptCache.fresh(model)
        self._unfed: list[int] = []
        self._fed_extra: list[int] = []

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tools=self.tools, enable_thinking=self.enable_thinking,
                                                  add_generation_prompt=generation_prompt)

    def _turn_ids(self, user_text: str) -> list[int]:
        """The full token ids of the conversation plus this user turn, as the cache should see them."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        if not self.cache.tokens:
            return self.processor.encode(self._render(messages, True))
        reply = self.processor.split_thinking(self.messages[-1]["content"])[1]
        history = self._render(self.messages, False)
        full = self._render(messages, True)
        at = history.rfind(reply) if reply else -1
        if at < 0 or not full.startswith(history):
            return self.processor.encode(full)  # no clean continuation: prefill from scratch
        closing = history[at + len(reply):]
        fed_after_reply = self.processor.decode(self._fed_extra)
        if closing.startswith(fed_after_reply):
            closing = closing[len(fed_after_reply):]
        delta = closing + full[len(history):]
        return self.cache.tokens + self._unfed + self.processor.encode(delta, add_bos=False)

    def send(self, user_text: str, **generation_kwargs) -> Iterator[GenerationChunk]:
        """Stream the reply to a user turn (generation_kwargs: stream_generate's). A turn that does not fit the
        context raises engine.ContextError before anything is prefilled, and the conversation stays as it was.
        A reply cut short (max_tokens, a full context, the caller closing the stream) is kept as it stands."""
        ids = self._turn_ids(user_text)
        reply, generated, chunk = [], [], None
        try:
            for chunk in stream_generate(self.model, self.processor, ids, prompt_cache=self.cache,
                                         **generation_kwargs):
                reply.append(chunk.text)
                if chunk.token is not None:
                    generated.append(chunk.token)
                yield chunk
        finally:
            if chunk is not None:  # else refused or failed before the first token: the conversation is as it was
                self.messages += [{"role": "user", "content": user_text},
                                  {"role": "assistant", "content": "".join(reply)}]
                fed = self.cache.tokens[chunk.stats.cached_tokens + chunk.stats.prompt_tokens:]
                self._unfed = generated[len(fed):]  # the last token of a cut reply is not in the cache
                self._fed_extra = fed[len(generated):]  # the stop token is in the cache but not in the reply
            if self.cache.offset != len(self.cache.tokens):  # a step failed halfway: the next turn starts over
                self._forget_cache()

    @property
    def turns(self) -> int:
        """User turns in the conversation."""
        return sum(m["role"] == "user" for m in self.messages)

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self._forget_cache()

    def drop_oldest_turn(self) -> None:
        """Forget the oldest user turn and the reply to it; the next turn prefills the rest from scratch."""
        first = next(i for i, m in enumerate(self.messages) if m["role"] == "user")
        end = next((i for i in range(first + 1, len(self.messages)) if self.messages[i]["role"] == "user"),
                   len(self.messages))
        del self.messages[first:end]
        self._forget_cache()

    def _forget_cache(self) -> None:
        self.cache = PromptCache.fresh(self.model)
        self._unfed, self._fed_extra = [], []

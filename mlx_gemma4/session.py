"""Chat sessions: multi-turn conversations that keep the KV caches between turns, so each turn only prefills
its new tokens. Used by the REPL (`cli.py`) and the app."""

from __future__ import annotations

from typing import Iterator

from .generate import GenerationChunk, stream_generate
from .processing.messages import split_media
from .prompt_cache import PromptCache


REPLY_STAND_IN = "\uE000reply\uE001"  # private-use characters: no template writes them


def _as_list(media) -> list:
    return [] if media is None else list(media) if isinstance(media, (list, tuple)) else [media]


def user_message(content, images=None, audio=None) -> dict:
    """A user message: `content` (text or a content list) after image and audio items for `images` / `audio`."""
    items = ([{"type": "image", "image": i} for i in _as_list(images)]
             + [{"type": "audio", "audio": a} for a in _as_list(audio)])
    if not items:
        return {"role": "user", "content": content}
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    return {"role": "user", "content": items + text}


class ChatSession:
    """Multi-turn chat that keeps the KV caches between turns and only prefills each turn's new tokens; any turn
    may carry images and audio clips.

    Each new turn feeds the template's text between the cached history and the new generation prompt (the
    close of the previous reply and the new user turn, with this turn's media expanded to their soft tokens).
    The cache holds the reply as generated (with its empty thought channel), where re-rendering the history
    would drop that; the difference is the template's own history formatting, which a cache that cannot be
    rewound (sliding windows) cannot replay. When the history cannot be continued cleanly (or after reset,
    drop_oldest_turn or a failed step), the whole conversation is prefilled again, earlier media included.

    `prompt_cache`: caches holding a prefix of the first turn (e.g. the system prompt, from
    `mlx-gemma4-prompt-cache`); the first turn prefills only the rest."""

    def __init__(self, model, processor, *, system: str | None = None, enable_thinking: bool = False, tools=None,
                 prompt_cache: PromptCache | None = None):
        self.model, self.processor = model, processor
        self.enable_thinking, self.tools = enable_thinking, tools
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = prompt_cache or PromptCache.fresh(model)
        self._unfed: list[int] = []
        self._fed_extra: list[int] = []

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.processor.render_prompt(messages, tools=self.tools, enable_thinking=self.enable_thinking,
                                            add_generation_prompt=generation_prompt)

    def _turn_inputs(self, message: dict, max_soft_tokens: int | None = None) -> tuple[list[int], dict]:
        """(token ids of the conversation plus this user message as the cache should hold them, the media inputs
        for the part after the cache)."""
        previous = self.messages[-1] if self.messages else None
        if not self.cache.tokens or previous is None or previous["role"] != "assistant":
            return self._whole_conversation([*self.messages, message], max_soft_tokens)
        # The cache holds the last reply as generated; the template's text after it (closing the turn) comes from
        # rendering a stand-in reply, whatever the real one is (empty, cut mid-word, with a thought channel).
        messages = [*self.messages[:-1], {**previous, "content": REPLY_STAND_IN}]
        history = self._render(messages, False)
        full = self._render([*messages, message], True)
        if history.count(REPLY_STAND_IN) != 1 or not full.startswith(history):
            return self._whole_conversation([*self.messages, message], max_soft_tokens)  # no clean continuation
        closing = history[history.index(REPLY_STAND_IN) + len(REPLY_STAND_IN):]
        fed_after_reply = self.processor.decode(self._fed_extra)
        if closing.startswith(fed_after_reply):
            closing = closing[len(fed_after_reply):]
        expansions, media = self.processor.process_media(split_media([message])[1], max_soft_tokens)
        delta = self.processor.encode_prompt_text(closing + full[len(history):], expansions, add_bos=False)
        return self.cache.tokens + self._unfed + delta, media

    def _whole_conversation(self, messages: list[dict], max_soft_tokens: int | None) -> tuple[list[int], dict]:
        return self.processor.prompt_inputs(messages, tools=self.tools, enable_thinking=self.enable_thinking,
                                            max_soft_tokens=max_soft_tokens)

    def send(self, content, *, images=None, audio=None, max_soft_tokens: int | None = None,
             **generation_kwargs) -> Iterator[GenerationChunk]:
        """Stream the reply to a user turn: `content` is its text or a content list (transformers' format, media
        items included); `images` / `audio` (paths, arrays, bytes, PIL images) come before the text.
        generation_kwargs: stream_generate's. A turn that does not fit the context raises engine.ContextError
        before anything is prefilled, and the conversation stays as it was. A reply cut short (max_tokens, a
        full context, the caller closing the stream) is kept as it stands."""
        message = user_message(content, images, audio)
        ids, media = self._turn_inputs(message, max_soft_tokens)
        reply, generated, chunk = [], [], None
        try:
            for chunk in stream_generate(self.model, self.processor, ids, prompt_cache=self.cache,
                                         media=media or None, **generation_kwargs):
                reply.append(chunk.text)
                if chunk.token is not None:
                    generated.append(chunk.token)
                yield chunk
        finally:
            if chunk is not None:  # else refused or failed before the first token: the conversation is as it was
                self.messages += [message, {"role": "assistant", "content": "".join(reply)}]
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

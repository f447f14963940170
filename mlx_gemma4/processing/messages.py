"""Chat messages as transformers' processors take them, and user text that stays text.

Media inside content lists (transformers' `ProcessorMixin.apply_chat_template` format), in any message:

    {"type": "image", "image" | "url" | "path" | "base64": ...}   path, http(s)/data URL, PIL.Image, uint8 array,
                                                                  encoded bytes; "base64": base64 text
    {"type": "audio", "audio" | "url" | "path": ...}               path, URL, encoded bytes, 16 kHz float array
    {"type": "video", "video" | "url" | "path": ...}               path, URL, list of frames, (T, H, W, C) array
    {"type": "text", "text": "..."}

`split_media` takes the media out of the messages, in conversation order (the order the chat template writes
their placeholders), and leaves bare `{"type": kind}` items for the template.

Control tokens in user-provided strings (`<turn|>`, `<|turn>system`, `<|image|>` typed by a user) are marked
with two private-use characters before rendering, so that the rendered prompt can be encoded with those
typed tokens as plain text and only the template's own control tokens as tokens (llama.cpp's
`parse_special=false` for user text; transformers' `apply_chat_template(..., sanitize_control_tokens=True)`,
whose marking scheme this follows so that the ids are the same).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

MEDIA_KINDS = ("image", "audio", "video")
CONTENT_TYPES = ("text", *MEDIA_KINDS)
SOURCE_KEYS = {"image": ("image", "url", "path", "base64"), "audio": ("audio", "url", "path"),
               "video": ("video", "url", "path")}

MARK_START, MARK_END = "\U000f0000", "\U000f0001"


@dataclass
class MediaItem:
    kind: str  # "image", "audio" or "video"
    source: Any  # None for a bare placeholder item (its input comes from the images=/audio=/videos= keywords)
    where: str  # "message 1, content item 0", for error messages
    base64: bool = False  # source is base64 text


def split_media(messages: list[dict]) -> tuple[list[dict], list[MediaItem]]:
    """(messages with every media item reduced to {"type": kind}, the media items in order). Raises ValueError
    for content that is not a string or a list of typed items."""
    out, items = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append(message)
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"message {i}: content must be a string or a list of content items, got "
                             f"{type(content).__name__}")
        new_content = []
        for j, item in enumerate(content):
            where = f"message {i}, content item {j}"
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise ValueError(f"{where}: a content item must be a dict with a 'type' ({', '.join(CONTENT_TYPES)})"
                                 f", got {item!r:.80}")
            kind = item["type"]
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}: a text item needs a string 'text'")
                new_content.append(item)
                continue
            if kind not in MEDIA_KINDS:
                raise ValueError(f"{where}: unknown content type {kind!r} (expected one of {', '.join(CONTENT_TYPES)})")
            keys = [k for k in SOURCE_KEYS[kind] if item.get(k) is not None]
            if len(keys) > 1:
                raise ValueError(f"{where}: give the {kind} once, under one of {SOURCE_KEYS[kind]}, not {keys}")
            source = item[keys[0]] if keys else None
            items.append(MediaItem(kind, source, where, base64=keys == ["base64"]))
            new_content.append({"type": kind})
        out.append({**message, "content": new_content})
    return out, items


def assign_keyword_media(items: list[MediaItem], keyword_media: dict[str, list]) -> list[MediaItem]:
    """Media given as images=/audio=/videos= fill the bare placeholder items of their kind, in order. Media in
    both places, a placeholder without media, and media without a placeholder are errors."""
    given = {kind: list(v) for kind, v in keyword_media.items() if v}
    with_source = [it for it in items if it.source is not None]
    if given and with_source:
        raise ValueError(f"media were given both inside the messages ({with_source[0].kind} at "
                         f"{with_source[0].where}) and as {'/'.join(k if k == 'audio' else k + 's' for k in given)}= "
                         "arguments; use one or the other")
    for kind in MEDIA_KINDS:
        bare = [it for it in items if it.kind == kind and it.source is None]
        inputs = given.get(kind, [])
        if len(bare) != len(inputs):
            keyword = kind if kind == "audio" else kind + "s"
            if not inputs:
                article = "an" if kind[0] in "aeiou" else "a"
                raise ValueError(f"{bare[0].where}: {article} {kind} item without its {kind} (give it inside the "
                                 f"item as {{'type': '{kind}', '{kind}': ...}}, or pass {keyword}=)")
            raise ValueError(f"the messages have {len(bare)} {kind} placeholder item(s) but {len(inputs)} {kind} "
                             f"input(s) were given as {keyword}=")
        for item, source in zip(bare, inputs):
            item.source = source
    return items


# -- control tokens in user text ------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def control_token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of `tokens`, longest first (a token wins over the tokens it contains)."""
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)) or "(?!)")


@lru_cache(maxsize=16)
def marked_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Splits rendered text at marked tokens (group 1: the token) and at lone marker characters (group None)."""
    inner = control_token_pattern(tokens).pattern
    return re.compile(f"{MARK_START}({inner}){MARK_END}|[{MARK_START}{MARK_END}]")


def mark_control_tokens(obj, pattern: re.Pattern):
    """Wrap every control token in the strings of obj (recursively through lists and dict values; keys are left
    alone) in MARK_START/MARK_END. Marker characters already in a string are removed first, so they cannot
    be used to forge a marked token."""
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
    if isinstance(obj, dict):
        return {k: mark_control_tokens(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark_control_tokens(v, pattern) for v in obj]
    return obj


def split_marked(text: str, tokens: tuple[str, ...]) -> list[tuple[str, bool]]:
    """Rendered text -> [(piece, is_typed_control_token)] in order. Lone markers (a template that cut a marked
    string apart) are dropped but still separate the pieces, so the text around them cannot join into a
    control token."""
    if MARK_START not in text and MARK_END not in text:
        return [(text, False)]
    parts = marked_pattern(tokens).split(text)
    pieces = [(parts[0], False)]  # kept even when empty: the first piece is encoded as the start of the text
    for k in range(1, len(parts), 2):
        if parts[k] is not None:
            pieces.append((parts[k], True))
        if parts[k + 1]:
            pieces.append((parts[k + 1], False))
    return pieces

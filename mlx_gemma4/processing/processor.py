"""The processor `load()` returns: tokenizer, chat template, stop tokens and the media processors of a checkpoint.

`Processor.from_pretrained(directory)` reads tokenizer.json / tokenizer_config.json, the chat template
(chat_template.jinja, tokenizer_config.json, or the built-in Gemma 4 one), the stop tokens
(generation_config.json `eos_token_id`, else config.json's; plus <eos> and <turn|>) and processor_config.json. A
checkpoint without a chat template or (with towers) processor_config.json gets the published Gemma 4 ones shipped
in the package, with a warning naming them.

`prompt_inputs(messages)` turns a conversation into (token ids, media arrays), as transformers'
`Gemma4Processor.apply_chat_template(messages, tokenize=True, return_dict=True)` does: images, audio clips and
videos inside the messages' content lists (processing.messages) are loaded (processing.media), the template
writes one `<|image|>` / `<|audio|>` / `<|video|>` per item, and each becomes `<|image>` + N x `<|image|>` +
`<image|>` (N soft tokens of that input; for a video, per frame `mm:ss <|image>` + N x `<|video|>` +
`<image|>`), with the pixel patches / log-mel features returned for `model.prepare_inputs`.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, read_json
from .chat import (BUILTIN_TEMPLATE, checkpoint_chat_template, parse_tool_calls, render_chat, split_thinking,
                   template_literal_text)
from .messages import (MEDIA_KINDS, MediaItem, assign_keyword_media, control_token_pattern, mark_control_tokens,
                       split_marked, split_media)
from .media import resolve_source
from .tokenizer import Tokenizer

# google/gemma-4-*-it's processor_config.json (image, video and audio settings; the same for all four models)
PUBLISHED_PROCESSOR_CONFIG = Path(__file__).resolve().parent.parent / "presets" / "processor_config.json"

# Per media kind: the tokenizer's names of (placeholder, begin, end); video frames use the image begin/end.
_PLACEHOLDER_NAMES = {"image": ("image", "image_start", "image_end"), "audio": ("audio", "audio_start", "audio_end"),
                      "video": ("video", "image_start", "image_end")}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def read_stop_token_ids(directory: Path, tokenizer: Tokenizer, config=None) -> list[int]:
    """generation_config.json's eos_token_id (else config.json's), plus <eos> and <turn|>: a chat reply ends
    with its turn even when a base checkpoint's generation config lists only <eos>."""
    ids: list[int] = []
    gen_file = directory / "generation_config.json"
    if gen_file.is_file():
        try:
            ids = _ids(read_json(gen_file).get("eos_token_id"))
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{gen_file}: eos_token_id must be a token id or a list of them") from e
    if not ids:
        ids = list(getattr(config, "eos_token_ids", None) or [])
    for name in ("eos", "turn_end"):
        tid = tokenizer.token_id(name)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def _as_list(media) -> list:
    """One input (path, bytes, array, PIL image) or a list/tuple of them -> list."""
    if media is None:
        return []
    return list(media) if isinstance(media, (list, tuple)) else [media]


@dataclass
class Processor:
    tokenizer: Tokenizer
    chat_template: str
    stop_token_ids: list[int] = field(default_factory=list)
    processor_config: dict = field(default_factory=dict)  # processor_config.json (else Gemma 4's published one)
    model_type: str = "gemma4"  # gemma4_unified (12B) takes merged image patches and raw waveform frames

    @classmethod
    def from_pretrained(cls, directory: str | Path, config=None) -> "Processor | None":
        """The checkpoint's processor, or None when the directory has no tokenizer.json (weights-only)."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            return None
        tokenizer = Tokenizer.from_pretrained(directory)
        fallbacks = []  # files the checkpoint lacks, replaced by the published Gemma 4 ones shipped here
        chat_template = checkpoint_chat_template(directory)
        if chat_template is None:
            chat_template = BUILTIN_TEMPLATE.read_text()
            fallbacks.append("chat_template.jinja")
        model_type = getattr(config, "model_type", None) or "gemma4"
        proc_file = directory / "processor_config.json"
        if proc_file.is_file():
            processor_config = read_json(proc_file)
        elif model_type == "gemma4":  # the 12B's processors keep their own defaults
            processor_config = read_json(PUBLISHED_PROCESSOR_CONFIG)
            if config is not None and (config.vision is not None or config.audio is not None):
                fallbacks.append("processor_config.json")  # only towers read it
        else:
            processor_config = {}
        if fallbacks:
            warnings.warn(f"{directory} has no {', '.join(fallbacks)}: using the published Gemma 4 "
                          f"{' and '.join(f.split('.')[0].replace('_', ' ') for f in fallbacks)} shipped with "
                          "mlx_gemma4", stacklevel=4)
        return cls(tokenizer=tokenizer, chat_template=chat_template,
                   stop_token_ids=read_stop_token_ids(directory, tokenizer, config),
                   processor_config=processor_config, model_type=model_type)

    # -- text -----------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, *, tools=None, add_generation_prompt: bool = True,
                            enable_thinking: bool = False, **kwargs) -> str:
        """The rendered prompt text (transformers' apply_chat_template(..., tokenize=False)); media items render as
        their placeholders."""
        messages, _ = split_media(self.messages_for(messages))
        return render_chat(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking, special_tokens=self.tokenizer.special_tokens_map,
                           **kwargs)

    def messages_for(self, prompt_or_messages, system: str | None = None) -> list[dict]:
        """A message list from a plain prompt (optionally with a system prompt) or a message list as is."""
        if isinstance(prompt_or_messages, str):
            messages = [{"role": "user", "content": prompt_or_messages}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            return messages
        if not isinstance(prompt_or_messages, (list, tuple)):
            raise TypeError("a prompt must be a string or a list of {'role': ..., 'content': ...} messages, got "
                            f"{type(prompt_or_messages).__name__}")
        if system:
            raise ValueError("pass the system prompt as the first message when giving a message list")
        return list(prompt_or_messages)

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The tokens user text cannot write: the vocabulary's special added tokens, plus its other added tokens
        that the chat template writes (whitespace excepted); the same set as transformers'
        sanitize_control_tokens."""
        literal = template_literal_text(self.chat_template)
        return tuple(sorted(t for t, special in self.tokenizer.added_tokens().items()
                            if special or (t in literal and not t.isspace())))

    def prompt_ids(self, prompt_or_messages, *, system: str | None = None, enable_thinking: bool = False,
                   tools=None, use_chat_template: bool = True, add_generation_prompt: bool = True,
                   sanitize_control_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (see prompt_inputs; a prompt with media is an error here)."""
        ids, media = self.prompt_inputs(prompt_or_messages, system=system, enable_thinking=enable_thinking,
                                        tools=tools, use_chat_template=use_chat_template,
                                        add_generation_prompt=add_generation_prompt,
                                        sanitize_control_tokens=sanitize_control_tokens)
        if media:
            raise ValueError("the messages hold media: use prompt_inputs, which also returns their features")
        return ids

    def prompt_inputs(self, prompt_or_messages, *, system: str | None = None, enable_thinking: bool = False,
                      tools=None, use_chat_template: bool = True, images=None, audio=None, videos=None,
                      max_soft_tokens: int | None = None, add_generation_prompt: bool = True,
                      sanitize_control_tokens: bool = True) -> tuple[list[int], dict]:
        """(token ids, media arrays for model.prepare_inputs) of a prompt.

        prompt_or_messages: a string (one user turn, after the optional system prompt) or a message list whose
        contents may hold images, audio clips and videos in transformers' format (see processing.messages), in
        any turn, interleaved with text. `images=` / `audio=` / `videos=` are the alternative: with a string
        prompt they open the user turn (images, audio, videos, then the text); with a message list they fill its
        bare {"type": "image"} / {"type": "audio"} / {"type": "video"} items in order. Media both in the
        messages and in these arguments, or a media item without its media, is an error.
        max_soft_tokens: image token budget (70, 140, 280, 560, 1120).

        Control tokens in user-provided text stay text (sanitize_control_tokens=True; the ids then equal
        transformers' apply_chat_template(..., sanitize_control_tokens=True), which equal plain rendering +
        encoding whenever no control token is typed). sanitize_control_tokens=False turns them into tokens, for
        callers that put markup in messages on purpose. use_chat_template=False takes a string that is already
        a rendered prompt and encodes it as is, control tokens included (plus <bos>)."""
        keyword_media = {"image": _as_list(images), "audio": _as_list(audio), "video": _as_list(videos)}
        if not use_chat_template:
            if not isinstance(prompt_or_messages, str):
                raise ValueError("a message list needs the chat template")
            if any(keyword_media.values()):
                raise ValueError("image/audio/video prompts need the chat template")
            return self.tokenizer.encode(prompt_or_messages, add_bos=True), {}
        if isinstance(prompt_or_messages, str) and any(keyword_media.values()):
            messages = self.messages_for("", system)
            messages[-1]["content"] = [*({"type": kind} for kind in MEDIA_KINDS for _ in keyword_media[kind]),
                                       {"type": "text", "text": prompt_or_messages}]
        else:
            messages = self.messages_for(prompt_or_messages, system)
        messages, items = split_media(messages)
        items = assign_keyword_media(items, keyword_media)
        text = self.render_prompt(messages, tools=tools, enable_thinking=enable_thinking,
                                  add_generation_prompt=add_generation_prompt,
                                  sanitize_control_tokens=sanitize_control_tokens)
        expansions, media = self.process_media(items, max_soft_tokens)
        return self.encode_prompt_text(text, expansions, sanitize_control_tokens=sanitize_control_tokens), media

    def render_prompt(self, messages, *, tools=None, enable_thinking: bool = False, add_generation_prompt: bool = True,
                      sanitize_control_tokens: bool = True) -> str:
        """The rendered prompt with the control tokens of user-provided strings marked (see processing.messages),
        for encode_prompt_text. Media items render as their placeholders. A slice of it between two messages
        (a chat session's new turn) encodes the same way."""
        messages, _ = split_media(self.messages_for(messages))
        mark = None
        if sanitize_control_tokens:
            mark = functools.partial(mark_control_tokens, pattern=control_token_pattern(self.control_tokens))
        return render_chat(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking, special_tokens=self.tokenizer.special_tokens_map,
                           mark=mark)

    def encode_prompt_text(self, text: str, expansions: dict[str, list[str]] | None = None, *, add_bos: bool = True,
                           sanitize_control_tokens: bool = True) -> list[int]:
        """Token ids of render_prompt's text: marked control tokens as plain text, the template's own as tokens,
        and the i-th media placeholder of each kind replaced by expansions[kind][i] (every placeholder the
        template wrote needs one)."""
        pieces = split_marked(text, self.control_tokens) if sanitize_control_tokens else [(text, False)]
        pieces = self._expand_placeholders(pieces, expansions or {})
        return self.tokenizer.encode_pieces(pieces, add_bos=add_bos)

    # -- media ----------------------------------------------------------------------------------------------
    def _placeholder_tokens(self, kind: str) -> tuple[str, str, str]:
        """(placeholder, begin, end) token texts of a media kind in this vocabulary."""
        tokens = tuple(self.tokenizer.token_text(n) for n in _PLACEHOLDER_NAMES[kind])
        if any(t is None for t in tokens):
            raise ValueError(f"this tokenizer has no {kind} tokens, so the model takes no {kind} input")
        return tokens

    def process_media(self, items: list[MediaItem], max_soft_tokens: int | None) -> tuple[dict, dict]:
        """({kind: [placeholder expansion per input]}, media arrays for model.prepare_inputs) of media items
        (processing.messages.split_media) that all carry their media."""
        assign_keyword_media(items, {})  # a bare item is an error here
        by_kind = {kind: [it for it in items if it.kind == kind] for kind in MEDIA_KINDS}
        expansions: dict[str, list[str]] = {}
        media: dict = {}
        if by_kind["image"]:
            features = self.image_processor()([resolve_source(it) for it in by_kind["image"]], max_soft_tokens)
            token, begin, end = self._placeholder_tokens("image")
            expansions["image"] = [begin + token * n + end for n in features.num_soft_tokens]
            media.update(pixel_values=features.pixel_values, image_position_ids=features.position_ids)
        if by_kind["audio"]:
            from .audio import prepare_waveform

            features = self.audio_feature_extractor()([prepare_waveform(resolve_source(it)) for it in by_kind["audio"]])
            token, begin, end = self._placeholder_tokens("audio")
            expansions["audio"] = [begin + token * int(n) + end for n in features.num_soft_tokens]
            media.update(input_features=features.features, input_features_mask=features.mask)
        if by_kind["video"]:
            from .video import VideoProcessor, video_placeholder

            processor = VideoProcessor.from_dict(self.processor_config.get("video_processor", {}))
            videos = [processor(resolve_source(it)) for it in by_kind["video"]]
            token, begin, end = self._placeholder_tokens("video")
            expansions["video"] = [video_placeholder(v.timestamps, v.tokens_per_frame, token, begin, end)
                                   for v in videos]
            media.update(pixel_values_videos=np.concatenate([v.pixel_values for v in videos]),
                         video_position_ids=np.concatenate([v.position_ids for v in videos]))
        return expansions, media

    def image_processor(self):
        """The checkpoint's image processor (processor_config.json's settings, else the published defaults)."""
        config = self.processor_config.get("image_processor", {})
        if self.model_type == "gemma4_unified":
            from .unified import UnifiedImageProcessor

            return UnifiedImageProcessor.from_dict(config)
        from .image import ImageProcessor

        return ImageProcessor.from_dict(config)

    def audio_feature_extractor(self):
        config = self.processor_config.get("feature_extractor")
        if self.model_type == "gemma4_unified":
            from .unified import UnifiedAudioFeatureExtractor

            return UnifiedAudioFeatureExtractor.from_dict(config or {})
        from .audio import AudioFeatureExtractor

        return AudioFeatureExtractor.from_dict(config) if config else AudioFeatureExtractor()

    def _expand_placeholders(self, pieces: list[tuple[str, bool]],
                             expansions: dict[str, list[str]]) -> list[tuple[str, bool]]:
        """Replace the i-th media placeholder the template wrote (never one a user typed: those are plain-text
        pieces) by the i-th input's expansion. Every placeholder needs exactly one input and vice versa."""
        kinds = {self.tokenizer.token_text(kind): kind for kind in MEDIA_KINDS}
        kinds.pop(None, None)
        counts = dict.fromkeys(MEDIA_KINDS, 0)

        def expand(m):
            kind = kinds[m.group(0)]
            i, counts[kind] = counts[kind], counts[kind] + 1
            given = expansions.get(kind, [])
            return given[i] if i < len(given) else m.group(0)

        if kinds:
            pattern = re.compile("|".join(map(re.escape, kinds)))
            pieces = [(text if plain else pattern.sub(expand, text), plain) for text, plain in pieces]
        for kind in MEDIA_KINDS:
            given = len(expansions.get(kind, []))
            if counts[kind] != given:
                raise ValueError(f"the prompt has {counts[kind]} {kind} placeholders but {given} {kind} inputs were "
                                 f"given (each {kind} needs its {{'type': '{kind}'}} item in a user or assistant "
                                 "turn; the Gemma 4 template writes none in a system turn)")
        return pieces

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special)

    # -- model output ---------------------------------------------------------------------------------------
    parse_tool_calls = staticmethod(parse_tool_calls)
    split_thinking = staticmethod(split_thinking)

"""The processor `load()` returns: the text side (tokenizer, chat template, stop tokens) of a checkpoint.

`Processor.from_pretrained(directory)` reads tokenizer.json / tokenizer_config.json, the chat template
(chat_template.jinja, tokenizer_config.json, or the built-in Gemma 4 one) and the stop tokens
(generation_config.json `eos_token_id`, else config.json's; plus <eos> and <turn|>).
Images and audio clips (`prompt_inputs(..., images=[...], audio=[...])`) go into the user turn as
`{"type": "image"}` / `{"type": "audio"}` items; each `<|image|>` / `<|audio|>` the template writes becomes
`<|image>` + N x `<|image|>` + `<image|>` (N soft tokens of that input; transformers' Gemma4Processor
replace_image_token / replace_audio_token), and the pixel patches / log-mel features come back as model inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .chat import load_chat_template, parse_tool_calls, render_chat, split_thinking
from .tokenizer import Tokenizer


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
        ids = _ids(json.loads(gen_file.read_text()).get("eos_token_id"))
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


def expand_placeholders(text: str, placeholder: str, begin: str, end: str, counts: list[int], kind: str) -> str:
    """Replace the i-th `placeholder` in text by begin + counts[i] x placeholder + end."""
    parts = text.split(placeholder)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the prompt has {len(parts) - 1} {kind} placeholders but {len(counts)} {kind} inputs "
                         f"were given")
    out = [parts[0]]
    for n, part in zip(counts, parts[1:]):
        out += [begin, placeholder * n, end, part]
    return "".join(out)


@dataclass
class Processor:
    tokenizer: Tokenizer
    chat_template: str
    stop_token_ids: list[int] = field(default_factory=list)
    processor_config: dict = field(default_factory=dict)  # processor_config.json, if any
    model_type: str = "gemma4"  # gemma4_unified (12B) takes merged image patches and raw waveform frames

    @classmethod
    def from_pretrained(cls, directory: str | Path, config=None) -> "Processor | None":
        """The checkpoint's processor, or None when the directory has no tokenizer.json (weights-only)."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            return None
        tokenizer = Tokenizer.from_pretrained(directory)
        proc_file = directory / "processor_config.json"
        return cls(tokenizer=tokenizer, chat_template=load_chat_template(directory),
                   stop_token_ids=read_stop_token_ids(directory, tokenizer, config),
                   processor_config=json.loads(proc_file.read_text()) if proc_file.is_file() else {},
                   model_type=getattr(config, "model_type", None) or "gemma4")

    # -- text -----------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, *, tools=None, add_generation_prompt: bool = True,
                            enable_thinking: bool = False, **kwargs) -> str:
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
        if system:
            raise ValueError("pass the system prompt as the first message when giving a message list")
        return list(prompt_or_messages)

    def prompt_ids(self, prompt_or_messages, *, system: str | None = None, enable_thinking: bool = False,
                   tools=None, use_chat_template: bool = True) -> list[int]:
        """Token ids to prefill. With use_chat_template=False a string prompt is encoded raw (plus <bos>)."""
        if not use_chat_template:
            if not isinstance(prompt_or_messages, str):
                raise ValueError("a message list needs the chat template")
            return self.tokenizer.encode(prompt_or_messages, add_bos=True)
        text = self.apply_chat_template(self.messages_for(prompt_or_messages, system), tools=tools,
                                        enable_thinking=enable_thinking)
        return self.tokenizer.encode(text, add_bos=True)

    def prompt_inputs(self, prompt_or_messages, *, system: str | None = None, enable_thinking: bool = False,
                      tools=None, use_chat_template: bool = True, images=None, audio=None,
                      max_soft_tokens: int | None = None) -> tuple[list[int], dict]:
        """(token ids, media inputs for model.prepare_inputs). A string prompt with media becomes one user turn
        with the images, then the audio clips, then the text; a message list must hold one {"type": "image"} /
        {"type": "audio"} item per input. max_soft_tokens: image token budget (70, 140, 280, 560, 1120)."""
        images, audio = _as_list(images), _as_list(audio)
        if not images and not audio:
            ids = self.prompt_ids(prompt_or_messages, system=system, enable_thinking=enable_thinking, tools=tools,
                                  use_chat_template=use_chat_template)
            return ids, {}
        if not use_chat_template:
            raise ValueError("image/audio prompts need the chat template")
        if isinstance(prompt_or_messages, str):
            content = ([{"type": "image"} for _ in images] + [{"type": "audio"} for _ in audio]
                       + [{"type": "text", "text": prompt_or_messages}])
            messages = self.messages_for("", system)
            messages[-1]["content"] = content
        else:
            messages = self.messages_for(prompt_or_messages, system)
        text = self.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking)
        media: dict = {}
        if images:
            features = self.image_processor()(images, max_soft_tokens)
            text = self._expand(text, "image", features.num_soft_tokens)
            media.update(pixel_values=features.pixel_values, image_position_ids=features.position_ids)
        if audio:
            from .audio import prepare_waveform

            features = self.audio_feature_extractor()([prepare_waveform(c) for c in audio])
            text = self._expand(text, "audio", list(features.num_soft_tokens))
            media.update(input_features=features.features, input_features_mask=features.mask)
        return self.tokenizer.encode(text, add_bos=True), media

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

    def _expand(self, text: str, kind: str, counts: list[int]) -> str:
        names = (kind, f"{kind}_start", f"{kind}_end")
        tokens = [self.tokenizer.token_text(n) for n in names]
        if any(t is None for t in tokens):
            raise ValueError(f"this tokenizer has no {kind} tokens (<|{kind}>, <|{kind}|>, <{kind}|>)")
        return expand_placeholders(text, tokens[0], tokens[1], tokens[2], counts, kind)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special)

    # -- model output ---------------------------------------------------------------------------------------
    parse_tool_calls = staticmethod(parse_tool_calls)
    split_thinking = staticmethod(split_thinking)

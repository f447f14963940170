"""Gemma 4 tokenizer: the checkpoint's `tokenizer.json` (HF `tokenizers`) plus the Gemma 4 control tokens.

Control tokens (turn markers, tool/thinking/channel markers, image/audio markers and soft tokens) are looked up
by their text in the checkpoint's vocabulary; `presets/special_tokens.json` records the published ids and is
used to check them. A control token the vocabulary lacks (tiny test vocabularies) is simply absent (id None).

The HF Gemma 4 tokenizer does not add `<bos>` itself: the chat template writes it. `encode(text, add_bos=True)`
prepends it only when the text does not already start with it, so it is never doubled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from ..errors import CheckpointError, read_json

_PRESETS = Path(__file__).resolve().parent.parent / "presets"


@lru_cache(maxsize=1)
def gemma4_special_tokens() -> dict[str, dict]:
    """{name: {"content": text, "id": published id}} for every Gemma 4 control token."""
    return json.loads((_PRESETS / "special_tokens.json").read_text())["tokens"]


def gemma4_stop_token_ids() -> list[int]:
    """Stop tokens of the -it checkpoints: <eos>, <turn|>, <|tool_response>."""
    return list(json.loads((_PRESETS / "special_tokens.json").read_text())["stop_token_ids"])


@dataclass
class Tokenizer:
    """Text <-> ids for one checkpoint. `special` maps control-token names (see presets) to ids present here."""

    backend: object  # tokenizers.Tokenizer
    special: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # tokenizer_config.json, if any

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, config: dict | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"cannot read tokenizer {path}: {e}") from e
        special = {}
        for name, tok in gemma4_special_tokens().items():
            content = tok["content"]
            if name in ("bos", "eos", "pad", "unk"):  # tokenizer_config.json may rename these
                named = (config or {}).get(f"{name}_token")
                content = named if isinstance(named, str) else content
            tid = backend.token_to_id(content)
            if tid is not None:
                special[name] = tid
        return cls(backend=backend, special=special, config=dict(config or {}))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        return cls.from_file(directory / "tokenizer.json", config)

    # -- vocabulary -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int | None:
        """Id of a control token by name ("bos", "turn_end", "image", ...), or None if the vocab lacks it."""
        return self.special.get(name)

    def token_text(self, name: str) -> str | None:
        tid = self.special.get(name)
        return None if tid is None else self.backend.id_to_token(tid)

    @property
    def bos_id(self) -> int | None:
        return self.special.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.special.get("eos")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The names chat templates read (bos_token, eos_token, pad_token, unk_token, mask_token)."""
        out = {}
        for name in ("bos", "eos", "unk", "pad", "mask"):
            text = self.token_text(name)
            if text is not None:
                out[f"{name}_token"] = text
        return out

    def default_stop_ids(self) -> list[int]:
        """<eos>, <turn|>, <|tool_response>, those present in this vocab."""
        names = ("eos", "turn_end", "tool_response_start")
        return [self.special[n] for n in names if n in self.special]

    # -- encode / decode ------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; control tokens written in the text become their single ids. `<bos>` is
        prepended when add_bos and the text does not start with it already."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def added_tokens(self) -> dict[str, bool]:
        """{text: special} of the vocabulary's added tokens (control tokens and the like)."""
        return {t.content: bool(t.special) for t in self.backend.get_added_tokens_decoder().values()}

    @cached_property
    def _plain_backend(self):
        """A copy of the backend that matches no added token: their text is encoded as ordinary text."""
        from tokenizers import Tokenizer as HFTokenizer

        spec = json.loads(self.backend.to_str())
        for token in spec.get("added_tokens") or []:
            token["special"] = True  # encode_special_tokens then skips every added token
        clone = HFTokenizer.from_str(json.dumps(spec))
        clone.encode_special_tokens = True
        return clone

    def encode_pieces(self, pieces: list[tuple[str, bool]], add_bos: bool = True) -> list[int]:
        """Token ids of a rendered prompt split into pieces [(text, as_plain_text)]: pieces with as_plain_text
        (control tokens a user typed) are encoded without matching added tokens, the others normally. Every
        piece after the first is encoded as if it followed a newline (then the newline's ids are removed), so a
        SentencePiece-style tokenizer treats it as mid-text, as transformers' sanitize_control_tokens does."""
        newline = self.backend.encode("\n", add_special_tokens=False).ids
        ids: list[int] = []
        for k, (text, plain) in enumerate(pieces):
            backend = self._plain_backend if plain else self.backend
            piece_ids = backend.encode(text if k == 0 else "\n" + text, add_special_tokens=False).ids
            if k:
                if piece_ids[:len(newline)] == newline:
                    piece_ids = piece_ids[len(newline):]
                else:
                    piece_ids = backend.encode(text, add_special_tokens=False).ids
            if plain and self.backend.token_to_id(text) in piece_ids:
                raise ValueError(f"cannot keep the typed control token {text!r} as text: this tokenizer makes the "
                                 "token itself from its characters")
            ids += piece_ids
        bos = self.bos_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    @cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens (`<0xE2>`)."""
        return frozenset(i for t, i in self.backend.get_vocab(with_added_tokens=False).items()
                         if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))

    def detokenizer(self, skip_special: bool = False) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special=skip_special)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that never end in half a UTF-8 character.

    Decoding token by token is wrong for SentencePiece vocabularies: byte-fallback tokens (`<0xE2>`) only make a
    character together, and some decoders treat a leading `▁` differently at the start of a sequence. So the
    tokens since the last safe point are decoded together, after one "anchor" token from before that point
    whose text is subtracted. Text is held back while the last token is a byte-fallback token (the decoder
    judges a whole run of byte tokens at once: a later invalid byte turns the run into U+FFFDs) or while it
    ends in U+FFFD (byte-level vocabularies). So the pieces always join to exactly `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._byte_ids = tokenizer.byte_token_ids
        self.reset()

    def reset(self) -> None:
        self._anchor: list[int] = []
        self._anchor_text = ""
        self._segment: list[int] = []
        self._emitted = 0  # characters of the current segment's text already returned
        self.text = ""  # everything returned so far

    def _segment_text(self) -> str:
        full = self.tokenizer.decode(self._anchor + self._segment, self.skip_special)
        return full[len(self._anchor_text):]

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly completed text (possibly empty)."""
        self._segment.append(int(token_id))
        if token_id in self._byte_ids:
            return ""  # inside a run of byte tokens: wait for its end
        text = self._segment_text()
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character's bytes
        piece = text[self._emitted:]
        self._emitted = len(text)
        self.text += piece
        if len(self._segment) >= 16:  # move the safe point forward, so each step decodes O(16) tokens
            last = self._segment[-1:]
            last_text = self.tokenizer.decode(last, self.skip_special)
            if "\ufffd" not in last_text:  # a whole token (never a byte token: those return above)
                self._anchor, self._anchor_text = last, last_text
                self._segment, self._emitted = [], 0
        return piece

    def finalize(self) -> str:
        """Flush what is held back (an incomplete character at the very end comes out as U+FFFD)."""
        text = self._segment_text()
        piece = text[self._emitted:]
        self._emitted = len(text)
        self.text += piece
        return piece

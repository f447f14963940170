"""Tiny tokenizers. A byte-fallback BPE in Gemma's SentencePiece style (space -> "▁", bytes as "<0xNN>") with
every Gemma 4 control token that fits at its published id; the rest are ASCII characters, a few merges and
"<unusedN>" fillers up to vocab_size. Also transformers' fast tokenizer over the same files (the reference)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from .text import VOCAB

PACKAGE = Path(__file__).resolve().parents[2] / "mlx_gemma4"

_MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"),
           ("▁", "a"), ("▁", "w"), ("o", "r"), ("e", "n"), ("l", "l"), ("▁", "s"), ("s", "t"), ("▁", "i"),
           ("▁", "h"), ("e", "l"), ("el", "l"), ("ell", "o"), ("▁h", "ello"), ("▁w", "or"), ("▁wor", "l"),
           ("▁worl", "d"), ("▁", "c"), ("▁", "b"), ("▁", "o"), ("▁", "f"), ("▁", "m"), ("a", "t"), ("▁", "p"),
           ("i", "t"), ("▁", "d"), ("▁", "1"), ("▁", "2"), ("▁", "n")]


_MM_TOKEN_TEXT = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
                  "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>",
                  "audio_token_id": "<|audio|>"}


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = VOCAB, *, with_template: bool = True,
                   multimodal_ids: dict | None = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json (+ chat_template.jinja: the package's built-in Gemma 4
    template) into out_dir. Control tokens whose published id is >= vocab_size are left out, unless
    multimodal_ids (like MM_TOKEN_IDS) places the image/audio ones at the tiny checkpoints' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    specials = json.loads((PACKAGE / "presets" / "special_tokens.json").read_text())["tokens"]
    fixed = {tok["id"]: tok["content"] for tok in specials.values() if tok["id"] < vocab_size}
    for key, tid in (multimodal_ids or {}).items():
        fixed[tid] = _MM_TOKEN_TEXT[key]
    fixed[107] = "\n"
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += ["".join(pair) for pair in _MERGES]
    vocab: dict[str, int] = {}
    free = (i for i in range(vocab_size) if i not in fixed)
    for piece in pieces:
        vocab[piece] = next(free)
    for i in range(vocab_size):
        if i in fixed:
            vocab[fixed[i]] = i
    for i in free:
        vocab[f"<unused{i}>"] = i
    assert len(vocab) == vocab_size, "vocab_size too small for bytes + characters + control tokens"

    tok = Tokenizer(BPE(vocab=vocab, merges=list(_MERGES), unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False)
                            for i, text in sorted(fixed.items()) if i != 107])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "mask_token": "<mask>", "add_bos_token": False, "padding_side": "left",
              "tokenizer_class": "GemmaTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if with_template:
        template = PACKAGE / "templates" / "gemma4.jinja"
        (out / "chat_template.jinja").write_text(template.read_text())
    return out


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(directory: str):
    return _make_hf_tokenizer(Path(directory))


def load_hf_tokenizer(directory):
    """transformers' fast tokenizer over the same files (the reference for chat-template rendering); cached."""
    return _hf_tokenizer(str(directory))


def _make_hf_tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    template = directory / "chat_template.jinja"
    return PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>",
        chat_template=template.read_text() if template.is_file() else None)


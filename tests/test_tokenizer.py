"""Tokenizer: Gemma 4 control tokens at their published ids, <bos> once, streaming detokenization."""

from __future__ import annotations

import json

import pytest

from mlx_gemma4.processing.tokenizer import Tokenizer, gemma4_special_tokens

FULL_VOCAB = 262144


@pytest.fixture(scope="module")
def full(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir(FULL_VOCAB))


@pytest.fixture(scope="module")
def tiny(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir(512))


def test_every_control_token_found_at_its_published_id(full):
    for name, tok in gemma4_special_tokens().items():
        assert full.token_id(name) == tok["id"], name
        assert full.encode(tok["content"], add_bos=False) == [tok["id"]], name
    assert full.default_stop_ids() == [1, 106, 50]


def test_tiny_vocab_keeps_low_ids_and_drops_missing(tiny):
    assert tiny.vocab_size == 512
    assert tiny.token_id("turn_end") == 106 and tiny.token_id("think") == 98
    assert tiny.token_id("image") is None  # 258880 does not fit in 512 ids


def test_control_tokens_in_text_become_single_ids(full):
    ids = full.encode("<|turn>user\nhello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>", add_bos=False)
    assert ids[0] == 105 and ids.count(105) == 2 and 106 in ids and 100 in ids and 101 in ids
    assert 107 in ids  # "\n"
    img = full.encode("<|image><|image|><|image|><image|><|audio><|audio|><audio|><|video|>", add_bos=False)
    assert img == [255999, 258880, 258880, 258882, 256000, 258881, 258883, 258884]


def test_bos_added_exactly_once(full):
    plain = full.encode("hello world")
    assert plain[0] == 2 and plain.count(2) == 1
    templated = full.encode("<bos><|turn>user\nhi<turn|>")
    assert templated[0] == 2 and templated.count(2) == 1
    assert full.encode("hello", add_bos=False)[0] != 2


def test_matches_transformers_encoding(tokenizer_dir, full):
    import checkpoints

    hf = checkpoints.load_hf_tokenizer(tokenizer_dir(FULL_VOCAB))
    text = "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nhello world 世界 🙂 café<turn|>\n"
    assert full.encode(text) == hf(text, add_special_tokens=False).input_ids
    assert full.decode(full.encode(text)) == hf.decode(hf(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("text", [
    "hello world, the cat sat",
    "世界你好 — CJK split into byte-fallback tokens",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧 then text",
    "  leading spaces and\nnew lines\n\n  indented",
    "long " * 30 + "世界",  # crosses the detokenizer's 16-token safe point several times
])
def test_streaming_detokenizer_never_splits_characters(full, text):
    ids = full.encode(text, add_bos=False)
    assert any(full.backend.id_to_token(i).startswith("<0x") for i in ids) or text.isascii()
    detok = full.detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == full.decode(ids) == text
    assert detok.text == text


def test_streaming_detokenizer_holds_partial_character(full):
    ids = full.encode("世", add_bos=False)
    assert len(ids) == 3  # three byte-fallback tokens
    detok = full.detokenizer()
    assert [detok.add(i) for i in ids] == ["", "", ""]  # a byte run is judged when it ends
    assert detok.add(full.encode("a", add_bos=False)[0]) == "世a"


def test_streaming_detokenizer_invalid_bytes_match_full_decode(full):
    b = {x: full.backend.token_to_id(f"<0x{x:02X}>") for x in (0xE4, 0x7B, 0x80, 0x41)}
    ids = [b[0xE4], b[0x7B], b[0x80], full.encode("hi", add_bos=False)[0], b[0x41], b[0x80]]
    detok = full.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.finalize()]
    assert "".join(pieces) == full.decode(ids)  # "{" inside an invalid run decodes as U+FFFD, not "{"


def test_streaming_detokenizer_flushes_truncated_bytes(full):
    ids = full.encode("a世", add_bos=False)[:-1]  # cut inside the character
    detok = full.detokenizer()
    assert "".join(detok.add(i) for i in ids) == "a"
    tail = detok.finalize()  # the decoder writes one U+FFFD per byte of the unfinished character
    assert tail and set(tail) == {"\ufffd"}


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.from_pretrained(tmp_path)

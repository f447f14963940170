"""The tokenizer (tokenizer.ggml.* -> tokenizers.Tokenizer) and text processor of a GGUF file."""

from __future__ import annotations

import numpy as np
from gguf.constants import TokenType

from ..errors import CheckpointError
from .reader import GGUFFile


def _spm_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece-BPE tokenizer (llama-vocab.cpp, llm_tokenizer_spm).

    llama.cpp repeatedly joins the adjacent pair of symbols whose concatenation is the vocabulary piece with the
    highest score. A BPE model does the same when it holds one merge per way of splitting each piece into two
    pieces, ranked by the joined piece's score (highest first)."""
    normal_ids = np.flatnonzero(types == TokenType.NORMAL)
    order = normal_ids[np.lexsort((normal_ids, -scores[normal_ids]))]  # by score, highest first; then by id
    pieces = {tokens[i] for i in normal_ids}
    merges: list[tuple[str, str]] = []
    for i in order.tolist():
        piece = tokens[i]
        for k in range(1, len(piece)):
            left = piece[:k]
            if left in pieces and piece[k:] in pieces:
                merges.append((left, piece[k:]))
    return merges


def _bpe_merges(raw_merges: list[str], path) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges entries ("left right", rank order) as pairs."""
    pairs = []
    for entry in raw_merges:
        left, sep, right = entry.partition(" ") if isinstance(entry, str) else ("", "", "")
        if not sep:
            raise CheckpointError(f"{path}: malformed tokenizer.ggml.merges entry {entry!r:.60} (expected "
                                  "'left right')")
        pairs.append((left, right))
    return pairs


def gguf_tokenizer(gf: GGUFFile):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for the file's `tokenizer.ggml.*` metadata.

    Both Gemma tokenizers in llama.cpp escape spaces as "▁", run BPE over whole text fragments (no word split;
    "gemma4" additionally splits newline runs from the rest), fall back to <0xXX> byte tokens, and cut out control
    tokens (parse_special) and user-defined tokens before BPE. "llama" (Gemma 3, SentencePiece) ranks merges by
    token score; "gemma4" stores ranked merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    md = gf.metadata
    if "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"{gf.path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    tokenizer_model = md.get("tokenizer.ggml.model", "")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = np.asarray(md.get("tokenizer.ggml.token_type", np.full(len(tokens), TokenType.NORMAL)))
    if tokenizer_model == "llama":
        scores = np.asarray(md.get("tokenizer.ggml.scores", -np.arange(len(tokens), dtype=np.float32)))
        merges = _spm_merges(tokens, scores, types)
        pre_tokenizer = None
    elif tokenizer_model == "gemma4":
        merges = _bpe_merges(md.get("tokenizer.ggml.merges", []), gf.path)
        pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
    else:
        raise ValueError(f"{gf.path}: unsupported tokenizer.ggml.model {tokenizer_model!r} (expected 'llama' "
                         "for Gemma 3 or 'gemma4')")

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # duplicate strings: the first id wins, as in llama.cpp's token_to_id
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    except Exception as e:  # tokenizers raises a bare Exception (e.g. a merge of tokens not in the vocabulary)
        raise CheckpointError(f"{gf.path}: the GGUF tokenizer cannot be built: {e}") from e
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])

    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero((types == TokenType.CONTROL) | (types == TokenType.UNKNOWN))]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == TokenType.USER_DEFINED)]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    bos_id = md.get("tokenizer.ggml.bos_token_id")
    if md.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))])
    return tok


# A base model has no chat format: without a tokenizer.chat_template the prompt is continued as plain text.
RAW_TEXT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def gguf_processor(gf: GGUFFile, tokenizer):
    """The text processor `load()` returns (mlx_gemma4.processing), around the GGUF's tokenizer, chat template
    and stop tokens (<eos>, plus <end_of_turn> for Gemma 3); None when the processing package is absent."""
    try:
        from ..processing.processor import Processor
        from ..processing.tokenizer import Tokenizer
    except ImportError:
        return None
    names = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
             "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}
    special = {name: int(gf.metadata[key]) for name, key in names.items() if key in gf.metadata}
    stop_ids = [special["eos"]] if "eos" in special else []
    for end_of_turn in ("<end_of_turn>", "<turn|>"):
        tid = tokenizer.token_to_id(end_of_turn)
        if tid is not None:
            special.setdefault("turn_end", tid)
            stop_ids.append(tid)
    template = gf.metadata.get("tokenizer.chat_template") or RAW_TEXT_TEMPLATE
    return Processor(tokenizer=Tokenizer(backend=tokenizer, special=special), chat_template=template,
                     stop_token_ids=stop_ids)

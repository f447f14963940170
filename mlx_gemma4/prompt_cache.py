"""Prompt caches: the KV caches of a token prefix, kept across calls or saved to a file to skip its prefill.

A `PromptCache` pairs the per-layer caches (`model.make_cache()`) with the token ids they hold, so a new
prompt that starts with those ids only prefills the rest. `save_prompt_cache` writes one safetensors file:
every layer's keys/values in temporal order plus metadata (cache kinds, offsets, sliding windows, the token
ids, the model's layer layout, fingerprints of the model and tokenizer); `load_prompt_cache` checks all of it
against the loaded model (a cache made with other weights, a truncated token list or NaN keys is a
PromptCacheError, never a silently different answer) and rebuilds the caches, including rotating
sliding-window caches whose ring buffer has wrapped (their last `window` entries are stored, oldest first).

    python -m mlx_gemma4.prompt_cache --model PATH --system "long instructions" --out sys.safetensors
    python -m mlx_gemma4.generate --model PATH --prompt-cache sys.safetensors --system "long instructions" \
        --prompt "question"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import RotatingKVCache
from .errors import PromptCacheError

FORMAT = "mlx-gemma4-prompt-cache/2"  # /2: model and tokenizer fingerprints


@dataclass
class PromptCache:
    caches: list
    tokens: list[int] = field(default_factory=list)  # ids whose keys/values the caches hold, in order

    @classmethod
    def fresh(cls, model) -> "PromptCache":
        return cls(model.make_cache(), [])

    @property
    def offset(self) -> int:
        return next((c.offset for c in self.caches if c is not None), 0)

    def eval(self) -> None:
        mx.eval([a for c in self.caches if c is not None and c.keys is not None for a in (c.keys, c.values)])


def _layout(model) -> list[str]:
    """Per layer: 'shared' (no cache), 'full', or 'sliding:<window>'."""
    caches = model.make_cache()  # KV-shared layers (the last ones) have none
    kinds = [f"sliding:{c.window}" if isinstance(c, RotatingKVCache) else "full" for c in caches]
    return kinds + ["shared"] * (model.text_config.num_hidden_layers - len(caches))


# -- fingerprints -------------------------------------------------------------------------------------------------
FINGERPRINT_TENSORS = 4  # weight tensors hashed (spread over the sorted parameter names)
FINGERPRINT_ELEMENTS = 1 << 16  # leading elements hashed of each


def model_fingerprint(model) -> str:
    """What identifies a model's numbers: its config (canonical JSON) and the leading bytes of a few of its
    weight tensors (float weights as float32, so one checkpoint loaded in float32 or bfloat16 from bf16 files
    hashes the same; quantized weights as stored)."""
    from mlx.utils import tree_flatten

    digest = hashlib.sha256(json.dumps(model.config.raw, sort_keys=True, default=str).encode())
    params = dict(tree_flatten(model.parameters()))
    names = sorted(params)
    picks = sorted({names[round(i * (len(names) - 1) / max(1, FINGERPRINT_TENSORS - 1))]
                    for i in range(FINGERPRINT_TENSORS)}) if names else []
    for name in picks:
        w = params[name].reshape(-1)[:FINGERPRINT_ELEMENTS]
        if mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(mx.float32)
        digest.update(name.encode() + str(tuple(params[name].shape)).encode())
        digest.update(np.array(w).tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(processor) -> str:
    """The tokenizer's full definition (tokenizer.json as the tokenizers library writes it), hashed."""
    return hashlib.sha256(processor.tokenizer.backend.to_str().encode()).hexdigest()


def save_prompt_cache(path: str | Path, prompt_cache: PromptCache, model, metadata: dict | None = None, *,
                      processor=None) -> None:
    """Write the caches and their token ids to `path` (a .safetensors file), with the fingerprints of the model
    and (when given) the processor's tokenizer that load_prompt_cache checks."""
    arrays: dict[str, mx.array] = {}
    for i, c in enumerate(prompt_cache.caches):
        if c is None or c.offset == 0:
            continue
        keys, values = c.state[:2]  # oldest first
        if isinstance(c, RotatingKVCache):  # what decoding (and a drafter) reads: the last window + 1
            keys, values = keys[..., -c.history:, :], values[..., -c.history:, :]
        arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"] = keys, values
    if prompt_cache.offset != len(prompt_cache.tokens):
        raise ValueError(f"prompt cache holds {prompt_cache.offset} positions but {len(prompt_cache.tokens)} token ids")
    meta = {
        "format": FORMAT,
        "layout": json.dumps(_layout(model)),
        "offsets": json.dumps([None if c is None else c.offset for c in prompt_cache.caches]),
        "tokens": json.dumps(prompt_cache.tokens),
        "user": json.dumps(metadata or {}),
        "model_fingerprint": model_fingerprint(model),
    }
    if processor is not None:
        meta["tokenizer_fingerprint"] = tokenizer_fingerprint(processor)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"prompt cache files are safetensors; name it *.safetensors (got {path.name})")
    mx.save_safetensors(str(path), arrays, metadata=meta)


def _field(meta: dict, key: str, kind: type, path: Path):
    """A JSON metadata field of the expected type, else PromptCacheError naming it."""
    if key not in meta:
        raise PromptCacheError(f"prompt cache {path} has no {key!r} entry in its metadata")
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, TypeError, RecursionError) as e:
        raise PromptCacheError(f"prompt cache {path}: metadata {key!r} is not valid JSON") from e
    if not isinstance(value, kind):
        raise PromptCacheError(f"prompt cache {path}: metadata {key!r} must be a {kind.__name__}")
    return value


def load_prompt_cache(path: str | Path, model, processor=None) -> tuple[PromptCache, dict]:
    """(PromptCache, user metadata) from a file written by save_prompt_cache with this model (and, when given,
    this processor's tokenizer). Everything is checked before it is used: the format, the model's fingerprint
    (config + weights) and layout, the tokenizer's fingerprint, that every layer's cache holds exactly the
    positions of the stored token ids (windows: the last `window`), with the model's head count and size, and
    that the keys/values are finite. A mismatch is a PromptCacheError: remake the cache for this model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt cache file not found: {path}")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise PromptCacheError(f"cannot read prompt cache {path}: {e}") from e
    if meta.get("format") != FORMAT:
        older = str(meta.get("format", "")).startswith("mlx-gemma4-prompt-cache/")
        raise PromptCacheError(f"{path} is " + ("an older mlx-gemma4 prompt cache without model fingerprints; "
                                                 "make it again with mlx-gemma4-prompt-cache" if older else
                                                 f"not a mlx-gemma4 prompt cache (format {meta.get('format')!r})"))
    layout = _field(meta, "layout", list, path)
    if layout != _layout(model):
        raise PromptCacheError(f"prompt cache {path} was made for a different model layout ({len(layout)} layers: "
                               f"{layout[:6]}...) than the loaded model's")
    if meta.get("model_fingerprint") != model_fingerprint(model):
        raise PromptCacheError(f"prompt cache {path} was made with a different model (its config or weights differ "
                               "from the loaded model's); make it again with this model")
    if processor is not None and "tokenizer_fingerprint" in meta and \
            meta["tokenizer_fingerprint"] != tokenizer_fingerprint(processor):
        raise PromptCacheError(f"prompt cache {path} was made with a different tokenizer; make it again")
    tokens = _field(meta, "tokens", list, path)
    vocab = model.config.text.vocab_size
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
        raise PromptCacheError(f"prompt cache {path}: its token ids must be integers in [0, {vocab})")
    offsets = _field(meta, "offsets", list, path)
    caches = model.make_cache()
    if len(offsets) != len(caches):
        raise PromptCacheError(f"prompt cache {path} has offsets for {len(offsets)} layers; the model has "
                               f"{len(caches)}")
    text = model.config.text
    for i, (c, offset) in enumerate(zip(caches, offsets)):
        if c is None:
            continue
        if offset != len(tokens) or isinstance(offset, bool):
            raise PromptCacheError(f"prompt cache {path}: layer {i} holds {offset!r} positions but the file stores "
                                   f"{len(tokens)} token ids")
        if not offset:
            continue
        keys, values = arrays.get(f"layers.{i}.keys"), arrays.get(f"layers.{i}.values")
        held = min(offset, c.history) if isinstance(c, RotatingKVCache) else offset
        heads, dims = text.layer_kv_heads[i], text.layer_head_dims[i]
        for name, a in (("keys", keys), ("values", values)):
            if a is None:
                raise PromptCacheError(f"prompt cache {path}: layer {i} has no {name}")
            if a.ndim != 4 or a.shape[0] != 1 or a.shape[1] != heads or a.shape[2] != held:
                raise PromptCacheError(f"prompt cache {path}: layer {i} {name} have shape {tuple(a.shape)}; this "
                                       f"model's are (1, {heads}, {held}, head dim)")
            if not mx.issubdtype(a.dtype, mx.floating):
                raise PromptCacheError(f"prompt cache {path}: layer {i} {name} are {a.dtype}, not floating point")
            if not mx.all(mx.isfinite(a)).item():
                raise PromptCacheError(f"prompt cache {path}: layer {i} {name} hold NaN or infinite values")
        if keys.shape[3] != dims:
            raise PromptCacheError(f"prompt cache {path}: layer {i} keys have head size {keys.shape[3]}; the "
                                   f"model's is {dims}")
        keys, values = keys.astype(model.dtype), values.astype(model.dtype)
        if isinstance(c, RotatingKVCache):  # its last entries, oldest first, ending at position `offset`
            c.state = (keys, values, offset, 0, c.window, held)
        else:
            c.state = (keys, values, offset)
    pc = PromptCache(caches, tokens)
    pc.eval()
    try:
        user = json.loads(meta.get("user", "{}"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise PromptCacheError(f"prompt cache {path}: metadata 'user' is not valid JSON") from e
    return pc, user


def prefix_ids(processor, prefix: str, *, system: str | None = None, use_chat_template: bool = True) -> list[int]:
    """Token ids every prompt that starts with `prefix` (as the user message, after `system`) starts with.

    With the chat template: the conversation rendered up to the end of `prefix` inside the user turn. The last
    token is dropped, since it may merge with the text that follows it."""
    if use_chat_template:
        marker = "\x00PREFIX-END\x00"
        text = processor.render_prompt(processor.messages_for(prefix + marker, system))
        ids = processor.encode_prompt_text(text[: text.index(marker)], add_bos=True)
    else:
        ids = processor.encode(prefix, add_bos=True)
    return ids[:-1]


if __name__ == "__main__":  # the command line lives in cli.py
    from mlx_gemma4.cli import prompt_cache_main

    raise SystemExit(prompt_cache_main())

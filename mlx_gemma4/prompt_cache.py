"""Prompt caches: the KV caches of a token prefix, kept across calls or saved to a file to skip its prefill.

A `PromptCache` pairs the per-layer caches (`model.make_cache()`) with the token ids they hold, so a new
prompt that starts with those ids only prefills the rest. `save_prompt_cache` writes one safetensors file:
every layer's keys/values in temporal order plus metadata (cache kinds, offsets, sliding windows, the token
ids, the model's layer layout); `load_prompt_cache` rebuilds the caches, including rotating sliding-window
caches whose ring buffer has wrapped (their last `window` entries are stored, oldest first).

    python -m mlx_gemma4.prompt_cache --model PATH --system "long instructions" --out sys.safetensors
    python -m mlx_gemma4.generate --model PATH --prompt-cache sys.safetensors --system "long instructions" \
        --prompt "question"
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .cache import RotatingKVCache

FORMAT = "mlx-gemma4-prompt-cache/1"


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
    out = []
    for c in model.make_cache():
        if c is None:
            out.append("shared")
        elif isinstance(c, RotatingKVCache):
            out.append(f"sliding:{c.window}")
        else:
            out.append("full")
    return out


def save_prompt_cache(path: str | Path, prompt_cache: PromptCache, model, metadata: dict | None = None) -> None:
    """Write the caches and their token ids to `path` (a .safetensors file)."""
    arrays: dict[str, mx.array] = {}
    for i, c in enumerate(prompt_cache.caches):
        if c is None or c.offset == 0:
            continue
        keys, values = c.state
        arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"] = keys, values
    if prompt_cache.offset != len(prompt_cache.tokens):
        raise ValueError(f"prompt cache holds {prompt_cache.offset} positions but {len(prompt_cache.tokens)} token ids")
    meta = {
        "format": FORMAT,
        "layout": json.dumps(_layout(model)),
        "offsets": json.dumps([None if c is None else c.offset for c in prompt_cache.caches]),
        "tokens": json.dumps(prompt_cache.tokens),
        "user": json.dumps(metadata or {}),
    }
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"prompt cache files are safetensors; name it *.safetensors (got {path.name})")
    mx.save_safetensors(str(path), arrays, metadata=meta)


def load_prompt_cache(path: str | Path, model) -> tuple[PromptCache, dict]:
    """(PromptCache, user metadata) from a file written by save_prompt_cache for the same model layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt cache file not found: {path}")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"cannot read prompt cache {path}: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mlx-gemma4 prompt cache (format {meta.get('format')!r})")
    layout = json.loads(meta["layout"])
    if layout != _layout(model):
        raise ValueError(f"prompt cache {path} was made for a different model layout ({len(layout)} layers: "
                         f"{layout[:6]}...) than the loaded model's")
    caches = model.make_cache()
    for i, (c, offset) in enumerate(zip(caches, json.loads(meta["offsets"]))):
        if c is None or not offset:
            continue
        keys, values = arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"]
        dtype = model.dtype
        keys, values = keys.astype(dtype), values.astype(dtype)
        if isinstance(c, RotatingKVCache):
            c.offset = offset  # the setter places temporally ordered entries by absolute position
            c.state = (keys, values)
        else:
            c.state = (keys, values)
            if c.offset != offset:
                raise ValueError(f"prompt cache {path}: layer {i} holds {c.offset} entries, metadata says {offset}")
    pc = PromptCache(caches, json.loads(meta["tokens"]))
    pc.eval()
    return pc, json.loads(meta.get("user", "{}"))


def prefix_ids(processor, prefix: str, *, system: str | None = None, use_chat_template: bool = True) -> list[int]:
    """Token ids every prompt that starts with `prefix` (as the user message, after `system`) starts with.

    With the chat template: the conversation rendered up to the end of `prefix` inside the user turn. The last
    token is dropped, since it may merge with the text that follows it."""
    if use_chat_template:
        marker = "\x00PREFIX-END\x00"
        text = processor.apply_chat_template(processor.messages_for(prefix + marker, system))
        ids = processor.encode(text[: text.index(marker)], add_bos=True)
    else:
        ids = processor.encode(prefix, add_bos=True)
    return ids[:-1]


if __name__ == "__main__":  # the command line lives in cli.py
    from mlx_gemma4.cli import prompt_cache_main

    raise SystemExit(prompt_cache_main())

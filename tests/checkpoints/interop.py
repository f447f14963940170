"""Checkpoints converted by mlx-lm and mlx-vlm themselves (their `convert`, run in this process) from tiny
transformers-made Gemma 4 checkpoints, and those libraries' own models on them (tests/test_interop.py).

The converters read Google's published config spelling (`global_head_dim`, not transformers 5.2x's
`per_layer_config`) and mlx-lm's Gemma 4 takes the vocabulary size from the top-level `vocab_size` (262144 when
absent), so the sources get both, plus the tiny test tokenizer (with the image/audio tokens) the converters copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .text import MM_TOKEN_IDS, _to_published_spelling, make_text_checkpoint
from .tokenizer import make_tokenizer
from .vision import make_multimodal_checkpoint


def converter_source(out: Path, variant: str, towers: bool, wrapper: str = "conditional") -> Path:
    """A tiny Gemma 4 checkpoint in the form mlx_lm.convert / mlx_vlm.convert read: Gemma4ForConditionalGeneration
    (with its vision tower, and for e2b an audio tower whose 64-wide output mlx-vlm quantizes, when `towers`), or
    Gemma4ForCausalLM (wrapper="causal_lm", text only)."""
    if towers:
        make_multimodal_checkpoint(out, variant, audio=variant == "e2b", audio_extra=dict(output_proj_dims=64))
    else:
        make_text_checkpoint(out, variant, wrapper=wrapper)
    _to_published_spelling(out / "config.json")
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = config.get("text_config", config)["vocab_size"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    make_tokenizer(out, multimodal_ids=MM_TOKEN_IDS)
    return out


def convert_with(library: str, src: Path, out: Path, *, bits: int | None = None, group_size: int | None = None,
                 mode: str = "affine", dtype: str | None = None, recipe: str | None = None) -> Path:
    """Run `library`'s own convert ("mlx-lm" or "mlx-vlm") on src. `recipe` is one of their mixed recipes."""
    quantize = bits is not None or mode != "affine" or recipe is not None
    kwargs = dict(quantize=quantize, q_group_size=group_size, q_bits=bits, q_mode=mode, dtype=dtype,
                  quant_predicate=recipe)
    if library == "mlx-lm":
        from mlx_lm.convert import convert

        convert(str(src), str(out), **kwargs)
    elif library == "mlx-vlm":
        from mlx_vlm.convert import convert

        convert(str(src), str(out), **kwargs)
    else:
        raise ValueError(library)
    return out


class _Float32RowsEmbedding(nn.QuantizedEmbedding):
    def __call__(self, x):
        return super().__call__(x).astype(mx.float32)


class PeerModel:
    """The converting library's own model on a checkpoint, computing in float32: `logits(ids, cache)` and
    `make_cache()` (their caches)."""

    def __init__(self, library: str, path: Path):
        from mlx.utils import tree_map

        if library == "mlx-lm":
            from mlx_lm.utils import load_model

            self.model, _ = load_model(Path(path))
            self._call = lambda ids, cache: self.model(ids, cache=cache)
        else:
            from mlx_vlm.utils import load_model

            self.model = load_model(Path(path))
            self._call = lambda ids, cache: self.model(ids, cache=cache).logits
        # float32 compute: bf16 conversions are upcast (quantized weights keep their packed values), and quantized
        # embeddings return float32 rows (MLX dequantizes the fp modes to bfloat16 by default)
        self.model.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype in (mx.bfloat16, mx.float16) else x,
                                   self.model.parameters()))
        for _, module in self.model.named_modules():
            if type(module) is nn.QuantizedEmbedding:
                module.__class__ = _Float32RowsEmbedding

    def make_cache(self):
        return self.model.make_cache()

    def logits(self, ids, cache=None):
        return self._call(ids, cache)


def into_hub_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str = "0" * 40) -> Path:
    """Put `checkpoint`'s files into a huggingface_hub cache at `cache` as a download of `repo_id` leaves them:
    content-addressed blobs, a snapshot of symlinks to them, refs/main naming the snapshot. Returns the snapshot."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot

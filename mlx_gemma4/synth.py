"""Synthetic Gemma 4 checkpoints at the published dimensions, for benchmarks and memory checks.

    python -m mlx_gemma4.synth --variant e2b|e4b|26b-a4b|31b --out DIR [--layers N] [--vocab V]
        [--bits 4|8] [--format mlx|hf] [--shard-gb 2] [--towers] [--seed S]

Weights are random (a fixed pool of N(0, 0.02) values laid out at a random offset per tensor; norm weights and
scalars near 1), so outputs are meaningless but every shape, dtype and byte count is the real one. Tensors are
generated, quantized and written one slice at a time straight into preallocated safetensors shards: peak
memory is a few tens of MB whatever the model size, so the full 26B A4B fits on a small machine.

--format mlx (default) writes our names (`language_model.*`); with --bits each matrix becomes
`<name>.weight` (packed uint32), `.scales`, `.biases` (bf16, group size 64, MLX's affine quantization) and
config.json records {"quantization": {"group_size": 64, "bits": B}}. --format hf writes Hugging Face's
Gemma4ForConditionalGeneration layout (`model.language_model.*`, bf16) for peers such as mlx-lm.

--layers N keeps the first N entries of the layer pattern (the last one always full attention, as
transformers requires) and scales the KV-shared tail proportionally, keeping at least one cache-owning
layer of each attention kind before it. Vision/audio towers are left out (and nulled in config.json)
unless --towers is given; their tensor list then comes from transformers (a test dependency), or, for the
12B (`--variant 12b`, gemma4_unified), from its encoder-free embedders' shapes.

`--variant e2b-assistant` (e4b-, 26b-a4b-, 31b-, 12b-assistant) writes the MTP drafter of a variant (its
names are the same in both formats; the centroid head's token_ordering is a random permutation, int64), for
`load_drafter` and `benchmarks/speculative.py`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from .config import DRAFTER_TYPES, FULL, ModelConfig, last_cache_owner
from .loading import build_model
from .memory import GROUP_SIZE, is_quantizable, model_config_of, quantized_specs, text_config_of, text_param_specs
from .model import is_tower_param
from .safetensors_io import ShardedWriter

POOL_SIZE = (1 << 22) + 3  # random values reused at random offsets (not a multiple of any row length)
CHUNK_ELEMENTS = 1 << 24  # elements generated/quantized at once (32 MB of bf16)


# --------------------------------------------------------------------------------------------------------------
# Config shrinking


def shrink_config(config: dict, layers: int | None = None, vocab: int | None = None) -> dict:
    """A copy of a published config with fewer layers and/or a smaller vocabulary."""
    config = copy.deepcopy(config)
    text = text_config_of(config)
    n_orig = text["num_hidden_layers"]
    if layers is not None and config.get("model_type") in DRAFTER_TYPES:
        raise ValueError("--layers does not apply to drafters (every layer reads the target's KV)")
    if layers is not None:
        if not 1 <= layers <= n_orig:
            raise ValueError(f"--layers must be between 1 and {n_orig} for this variant, got {layers}")
        parsed = model_config_of(config).text
        types = parsed.layer_types[:layers]
        types[-1] = FULL
        shared = round(layers * parsed.num_kv_shared_layers / n_orig)
        # every KV-shared layer needs a cache-owning layer of its kind before the shared tail
        while shared > 0 and None in (last_cache_owner(types, shared, kind) for kind in types[layers - shared:]):
            shared -= 1
        text.update(num_hidden_layers=layers, layer_types=types, num_kv_shared_layers=shared)
    if vocab is not None:
        if vocab < 8:
            raise ValueError(f"--vocab must be at least 8, got {vocab}")
        centroids = config.get("num_centroids") if config.get("use_ordered_embeddings") else None
        if centroids and vocab % centroids:
            raise ValueError(f"--vocab must be a multiple of the drafter's {centroids} centroids, got {vocab}")
        text["vocab_size"] = vocab
        if "vocab_size_per_layer_input" in text:
            text["vocab_size_per_layer_input"] = vocab
    return config


# --------------------------------------------------------------------------------------------------------------
# Values


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _is_near_one(name: str) -> bool:
    """Norm weights, layer scalars and router scales: multiplicative, so they sit near 1."""
    leaf = name.rsplit(".", 1)[-1]
    return "norm" in name or leaf in ("layer_scalar", "scale", "per_expert_scale")


class ValueSource:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = _bf16_bits(0.02 * self.rng.standard_normal(POOL_SIZE, dtype=np.float32))

    def matrix_bits(self, n: int) -> np.ndarray:
        """n bf16 bit patterns of N(0, 0.02) values: the pool tiled from a random offset."""
        out = np.empty(n, dtype=np.uint16)
        pos, src = 0, int(self.rng.integers(POOL_SIZE))
        while pos < n:
            take = min(n - pos, POOL_SIZE - src)
            out[pos : pos + take] = self.pool[src : src + take]
            pos, src = pos + take, 0
        return out

    def near_one_bits(self, n: int) -> np.ndarray:
        return _bf16_bits(1.0 + 0.1 * self.rng.standard_normal(n, dtype=np.float32))

    def float_bits(self, name: str, n: int) -> np.ndarray:
        if _is_near_one(name):
            return self.near_one_bits(n)
        if name.endswith(("input_min", "output_min")):  # clipped linears: effectively unclipped
            return _bf16_bits(np.full(n, -1e4, dtype=np.float32))
        if name.endswith(("input_max", "output_max")):
            return _bf16_bits(np.full(n, 1e4, dtype=np.float32))
        return self.matrix_bits(n)


def _row_slices(shape: tuple[int, ...]):
    """Split a tensor along its first axes into slices of at most CHUNK_ELEMENTS (whole rows)."""
    row = shape[-1]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    if len(shape) == 1:
        yield 1, shape[0]
        return
    per = max(1, CHUNK_ELEMENTS // row)
    for start in range(0, rows, per):
        yield min(per, rows - start), row


# --------------------------------------------------------------------------------------------------------------
# Tensor lists


def tower_param_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the vision/audio towers and their projectors, read off transformers' model on the meta
    device (nothing allocated). Needs transformers (the `test` extra); the 12B's embedders need nothing."""
    if config.get("model_type") == "gemma4_unified":
        return unified_embedder_specs(config)
    try:
        import torch
        from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("--towers needs transformers and torch (pip install 'mlx-gemma4[test]')") from e
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(Gemma4Config(**config))
    specs = []
    for key, tensor in model.state_dict().items():
        name = key.removeprefix("model.")
        if is_tower_param(name):
            specs.append((name, tuple(tensor.shape)))
    return specs


def unified_embedder_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the 12B's image and audio front ends, read off our module tree (mlx_gemma4.unified; the
    names are its checkpoint's), built lazily."""
    model = build_model(ModelConfig.from_dict(config))
    return [(name, tuple(w.shape)) for name, w in tree_flatten(model.parameters()) if is_tower_param(name)]


def drafter_param_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of an MTP drafter, read off mlx_gemma4.drafter's module tree (the same names as its Hugging
    Face checkpoint), built lazily."""
    from .drafter import Drafter, DrafterConfig

    model = Drafter(DrafterConfig.from_dict(config))
    return [(name, tuple(w.shape)) for name, w in tree_flatten(model.parameters())]


def checkpoint_entries(specs, bits: int | None, group_size: int = GROUP_SIZE):
    """Safetensors entries (key, shape, dtype) for source tensors (name, shape), quantized where applicable."""
    entries, plan = [], []
    for name, shape in specs:
        if bits and is_quantizable(name, shape, group_size):
            q = quantized_specs(name, shape, bits, group_size)
            entries += q
            plan.append((name, shape, [k for k, _, _ in q]))
        else:
            entries.append((name, shape, "I64" if name.endswith("token_ordering") else "BF16"))
            plan.append((name, shape, None))
    return entries, plan


def write_checkpoint(config: dict, out: str | Path, *, bits: int | None = None, fmt: str = "mlx",
                     towers: bool = False, seed: int = 0, shard_bytes: int = 2 * 1024**3,
                     group_size: int = GROUP_SIZE) -> Path:
    """Write a random checkpoint for `config` (a full Gemma4Config dict) into `out`."""
    if fmt not in ("mlx", "hf"):
        raise ValueError(f"format must be 'mlx' or 'hf', got {fmt!r}")
    if bits is not None and bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits is not None and fmt == "hf":
        raise ValueError("--format hf writes bf16 weights as published; quantize with --format mlx")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    drafter = config.get("model_type") in DRAFTER_TYPES
    if drafter:
        specs = drafter_param_specs(config)
    else:
        specs = text_param_specs(config)
        if towers:
            specs += tower_param_specs(config)
        else:
            config["vision_config"] = None
            config["audio_config"] = None
    entries, plan = checkpoint_entries(specs, bits, group_size)
    prefix = "model." if fmt == "hf" and not drafter else ""
    entries = [(prefix + key, shape, dtype) for key, shape, dtype in entries]
    writer = ShardedWriter(out, entries, shard_bytes, metadata={"format": "mlx" if fmt == "mlx" else "pt"})

    values = ValueSource(seed)
    if bits:
        import mlx.core as mx
    for name, shape, qkeys in plan:
        for rows, row in _row_slices(shape):
            n = rows * row
            if name.endswith("token_ordering"):  # the centroid head's vocabulary order: a permutation
                writer.write(prefix + name, values.rng.permutation(n).astype(np.int64).tobytes())
                continue
            if qkeys is None:
                writer.write(prefix + name, values.float_bits(name, n).tobytes())
                continue
            w = mx.array(values.matrix_bits(n)).view(mx.bfloat16).reshape(rows, row)
            for key, part in zip(qkeys, mx.quantize(w, group_size=group_size, bits=bits)):
                if part.dtype == mx.bfloat16:
                    part = part.view(mx.uint16)
                writer.write(prefix + key, memoryview(np.array(part)).cast("B"))
    writer.close()

    if bits:
        config["quantization"] = {"group_size": group_size, "bits": bits}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":  # the command line lives in cli.py
    from mlx_gemma4.cli import synth_main

    raise SystemExit(synth_main())

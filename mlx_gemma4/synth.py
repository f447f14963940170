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
`load_drafter` and `benchmarks/bench.py --draft-model`.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import numpy as np

from .memory import (
    GROUP_SIZE,
    is_quantizable,
    layer_types_of,
    quantized_specs,
    text_config_of,
    text_param_specs,
)

POOL_SIZE = (1 << 22) + 3  # random values reused at random offsets (not a multiple of any row length)
CHUNK_ELEMENTS = 1 << 24  # elements generated/quantized at once (32 MB of bf16)
TOWER_PREFIXES = ("vision_tower.", "vision_embedder.", "embed_vision.", "audio_tower.", "embed_audio.")
DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


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
        types = layer_types_of(text)[:layers]
        types[-1] = "full_attention"
        shared_orig = int(text.get("num_kv_shared_layers") or 0)
        shared = round(layers * shared_orig / n_orig)
        # transformers requires every attention kind to have a cache-owning layer before the shared tail
        while shared > 0 and set(types[: layers - shared]) != set(types):
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
# Streaming safetensors writer


def _tensor_nbytes(shape, dtype: str) -> int:
    return math.prod(shape) * {"BF16": 2, "F32": 4, "U32": 4, "I64": 8}[dtype]


class ShardedWriter:
    """Writes a known list of tensors into safetensors shards whose headers are written up front.

    Each tensor is then filled in order, in row slices, so nothing bigger than a slice is ever in memory."""

    def __init__(self, out: Path, entries: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int,
                 metadata: dict | None = None):
        self.out = out
        shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for key, shape, dtype in entries:
            nbytes = _tensor_nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, shape, dtype))
            size += nbytes
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
        self.location: dict[str, tuple[int, int, int]] = {}  # key -> (shard, begin, end) in file bytes
        self.total = 0
        for shard_index, (fname, tensors) in enumerate(zip(self.files, shards)):
            header, offset = {}, 0
            for key, shape, dtype in tensors:
                nbytes = _tensor_nbytes(shape, dtype)
                header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header["__metadata__"] = dict(metadata or {"format": "mlx"})
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            with open(out / fname, "wb") as fh:
                fh.write(struct.pack("<Q", len(raw)) + raw)
                fh.truncate(start + offset)
            for key, shape, dtype in tensors:
                b, e = header[key]["data_offsets"]
                self.location[key] = (shard_index, start + b, start + e)
            self.total += offset
        self._cursor = {key: loc[1] for key, loc in self.location.items()}
        self._handles: dict[int, object] = {}

    def write(self, key: str, data: bytes | memoryview) -> None:
        shard, _, end = self.location[key]
        pos = self._cursor[key]
        if pos + len(data) > end:
            raise ValueError(f"{key}: writing past the tensor's end")
        fh = self._handles.get(shard)
        if fh is None:
            for other in list(self._handles):  # tensors are written in order: at most one shard stays open
                self._handles.pop(other).close()
            fh = self._handles[shard] = open(self.out / self.files[shard], "r+b")
        fh.seek(pos)
        fh.write(data)
        self._cursor[key] = pos + len(data)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        short = [k for k, (_, _, end) in self.location.items() if self._cursor[k] != end]
        if short:
            raise RuntimeError(f"tensors left incomplete: {short[:5]}")
        if len(self.files) > 1:
            weight_map = {key: self.files[loc[0]] for key, loc in self.location.items()}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


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
        if name.startswith(TOWER_PREFIXES):
            specs.append((name, tuple(tensor.shape)))
    return specs


def unified_embedder_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the 12B's image and audio front ends (mlx_gemma4.unified), as its checkpoint names them."""
    H = text_config_of(config)["hidden_size"]
    specs = []
    vision, audio = config.get("vision_config"), config.get("audio_config")
    if vision:
        patch = 3 * (vision.get("patch_size", 16) * vision.get("pooling_kernel_size", 3)) ** 2
        E = vision.get("mm_embed_dim", 3840)
        specs += [("vision_embedder.patch_ln1.weight", (patch,)), ("vision_embedder.patch_ln1.bias", (patch,)),
                  ("vision_embedder.patch_dense.weight", (E, patch)), ("vision_embedder.patch_dense.bias", (E,)),
                  ("vision_embedder.patch_ln2.weight", (E,)), ("vision_embedder.patch_ln2.bias", (E,)),
                  ("vision_embedder.pos_embedding", (vision.get("mm_posemb_size", 1120), 2, E)),
                  ("vision_embedder.pos_norm.weight", (E,)), ("vision_embedder.pos_norm.bias", (E,)),
                  ("embed_vision.embedding_projection.weight", (H, vision.get("output_proj_dims", E)))]
    if audio:
        specs.append(("embed_audio.embedding_projection.weight", (H, audio.get("audio_embed_dim", 640))))
    return specs


def drafter_param_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of an MTP drafter (mlx_gemma4.drafter; the same names as its Hugging Face checkpoint)."""
    text = dict(text_config_of(config))
    text["num_kv_shared_layers"] = text["num_hidden_layers"]  # Q-only layers: no k/v projections
    H, V = text["hidden_size"], text["vocab_size"]
    Hb = config["backbone_hidden_size"]
    specs = [("model." + name.removeprefix("language_model."), shape) for name, shape in text_param_specs(text)]
    specs += [("pre_projection.weight", (H, 2 * Hb)), ("post_projection.weight", (Hb, H))]
    if not config.get("tie_word_embeddings", True):
        specs.append(("lm_head.weight", (V, H)))
    if config.get("use_ordered_embeddings"):
        specs += [("masked_embedding.centroids.weight", (config.get("num_centroids", 2048), H)),
                  ("masked_embedding.token_ordering", (V,))]
    return specs


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
        specs = text_param_specs(text_config_of(config))
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

"""Resource limits checked before anything is allocated: a checkpoint's config against its own tensors.

A config may describe a model far larger than the files beside it (a crafted `num_hidden_layers`, a GGUF
`block_count` of 10**9): building the module tree, the per-layer lists or the caches for it would exhaust
memory before the weights are ever compared. So right after the config is parsed (its fields are range-checked
in config.py) and the tensor table is read (names, shapes and byte sizes only, no data), the config must agree
with the tensors on what sizes the memory: the decoder's layer count, the vocabulary and hidden size (the
embedding table), the attention heads (layer 0's q_proj), the experts, the towers' layer counts, and the
parameter count it implies, which must fit in the tensors' bytes even at 2 bits a parameter. A mismatch is a
CheckpointError naming both sides.
"""

from __future__ import annotations

import re

import numpy as np

from .errors import CheckpointError, ConfigError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MIN_BITS_PER_PARAMETER = 2  # the smallest quantization any supported layout stores (2-bit + scales is more)


def layer_indices(names, part: str | None = None) -> set[int]:
    """Layer indices of the decoder (part None: names outside the vision/audio towers) or of a tower ("vision",
    "audio") in tensor names like `model.language_model.layers.3.mlp...`."""
    out = set()
    for name in names:
        in_tower = "vision" in name or "audio" in name
        if (part is None and in_tower) or (part is not None and part not in name):
            continue
        m = _LAYER.search(name)
        if m:
            out.add(int(m.group(1)))
    return out


def _check_layers(kind: str, declared, present: set[int], problems: list[str]) -> None:
    if not present or not isinstance(declared, int):
        return
    if max(present) + 1 != declared:
        problems.append(f"the config says {kind} has {declared} layers, but the tensors hold layers 0..{max(present)}")
    elif len(present) != declared:
        missing = sorted(set(range(declared)) - present)
        problems.append(f"{kind}: no tensors for layers {missing[:10]}{' ...' if len(missing) > 10 else ''}")


def implied_parameters(text) -> int:
    """A lower bound on the text decoder's parameter count for a TextConfig (projections, MLPs, experts and
    embedding tables; norms and scalars left out)."""
    hidden = text.hidden_size
    total = text.vocab_size * hidden
    if text.hidden_size_per_layer_input:
        per_layer = text.hidden_size_per_layer_input * text.num_hidden_layers
        total += text.vocab_size_per_layer_input * per_layer + per_layer * hidden
    for i in range(text.num_hidden_layers):
        head_dim, kv = text.layer_head_dims[i], text.layer_kv_heads[i]
        total += 2 * text.num_attention_heads * head_dim * hidden  # q_proj, o_proj
        if not text.is_kv_shared(i):
            total += kv * head_dim * hidden * (2 if text.has_value_proj(i) else 1)
        total += 3 * hidden * text.mlp_width(i)
        if text.enable_moe_block:
            total += 3 * text.num_experts * hidden * text.moe_intermediate_size
    return total


def check_against_tensors(config, shapes: dict[str, tuple[int, ...]], total_bytes: int, where: str) -> None:
    """CheckpointError unless `config` (a ModelConfig) agrees with the tensors `shapes` ({name: shape}, the
    checkpoint's own names) holding `total_bytes` bytes, on everything that sizes memory."""
    text = config.text
    problems: list[str] = []
    _check_layers("the text decoder", text.num_hidden_layers, layer_indices(shapes), problems)
    for part, tower in (("vision", config.vision), ("audio", config.audio)):
        if isinstance(tower, dict):
            _check_layers(f"the {part} tower", tower.get("num_hidden_layers"), layer_indices(shapes, part), problems)

    decoder = {n: s for n, s in shapes.items() if "vision" not in n and "audio" not in n}
    embed = next((n for n in decoder if n.endswith("embed_tokens.weight")), None)
    if embed is not None:
        packed = embed[: -len("weight")] + "scales" in shapes  # quantized: the last axis is packed
        rows, cols = (tuple(decoder[embed]) + (None, None))[:2]
        if rows != text.vocab_size:
            problems.append(f"the config's vocab_size is {text.vocab_size}, but {embed} has {rows} rows")
        if not packed and cols is not None and cols != text.hidden_size:
            problems.append(f"the config's hidden_size is {text.hidden_size}, but {embed} has {cols} columns")
    q_proj = next((n for n in decoder if re.search(r"(?:^|\.)layers\.0\.self_attn\.q_proj\.weight$", n)), None)
    if q_proj is not None and decoder[q_proj]:
        heads = text.num_attention_heads * text.layer_head_dims[0]
        if decoder[q_proj][0] != heads:
            problems.append(f"the config's num_attention_heads x head_dim of layer 0 is {heads}, but {q_proj} has "
                            f"{decoder[q_proj][0]} rows")
    if text.enable_moe_block:
        experts = next((n for n in decoder if re.search(r"layers\.0\.experts\.(gate_up_proj|down_proj)$", n)), None)
        if experts is not None and decoder[experts] and decoder[experts][0] != text.num_experts:
            problems.append(f"the config's num_experts is {text.num_experts}, but {experts} holds "
                            f"{decoder[experts][0]} experts")
    if problems:
        raise CheckpointError(f"{where}: the config does not match the checkpoint's tensors:\n  "
                              + "\n  ".join(problems))

    needed = implied_parameters(text) * MIN_BITS_PER_PARAMETER // 8
    if needed > total_bytes:
        raise CheckpointError(
            f"{where}: the config implies at least {implied_parameters(text):,} text-decoder parameters (at least "
            f"{needed:,} bytes even at {MIN_BITS_PER_PARAMETER} bits each), but the checkpoint's tensors hold only "
            f"{total_bytes:,} bytes")


# -- GGUF headers ---------------------------------------------------------------------------------------------
MAX_GGUF_ALIGNMENT = 1 << 16


def check_gguf_alignment(value, path) -> int:
    """general.alignment: a power of two (llama.cpp's rule), at most 64 KiB."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value & (value - 1) \
            or value > MAX_GGUF_ALIGNMENT:
        raise CheckpointError(f"{path}: general.alignment = {value!r} must be a power of two <= {MAX_GGUF_ALIGNMENT}")
    return int(value)


def check_block_count(value, tensor_names, path) -> int:
    """A GGUF's `<arch>.block_count`, checked before any per-layer list is built: an integer in
    [1, MAX_LAYERS] that equals the number of `blk.N.` tensor blocks the file holds."""
    from .config import MAX_LAYERS

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_LAYERS:
        raise ConfigError(f"{path}: GGUF metadata block_count = {value!r} is out of range (allowed: 1 <= "
                          f"block_count <= {MAX_LAYERS})")
    blocks = {int(n.split(".")[1]) for n in tensor_names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if blocks and max(blocks) + 1 != value:
        raise CheckpointError(f"{path}: GGUF metadata block_count = {value}, but the file holds tensors for blocks "
                              f"0..{max(blocks)}")
    return int(value)

"""Memory planner: how much RAM a Gemma 4 model needs at a given context, from its config alone.

    python -m mlx_gemma4.memory --model e2b|e4b|26b-a4b|31b|google/gemma-4-E2B-it|DIR --context 8192 \
        [--bits 4|8|16] [--dtype float32|bfloat16] [--weights-dtype bfloat16] [--chunk 512] [--ram 24]

The estimate has three parts:
  weights      every text-decoder tensor at its stored size (a local directory's safetensors headers are read,
               nothing is loaded); quantized tensors are `bits/8` bytes per value plus one scale and one bias
               per group of 64
  KV cache     per layer that owns a cache: 2 (keys and values, also on k=v layers: keys are normed and rotated,
               values are not, so both are kept) x kv_heads x head_dim x tokens, where tokens is the context for
               full-attention layers and at most the sliding window (plus the prefill chunk in flight) for
               sliding layers; KV-shared layers reuse an earlier layer's cache and cost nothing
  activations  the largest set of temporaries alive while one prefill chunk passes one layer (attention
               scores against the whole cache, the MLP/MoE intermediates, per-layer embeddings, logits)

The geometry comes from the loader's own view of the config: `TextConfig` (per-layer head dims, KV heads, KV
sharing, MLP widths) and the parameter shapes of `build_model(config)`, built lazily (nothing is allocated).
`text_param_specs` lists those tensors, so the synthetic checkpoint maker (`mlx_gemma4.synth`) writes exactly
what the loader expects and the planner counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from mlx.utils import tree_flatten

from .config import SLIDING, ModelConfig, TextConfig
from .kernels.sliding_attention import MLX_BLOCK_Q, MLX_BLOCK_Q_GLOBAL
from .loading import build_model
from .model import is_tower_param
from .safetensors_io import read_header, tensor_bytes

PRESETS_DIR = Path(__file__).parent / "presets"
VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")
# presets beyond the four verified configs (synth writes them): the 12B and the MTP drafter of each model
FAMILY_PRESETS = ("12b",) + tuple(f"{v}-assistant" for v in VARIANTS + ("12b",))
GROUP_SIZE = 64
GiB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------------------------------------------
# Configs


def load_preset(variant: str) -> dict:
    """The published config.json of a variant (e2b, e4b, 26b-a4b, 31b, 12b) or of its drafter (e2b-assistant, ...).

    The 12B's and the drafters' files are reconstructions (no byte copy was available offline): their dimensions
    come from transformers' Gemma4Unified* defaults, mlx-vlm's gemma4_unified defaults and published drafter
    configs quoted in third-party code; the drafters' parameter counts match their model cards (78 M for E2B,
    0.4-0.5 B for 26B/31B)."""
    if variant not in VARIANTS + FAMILY_PRESETS:
        raise ValueError(f"unknown Gemma 4 variant {variant!r}; expected one of "
                         f"{', '.join(VARIANTS + FAMILY_PRESETS)}")
    return json.loads((PRESETS_DIR / f"{variant}.json").read_text())


def variant_of(name: str) -> str | None:
    """Map a variant name or a hub id (e.g. google/gemma-4-26B-A4B-it) to a preset name, or None."""
    low = name.lower()
    if low in VARIANTS:
        return low
    for pattern, variant in (("e2b", "e2b"), ("e4b", "e4b"), ("26b", "26b-a4b"), ("31b", "31b")):
        if re.search(rf"(^|[^0-9a-z]){pattern}($|[^0-9a-z])", low):
            return variant
    return None


def resolve_model(model: str) -> tuple[dict, Path | None]:
    """Config dict for a local directory, a variant name or a hub id; plus the directory when local."""
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{path} has no config.json")
        return json.loads(config_path.read_text()), path
    variant = variant_of(model)
    if variant is None:
        raise ValueError(
            f"{model!r} is neither a local directory nor a known Gemma 4 variant or hub id "
            f"({', '.join(VARIANTS)}, e.g. google/gemma-4-E2B-it)"
        )
    return load_preset(variant), None


def text_config_of(config: dict) -> dict:
    """The text decoder's config: `text_config` of a Gemma4Config, or the config itself (Gemma4TextConfig)."""
    text = config.get("text_config") or config
    if "hidden_size" not in text or "num_hidden_layers" not in text:
        raise ValueError("config has no text decoder dimensions (hidden_size, num_hidden_layers)")
    return text


# --------------------------------------------------------------------------------------------------------------
# Geometry: the loader's view of the config


def model_config_of(config: dict | ModelConfig) -> ModelConfig:
    """The config as the loader parses it (a whole Gemma4Config dict, or its text_config alone), towers left out."""
    if not isinstance(config, ModelConfig):
        text = text_config_of(config)
        config = ModelConfig.from_dict(config) if text is not config else ModelConfig(text=TextConfig.from_dict(text))
    return dataclasses.replace(config, vision=None, audio=None)


def text_param_specs(config: dict | ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every text-decoder tensor, in our names (`language_model.*`, plus `lm_head.weight` when
    untied), read off the module tree the loader builds for this config (lazily: nothing is allocated)."""
    model = build_model(model_config_of(config))
    return [(name, tuple(w.shape)) for name, w in tree_flatten(model.parameters())]


# --------------------------------------------------------------------------------------------------------------
# Quantization layout (MLX conventions)


def is_quantizable(name: str, shape: tuple[int, ...], group_size: int = GROUP_SIZE) -> bool:
    """Matrices (linear and embedding weights, expert banks) whose rows split into whole groups.

    Norm weights, scalars and router scales stay in the float dtype."""
    return len(shape) >= 2 and shape[-1] % group_size == 0 and "norm" not in name


def quantized_specs(name: str, shape: tuple[int, ...], bits: int, group_size: int = GROUP_SIZE):
    """[(key, shape, dtype)] of the three tensors `mx.quantize` produces for one weight, named as our quantized
    modules hold them: `x.weight` -> `x.weight` (packed uint32), `x.scales`, `x.biases`; an expert bank
    `experts.gate_up_proj` -> itself packed, `experts.gate_up_proj_scales`, `experts.gate_up_proj_biases`."""
    lead, cols = tuple(shape[:-1]), shape[-1]
    if name.endswith(".weight"):
        base = name[: -len(".weight")]
        keys = (name, base + ".scales", base + ".biases")
    else:
        keys = (name, name + "_scales", name + "_biases")
    return [
        (keys[0], lead + (cols * bits // 32,), "U32"),
        (keys[1], lead + (cols // group_size,), "BF16"),
        (keys[2], lead + (cols // group_size,), "BF16"),
    ]


def stored_bytes(specs, bits: int = 16, group_size: int = GROUP_SIZE, float_bytes: int = 2) -> int:
    """Bytes of a list of (name, shape) at `bits` (16 = unquantized), float tensors and quantization scales and
    biases at `float_bytes` each (the loader casts every float tensor to the compute dtype)."""
    total = 0
    for name, shape in specs:
        n = math.prod(shape)
        if bits < 16 and is_quantizable(name, shape, group_size):
            total += n * bits // 8 + 2 * float_bytes * (n // group_size)  # packed values, scales, biases
        else:
            total += n * float_bytes
    return total


def safetensors_bytes(directory: Path, keep=None) -> int:
    """Sum of tensor sizes recorded in the safetensors headers of a directory (reads headers only); `keep`
    filters tensor names."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files")
    return sum(tensor_bytes(read_header(f), keep) for f in files)


# --------------------------------------------------------------------------------------------------------------
# Estimate


@dataclasses.dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    kv_cache_detail: dict

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def fits(self, ram_bytes: int) -> bool:
        return self.total <= ram_bytes


def kv_cache_bytes(config: dict | ModelConfig, context: int, dtype_bytes: int, chunk: int = 0) -> dict:
    """Bytes of the KV cache at `context` tokens, split by layer kind.

    A sliding layer holds at most `sliding_window` tokens once decoding, but while a prefill chunk of `chunk`
    tokens is being attended it also holds that chunk (window - 1 old + chunk new)."""
    text = model_config_of(config).text
    out = {"sliding": 0, "full": 0, "shared_layers": 0, "sliding_layers": 0, "full_layers": 0}
    for i, kind in enumerate(text.layer_types):
        if text.is_kv_shared(i):
            out["shared_layers"] += 1
            continue
        per_token = 2 * text.layer_kv_heads[i] * text.layer_head_dims[i] * dtype_bytes  # keys and values
        if kind == SLIDING:
            out["sliding"] += per_token * min(context, text.sliding_window + max(chunk - 1, 0))
            out["sliding_layers"] += 1
        else:
            out["full"] += per_token * context
            out["full_layers"] += 1
    return out


def activation_bytes(config: dict | ModelConfig, context: int, chunk: int, dtype_bytes: int, quantized: bool = False,
                     upcast_weights: bool = False) -> int:
    """Largest set of temporaries alive while one prefill chunk passes the costliest layer.

    Residual stream and its normed copy, q/k/v of the chunk, the attention scores against the cached keys
    (float32), MLP gate/up/product (or the MoE's top-k expert intermediates plus the shared MLP),
    the per-layer-embedding inputs for all layers, and the last position's float32 logits.
    Calibrated against the measured peak of this package's model (tests/test_memory_measured.py)."""
    text = model_config_of(config).text
    C = max(1, min(chunk, context))
    H, V, nh = text.hidden_size, text.vocab_size, text.num_attention_heads
    P, L = text.hidden_size_per_layer_input, text.num_hidden_layers
    worst_attention = worst_mlp = 0
    for i, kind in enumerate(text.layer_types):
        sliding, head_dim, kv_heads = kind == SLIDING, text.layer_head_dims[i], text.layer_kv_heads[i]
        # kernels.windowed_attention's MLX path: query blocks of BQ rows, each against only the keys its
        # window reaches (sliding) or everything before it (global). MLX evaluates the chunk's blocks as one
        # graph, so every block's float32 scores can be alive at once (measured).
        bq = min(C, MLX_BLOCK_Q if sliding else MLX_BLOCK_Q_GLOBAL)
        keys = min(context, text.sliding_window + bq - 1) if sliding else context
        qkv = C * (nh + 2 * kv_heads) * head_dim * dtype_bytes
        # mx.fast.scaled_dot_product_attention with a mask on the CPU backend keeps about 1.25 copies of the
        # scores alive at its peak (measured, tests/test_memory_measured.py)
        scores = int(1.25 * nh * C * keys * 4)
        worst_attention = max(worst_attention, qkv + scores + C * nh * head_dim * dtype_bytes)
        mlp = 3 * C * text.mlp_width(i) * dtype_bytes
        if upcast_weights:  # weights stored narrower than the compute dtype: upcast copies of the MLP's three
            mlp += 2 * 3 * text.mlp_width(i) * H * dtype_bytes  # matrices, about two layers' worth alive (measured)
        if text.enable_moe_block:
            # kernels.expert_glu_segments (the CPU prefill path), measured: about four float32 copies of the
            # (token, expert) pairs' rows alive at once (gathered inputs, per-expert outputs, their concatenation
            # and its return to token order), half of the pairs' gate/up/GLU rows, the router's float32 scores
            k, E, Im = text.top_k_experts, text.num_experts, text.moe_intermediate_size
            mlp += 4 * C * k * H * 4 + C * k * 3 * Im * 4 // 2 + 2 * C * E * 4
            if quantized:  # experts' weights are unpacked to float32 one expert at a time (two alive, measured)
                mlp += 2 * 3 * Im * H * 4
        worst_mlp = max(worst_mlp, mlp)
    residual = 3 * C * H * dtype_bytes
    ple = 2 * C * L * P * dtype_bytes
    logits = V * 4
    return residual + ple + max(worst_attention, worst_mlp) + logits


def estimate(config: dict, context: int, *, bits: int | None = None, dtype: str = "bfloat16", chunk: int = 512,
             directory: Path | None = None, weights_dtype: str | None = None) -> MemoryEstimate:
    """Estimate the memory to run `config` at `context` tokens.

    bits: weight precision (4, 8 or 16); default: the checkpoint's own (its config's `quantization`, else 16).
    dtype: the compute dtype (KV cache and activations; unquantized weights are held in it too, unless
    weights_dtype names a narrower storage dtype, as `load(..., weights_dtype=...)` does).
    directory: a local checkpoint whose safetensors headers give the exact stored weight size (used when
    `bits` is not given and the compute dtype does not change the stored float size)."""
    if context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown compute dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    if weights_dtype is not None and weights_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown weights dtype {weights_dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    if bits is not None and bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    parsed = model_config_of(config)
    dtype_bytes = DTYPE_BYTES[dtype]
    quant = config.get("quantization") or {}
    stored_bits = quant.get("bits", 16)
    group = quant.get("group_size", GROUP_SIZE)
    specs = text_param_specs(parsed)
    quantized = (bits or stored_bits) < 16  # the loader ignores weights_dtype for quantized models
    weight_bytes = DTYPE_BYTES[dtype if quantized else (weights_dtype or dtype)]
    if bits is None and directory is not None and weight_bytes == 2:
        weights = safetensors_bytes(directory, lambda name: not is_tower_param(name))
    else:
        weights = stored_bytes(specs, bits or stored_bits, group, float_bytes=weight_bytes)
    kv = kv_cache_bytes(parsed, context, dtype_bytes, chunk=min(chunk, context))
    acts = activation_bytes(parsed, context, chunk, dtype_bytes, quantized=quantized,
                            upcast_weights=weight_bytes < dtype_bytes)
    return MemoryEstimate(weights=weights, kv_cache=kv["sliding"] + kv["full"], activations=acts, kv_cache_detail=kv)


def format_estimate(est: MemoryEstimate, context: int, ram_gib: float | None = None) -> str:
    d = est.kv_cache_detail
    rows = [
        ("weights", est.weights, ""),
        ("KV cache", est.kv_cache,
         f"{d['full_layers']} full layers {d['full'] / GiB:.3f} GiB (grow with context), "
         f"{d['sliding_layers']} sliding {d['sliding'] / GiB:.3f} GiB (bounded by the window), "
         f"{d['shared_layers']} KV-shared (free)"),
        ("activations", est.activations, "one prefill chunk through the costliest layer"),
        ("total", est.total, ""),
    ]
    lines = [f"context {context} tokens", "| part | GiB | note |", "|---|---:|---|"]
    lines += [f"| {name} | {size / GiB:.3f} | {note} |" for name, size, note in rows]
    if ram_gib is not None:
        verdict = "fits" if est.fits(int(ram_gib * GiB)) else "does NOT fit"
        lines.append(f"{verdict} in {ram_gib:g} GiB")
    return "\n".join(lines)


def default_dtype_name() -> str:
    """The compute dtype the loader would pick here (mlx_gemma4.runtime.RuntimePolicy), as a name."""
    from .runtime import RuntimePolicy

    return str(RuntimePolicy.from_arguments().dtype).replace("mlx.core.", "")


if __name__ == "__main__":  # the command line lives in cli.py
    from mlx_gemma4.cli import memory_main

    raise SystemExit(memory_main())

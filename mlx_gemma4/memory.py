"""Memory planner: how much RAM a Gemma 4 model needs at a given context, from its config alone.

    python -m mlx_gemma4.memory --model e2b|e4b|26b-a4b|31b|google/gemma-4-E2B-it|DIR --context 8192 \
        [--bits 4|8|16] [--kv-bits 4|8] [--dtype float32|bfloat16] [--weights-dtype bfloat16] [--chunk 512] \
        [--ram 24]

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

This module is also the one place that knows which tensors a config implies (`text_param_specs`), so the
synthetic checkpoint maker (`mlx_gemma4.synth`) writes exactly what the planner counts.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .kernels.sliding_attention import MLX_BLOCK_Q, MLX_BLOCK_Q_GLOBAL

PRESETS_DIR = Path(__file__).parent / "presets"
VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")
# presets beyond the four verified configs (synth writes them): the 12B and the MTP drafter of each model
FAMILY_PRESETS = ("12b",) + tuple(f"{v}-assistant" for v in VARIANTS + ("12b",))
GROUP_SIZE = 64
GiB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "I64": 8, "U16": 2}


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
# Geometry


@dataclass(frozen=True)
class LayerGeometry:
    index: int
    sliding: bool
    head_dim: int
    kv_heads: int
    kv_shared: bool  # reuses an earlier layer's keys/values: no k/v projections, no cache of its own
    k_eq_v: bool  # values come from k_proj (no v_proj); keys and values are still cached separately
    mlp_intermediate: int


def layer_types_of(text: dict) -> list[str]:
    n = text["num_hidden_layers"]
    types = list(text.get("layer_types") or [])
    if not types:  # transformers' default: 5 sliding : 1 full
        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
    return types


def _full_layer_overrides(text: dict, index: int) -> dict:
    """Head dim / KV heads of a full-attention layer, from either config spelling.

    Published configs say `global_head_dim` / `num_global_key_value_heads` (the latter only applies with
    attention_k_eq_v); transformers 5.2x saves the same as `per_layer_config` {layer: overrides}, its keys
    zero-padded strings ("05") once written to JSON."""
    plc = text.get("per_layer_config")
    if plc:
        by_index = {int(k): v for k, v in plc.items()}
        return dict(by_index.get(index) or {})
    out = {"head_dim": text.get("global_head_dim") or text.get("head_dim", 256)}
    if text.get("attention_k_eq_v", False) and text.get("num_global_key_value_heads") is not None:
        out["num_key_value_heads"] = text["num_global_key_value_heads"]
    return out


def layer_geometry(text: dict) -> list[LayerGeometry]:
    types = layer_types_of(text)
    n = len(types)
    first_shared = n - int(text.get("num_kv_shared_layers") or 0)
    layers = []
    for i, kind in enumerate(types):
        sliding = kind == "sliding_attention"
        head_dim, kv_heads = text.get("head_dim", 256), text["num_key_value_heads"]
        if not sliding:
            over = _full_layer_overrides(text, i)
            head_dim, kv_heads = over.get("head_dim", head_dim), over.get("num_key_value_heads", kv_heads)
        shared = i >= first_shared
        wide = 2 if (text.get("use_double_wide_mlp") and shared) else 1
        layers.append(
            LayerGeometry(
                index=i,
                sliding=sliding,
                head_dim=head_dim,
                kv_heads=kv_heads,
                kv_shared=shared,
                k_eq_v=bool(text.get("attention_k_eq_v")) and not sliding,
                mlp_intermediate=text["intermediate_size"] * wide,
            )
        )
    return layers


def text_param_specs(text: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every text-decoder tensor, in our names (`language_model.*`), tied lm_head absent.

    Mirrors transformers' Gemma4TextModel (5.2x): KV-shared layers have no k/v projections or k_norm,
    k=v full layers have no v_proj, v_norm has no weight."""
    H = text["hidden_size"]
    V = text["vocab_size"]
    L = text["num_hidden_layers"]
    P = int(text.get("hidden_size_per_layer_input") or 0)
    nh = text["num_attention_heads"]
    p = "language_model."
    specs: list[tuple[str, tuple[int, ...]]] = [(p + "embed_tokens.weight", (V, H))]
    if P:
        specs += [
            (p + "embed_tokens_per_layer.weight", (text.get("vocab_size_per_layer_input", V), L * P)),
            (p + "per_layer_model_projection.weight", (L * P, H)),
            (p + "per_layer_projection_norm.weight", (P,)),
        ]
    for g in layer_geometry(text):
        lp = f"{p}layers.{g.index}."
        d, kv = g.head_dim, g.kv_heads
        specs += [(lp + "self_attn.q_proj.weight", (nh * d, H)), (lp + "self_attn.q_norm.weight", (d,))]
        if not g.kv_shared:
            specs += [(lp + "self_attn.k_proj.weight", (kv * d, H)), (lp + "self_attn.k_norm.weight", (d,))]
            if not g.k_eq_v:
                specs.append((lp + "self_attn.v_proj.weight", (kv * d, H)))
        specs.append((lp + "self_attn.o_proj.weight", (H, nh * d)))
        I = g.mlp_intermediate
        specs += [
            (lp + "mlp.gate_proj.weight", (I, H)),
            (lp + "mlp.up_proj.weight", (I, H)),
            (lp + "mlp.down_proj.weight", (H, I)),
        ]
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            specs.append((f"{lp}{norm}.weight", (H,)))
        specs.append((lp + "layer_scalar", (1,)))
        if P:
            specs += [
                (lp + "per_layer_input_gate.weight", (P, H)),
                (lp + "per_layer_projection.weight", (H, P)),
                (lp + "post_per_layer_input_norm.weight", (H,)),
            ]
        if text.get("enable_moe_block"):
            E, Im = text["num_experts"], text["moe_intermediate_size"]
            specs += [
                (lp + "router.proj.weight", (E, H)),
                (lp + "router.scale", (H,)),
                (lp + "router.per_expert_scale", (E,)),
                (lp + "experts.gate_up_proj", (E, 2 * Im, H)),
                (lp + "experts.down_proj", (E, H, Im)),
            ]
            for norm in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
                specs.append((f"{lp}{norm}.weight", (H,)))
    specs.append((p + "norm.weight", (H,)))
    return specs


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


def safetensors_bytes(directory: Path, prefix_filter=None) -> int:
    """Sum of tensor sizes recorded in the safetensors headers of a directory (reads headers only)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key == "__metadata__" or (prefix_filter and not prefix_filter(key)):
                continue
            begin, end = info["data_offsets"]
            total += end - begin
    return total


# --------------------------------------------------------------------------------------------------------------
# Estimate


@dataclass
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


def _text_weight_key(key: str) -> bool:
    """Text-decoder tensors in either layout (ours `language_model.*`, HF `model.language_model.*`/`model.*`)."""
    towers = ("vision_tower", "vision_embedder", "embed_vision", "audio_tower", "embed_audio")
    return not any(t in key for t in towers)


def kv_bytes_per_value(dtype_bytes: int, kv_bits: int | None, group_size: int = GROUP_SIZE) -> float:
    if kv_bits is None:
        return float(dtype_bytes)
    return kv_bits / 8 + 2 * dtype_bytes / group_size


def kv_cache_bytes(text: dict, context: int, dtype_bytes: int, kv_bits: int | None = None, chunk: int = 0) -> dict:
    """Bytes of the KV cache at `context` tokens, split by layer kind.

    A sliding layer holds at most `sliding_window` tokens once decoding, but while a prefill chunk of `chunk`
    tokens is being attended it also holds that chunk (window - 1 old + chunk new)."""
    window = int(text.get("sliding_window") or context)
    per_value = kv_bytes_per_value(dtype_bytes, kv_bits)
    out = {"sliding": 0.0, "full": 0.0, "shared_layers": 0, "sliding_layers": 0, "full_layers": 0}
    for g in layer_geometry(text):
        if g.kv_shared:
            out["shared_layers"] += 1
            continue
        if g.sliding:
            tokens = min(context, window + max(chunk - 1, 0))
            out["sliding"] += 2 * g.kv_heads * g.head_dim * tokens * per_value
            out["sliding_layers"] += 1
        else:
            out["full"] += 2 * g.kv_heads * g.head_dim * context * per_value
            out["full_layers"] += 1
    out["sliding"], out["full"] = int(out["sliding"]), int(out["full"])
    return out


def activation_bytes(text: dict, context: int, chunk: int, dtype_bytes: int, quantized: bool = False,
                     upcast_weights: bool = False) -> int:
    """Largest set of temporaries alive while one prefill chunk passes the costliest layer.

    Residual stream and its normed copy, q/k/v of the chunk, the attention scores against the cached keys
    (float32), MLP gate/up/product (or the MoE's top-k expert intermediates plus the shared MLP),
    the per-layer-embedding inputs for all layers, and the last position's float32 logits.
    Calibrated against the measured peak of this package's model (tests/test_memory_measured.py)."""
    C = max(1, min(chunk, context))
    H, V, nh = text["hidden_size"], text["vocab_size"], text["num_attention_heads"]
    window = int(text.get("sliding_window") or context)
    P, L = int(text.get("hidden_size_per_layer_input") or 0), text["num_hidden_layers"]
    worst_attention = worst_mlp = 0
    for g in layer_geometry(text):
        # kernels.windowed_attention's MLX path: query blocks of BQ rows, each against only the keys its
        # window reaches (sliding) or everything before it (global). MLX evaluates the chunk's blocks as one
        # graph, so every block's float32 scores can be alive at once (measured).
        bq = min(C, MLX_BLOCK_Q if g.sliding else MLX_BLOCK_Q_GLOBAL)
        keys = min(context, window + bq - 1) if g.sliding else context
        qkv = C * (nh + 2 * g.kv_heads) * g.head_dim * dtype_bytes
        # mx.fast.scaled_dot_product_attention with a mask on the CPU backend keeps about 1.25 copies of the
        # scores alive at its peak (measured, tests/test_memory_measured.py)
        scores = int(1.25 * nh * C * keys * 4)
        worst_attention = max(worst_attention, qkv + scores + C * nh * g.head_dim * dtype_bytes)
        mlp = 3 * C * g.mlp_intermediate * dtype_bytes
        if upcast_weights:  # weights stored narrower than the compute dtype: upcast copies of the MLP's three
            mlp += 2 * 3 * g.mlp_intermediate * H * dtype_bytes  # matrices, about two layers' worth alive (measured)
        if text.get("enable_moe_block"):
            # kernels.expert_glu_segments (the CPU prefill path), measured: about four float32 copies of the
            # (token, expert) pairs' rows alive at once (gathered inputs, per-expert outputs, their concatenation
            # and its return to token order), half of the pairs' gate/up/GLU rows, the router's float32 scores
            k, E, Im = text["top_k_experts"], text["num_experts"], text["moe_intermediate_size"]
            mlp += 4 * C * k * H * 4 + C * k * 3 * Im * 4 // 2 + 2 * C * E * 4
            if quantized:  # experts' weights are unpacked to float32 one expert at a time (two alive, measured)
                mlp += 2 * 3 * Im * H * 4
        worst_mlp = max(worst_mlp, mlp)
    residual = 3 * C * H * dtype_bytes
    ple = 2 * C * L * P * dtype_bytes
    logits = V * 4
    return residual + ple + max(worst_attention, worst_mlp) + logits


def estimate(config: dict, context: int, *, bits: int | None = None, kv_bits: int | None = None,
             dtype: str = "bfloat16", chunk: int = 512, directory: Path | None = None,
             weights_dtype: str | None = None) -> MemoryEstimate:
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
    if kv_bits is not None and kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    text = text_config_of(config)
    dtype_bytes = DTYPE_BYTES[dtype]
    quant = config.get("quantization") or {}
    stored_bits = quant.get("bits", 16)
    group = quant.get("group_size", GROUP_SIZE)
    specs = text_param_specs(text)
    quantized = (bits or stored_bits) < 16  # the loader ignores weights_dtype for quantized models
    weight_bytes = DTYPE_BYTES[dtype if quantized else (weights_dtype or dtype)]
    if bits is None and directory is not None and weight_bytes == 2:
        weights = safetensors_bytes(directory, _text_weight_key)
    else:
        weights = stored_bytes(specs, bits or stored_bits, group, float_bytes=weight_bytes)
    kv = kv_cache_bytes(text, context, dtype_bytes, kv_bits, chunk=min(chunk, context))
    acts = activation_bytes(text, context, chunk, dtype_bytes, quantized=quantized,
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
    """The compute dtype the loader would pick here (mlx_gemma4.backend.resolve_dtype), as a name."""
    from .backend import resolve_dtype

    return str(resolve_dtype()).replace("mlx.core.", "")


if __name__ == "__main__":  # the command line lives in cli.py
    from mlx_gemma4.cli import memory_main

    raise SystemExit(memory_main())

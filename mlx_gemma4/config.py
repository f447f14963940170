"""Parse Hugging Face `config.json` files for Gemma 4 (and the Gemma 3 text subset) into dataclasses.

Two spellings of the per-layer-type attention geometry exist in the wild:
  * Google's published files: `global_head_dim` / `num_global_key_value_heads`;
  * files saved by transformers >= 5.2x: a `per_layer_config` table {layer index: {head_dim, num_key_value_heads}}.
Both resolve to the same per-layer lists (`TextConfig.layer_head_dims`, `TextConfig.layer_kv_heads`).

Anything the decoder does not implement is an error naming the field, never a silent default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, read_json

SLIDING = "sliding_attention"
FULL = "full_attention"

SUPPORTED_TEXT_TYPES = ("gemma4_text", "gemma3_text", "gemma4_unified_text")
DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
SUPPORTED_ROPE_TYPES = ("default", "proportional", "linear")

# Largest values accepted, far above every published Gemma (E2B..31B: 35-60 layers, hidden size <= 5376, 262144
# tokens, 128 experts, head dims <= 512) and far below what would exhaust memory before the weights are checked.
MAX_LAYERS = 1024
MAX_HIDDEN_SIZE = 1 << 16
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_VOCAB_SIZE = 1 << 24
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_EXPERTS = 4096
MAX_POSITIONS = 2**31 - 1
MAX_CONFIG_BYTES = 16 << 20

# Keys that carry no meaning for inference (training, serialization, bookkeeping).
_IGNORED_KEYS = {
    "architectures", "auto_map", "attention_dropout", "bos_token_id", "chunk_size_feed_forward", "dtype",
    "eos_token_id", "id2label", "initializer_range", "is_encoder_decoder", "label2id", "model_type",
    "output_attentions", "output_hidden_states", "pad_token_id", "problem_type", "return_dict",
    "torch_dtype", "transformers_version", "use_cache", "_name_or_path", "tie_word_embeddings",
    "max_position_embeddings", "quantization", "quantization_config", "_attn_implementation_autoset",
    "cache_implementation", "attn_logit_softcapping", "tokenizer_class", "use_return_dict", "pruned_heads",
    "torchscript", "tf_legacy_loss", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "cross_attention_hidden_size", "add_cross_attention", "is_decoder",
    "tie_encoder_decoder", "chunk_size", "num_labels",
}


_MISSING = object()


def _out_of_range(name: str, value, lo, hi, lo_open: bool, hi_open: bool) -> ConfigError:
    low = f"{lo} {'<' if lo_open else '<='} " if lo is not None else ""
    high = f" {'<' if hi_open else '<='} {hi}" if hi is not None else ""
    return ConfigError(f"config field {name} = {value!r} is out of range (allowed: {low}{name}{high})")


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """value as an int in [lo, hi]; a ConfigError naming the field and the range otherwise (booleans, fractions,
    strings and NaN are not integers)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field {name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _out_of_range(name, value, lo, hi, False, False)
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> float:
    """value as a finite float in the range ((lo, or [lo, ...; hi likewise); ConfigError naming field and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config field {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"config field {name} must be finite, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _out_of_range(name, value, lo, hi, lo_open, hi_open)
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise _out_of_range(name, value, lo, hi, lo_open, hi_open)
    return value


def _int(d: dict, key: str, lo: int | None = None, hi: int | None = None, default=_MISSING, *,
         where: str = "") -> int:
    """d[key] range-checked (check_int); `default` when absent or null (missing and no default: ConfigError)."""
    if d.get(key) is None:
        if default is _MISSING:
            raise ConfigError(f"config field {where}{key} is missing")
        return default
    return check_int(where + key, d[key], lo, hi)


def _float(d: dict, key: str, lo: float | None = None, hi: float | None = None, default=_MISSING, *,
           where: str = "", lo_open: bool = False, hi_open: bool = False) -> float:
    if d.get(key) is None:
        if default is _MISSING:
            raise ConfigError(f"config field {where}{key} is missing")
        return default
    return check_float(where + key, d[key], lo, hi, lo_open=lo_open, hi_open=hi_open)


def _dict(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"config field {name} must be a JSON object, got {type(value).__name__}")
    return value


def _rope_entry(d: dict, where: str) -> dict:
    d = _dict(d, where)
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    unknown = set(d) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"}
    if unknown:
        raise ConfigError(f"{where}: unsupported RoPE parameters {sorted(unknown)}")
    if "rope_theta" not in d:
        raise ConfigError(f"{where}: rope_theta is missing")
    factor = _float(d, "factor", 0.0, None, 1.0, where=where + ".", lo_open=True)
    if rope_type == "default" and factor != 1.0:
        raise ConfigError(f"{where}: a 'factor' needs rope_type 'linear' or 'proportional'")
    partial = _float(d, "partial_rotary_factor", 0.0, 1.0, 1.0, where=where + ".", lo_open=True)
    if rope_type != "proportional" and partial != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor={partial} needs rope_type 'proportional' (only "
                          "proportional RoPE rotates part of the head here)")
    return {
        "rope_type": rope_type,
        "rope_theta": _float(d, "rope_theta", 0.0, None, where=where + ".", lo_open=True),
        "partial_rotary_factor": partial,
        "factor": factor,
    }


def last_cache_owner(layer_types: list[str], num_kv_shared_layers: int, kind: str) -> int | None:
    """KV sharing: the last `num_kv_shared_layers` layers compute no keys/values of their own; each reads those of
    the last earlier layer of its type, the one this returns (None when no layer of that type owns a cache)."""
    first_shared = len(layer_types) - num_kv_shared_layers
    return next((j for j in range(first_shared - 1, -1, -1) if layer_types[j] == kind), None)


@dataclass
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_types: list[str]
    layer_head_dims: list[int]
    layer_kv_heads: list[int]
    rope: dict[str, dict]  # per layer type
    sliding_window: int
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    use_bidirectional_attention: str | None = None
    # With use_bidirectional_attention="vision": Gemma 4 lets an image's tokens see each other on sliding layers
    # only, within the window; the 12B (gemma4_unified) on every layer, whatever the window (as Gemma 3).
    vision_blocks_on_all_layers: bool = False
    pad_token_id: int = 0
    max_position_embeddings: int = 131072
    # Gemma 3 conventions expressed as configuration of the same decoder.
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): 1 for Gemma 3, 0 for Gemma 4
    attention_scale: float = 1.0  # Gemma 4 relies on q/k norms (scale 1); Gemma 3 uses query_pre_attn_scalar**-0.5
    use_value_norm: bool = True
    use_layer_scalar: bool = True

    # ---- derived per-layer facts -------------------------------------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_producer(self, layer: int) -> int:
        """Index of the layer whose keys/values `layer` attends over (itself unless KV-shared).

        A shared layer reuses the last non-shared layer of the same type (transformers' kv_sharing_modes)."""
        if layer < self.first_kv_shared_layer:
            return layer
        kind = self.layer_types[layer]
        try:
            return self.last_kv_layer(kind)
        except ConfigError:
            raise ConfigError(f"layer {layer} ({kind}) is KV-shared but no earlier {kind} layer produces KV") from None

    def last_kv_layer(self, kind: str) -> int:
        """The last layer of type `kind` with a cache of its own: the KV that shared layers and MTP drafters read
        (transformers' kv_sharing_modes "store")."""
        layer = last_cache_owner(self.layer_types, self.num_kv_shared_layers, kind)
        if layer is None:
            raise ConfigError(f"no {kind} layer owns a KV cache")
        return layer

    def is_kv_shared(self, layer: int) -> bool:
        return layer >= self.first_kv_shared_layer

    def mlp_width(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_shared(layer)
        return self.intermediate_size * (2 if wide else 1)

    def has_value_proj(self, layer: int) -> bool:
        return not (self.attention_k_eq_v and self.layer_types[layer] == FULL)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "TextConfig":
        """Parse and range-check a text config; `where` prefixes field names in errors ("text_config.")."""
        model_type = d.get("model_type", "gemma4_text")
        if model_type not in SUPPORTED_TEXT_TYPES:
            raise ConfigError(
                f"text model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_TEXT_TYPES)})"
            )
        if model_type == "gemma3_text":
            return _parse_gemma3(dict(d), where)
        return _parse_gemma4(dict(d), where, unified=model_type == "gemma4_unified_text")


def _check_activation(d: dict) -> None:
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"hidden_activation {act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")


def _check_unknown(d: dict, known: set[str]) -> None:
    """Unknown fields that are set to something meaningful are errors; null/false/0 ones are harmless."""
    bad = {k: v for k, v in d.items() if k not in known and k not in _IGNORED_KEYS and v not in (None, False, 0, [], {})}
    if bad:
        raise ConfigError(f"unsupported config fields: {bad}")


def _bool(d: dict, key: str, default: bool, where: str) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool) and value not in (0, 1):
        raise ConfigError(f"config field {where}{key} must be true or false, got {value!r}")
    return bool(value)


def _shared_fields(d: dict, where: str) -> dict:
    """TextConfig fields that Gemma 4 and Gemma 3 configs spell and mean the same way, range-checked."""
    vocab = _int(d, "vocab_size", 1, MAX_VOCAB_SIZE, where=where)
    softcap = d.get("final_logit_softcapping")
    return dict(
        vocab_size=vocab,
        hidden_size=_int(d, "hidden_size", 1, MAX_HIDDEN_SIZE, where=where),
        intermediate_size=_int(d, "intermediate_size", 1, MAX_INTERMEDIATE_SIZE, where=where),
        sliding_window=_int(d, "sliding_window", 1, MAX_POSITIONS, where=where),
        rms_norm_eps=_float(d, "rms_norm_eps", 0.0, 1.0, 1e-6, where=where, lo_open=True),
        final_logit_softcapping=None if not softcap else _float(d, "final_logit_softcapping", 0.0, None,
                                                                where=where, lo_open=True),
        tie_word_embeddings=_bool(d, "tie_word_embeddings", True, where),
        attention_bias=_bool(d, "attention_bias", False, where),
        pad_token_id=_int(d, "pad_token_id", 0, vocab - 1, 0, where=where),
    )


_GEMMA4_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "per_layer_config",
    "hidden_activation", "rms_norm_eps", "rope_parameters", "attention_bias", "sliding_window", "layer_types",
    "final_logit_softcapping", "use_bidirectional_attention", "vocab_size_per_layer_input",
    "hidden_size_per_layer_input", "attention_k_eq_v", "num_kv_shared_layers", "enable_moe_block",
    "use_double_wide_mlp", "num_experts", "top_k_experts", "moe_intermediate_size", "expert_intermediate_size",
}


def _layer_types(d: dict, n_layers: int, default_pattern: int, where: str) -> list[str]:
    layer_types = d.get("layer_types")
    if not layer_types:
        return [FULL if (i + 1) % default_pattern == 0 else SLIDING for i in range(n_layers)]
    if not isinstance(layer_types, list):
        raise ConfigError(f"config field {where}layer_types must be a list, got {type(layer_types).__name__}")
    if len(layer_types) != n_layers:
        raise ConfigError(f"{where}layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
    for t in layer_types:
        if t not in (SLIDING, FULL):
            raise ConfigError(f"{where}layer_types: layer type {t!r} is not supported ({SLIDING!r} or {FULL!r})")
    return list(layer_types)


def _head_dim(d: dict, key: str, default, where: str) -> int:
    value = _int(d, key, 2, MAX_HEAD_DIM, default, where=where)
    if value % 2:
        raise ConfigError(f"config field {where}{key} = {value} must be even (RoPE rotates pairs)")
    return value


# The 12B's decoder (gemma4_unified_text) is Gemma 4's without per-layer embeddings and MoE.
_NOT_IN_UNIFIED = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
                   "top_k_experts", "moe_intermediate_size")


def _parse_gemma4(d: dict, where: str = "", unified: bool = False) -> TextConfig:
    _check_unknown(d, _GEMMA4_KEYS)
    if unified:
        bad = {k: d[k] for k in _NOT_IN_UNIFIED if d.get(k) not in (None, False, 0)}
        if bad:
            raise ConfigError(f"gemma4_unified_text has no per-layer embeddings or MoE, but the config sets {bad}")
        # transformers' Gemma4UnifiedTextConfig defaults: vision tokens attend bidirectionally, 256K positions
        d.setdefault("use_bidirectional_attention", "vision")
        d.setdefault("max_position_embeddings", 262144)
    _check_activation(d)
    n_layers = _int(d, "num_hidden_layers", 1, MAX_LAYERS, where=where)
    layer_types = _layer_types(d, n_layers, 6, where)
    if layer_types[-1] != FULL:
        # transformers forces the last layer to full attention (with a warning); do the same, loudly documented.
        layer_types[-1] = FULL

    head_dim = _head_dim(d, "head_dim", _MISSING, where)
    n_heads = _int(d, "num_attention_heads", 1, MAX_HEADS, where=where)
    kv_heads = _int(d, "num_key_value_heads", 1, n_heads, where=where)
    k_eq_v = _bool(d, "attention_k_eq_v", False, where)
    head_dims = [head_dim] * n_layers
    kv = [kv_heads] * n_layers
    if d.get("per_layer_config"):
        # As in transformers, a per_layer_config table takes precedence over global_head_dim & co.
        for key, overrides in _dict(d["per_layer_config"], where + "per_layer_config").items():
            overrides = _dict(overrides, f"{where}per_layer_config[{key}]")
            if str(key).isdigit():
                targets = [int(key)]
            elif key in (SLIDING, FULL):
                targets = [i for i, t in enumerate(layer_types) if t == key]
            else:
                raise ConfigError(f"per_layer_config key {key!r} is neither a layer index nor a layer type")
            unknown = set(overrides) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"per_layer_config[{key}] overrides unsupported fields {sorted(unknown)}")
            for i in targets:
                if not 0 <= i < n_layers:
                    raise ConfigError(f"per_layer_config names layer {i}, but the model has {n_layers} layers")
                name = f"{where}per_layer_config[{key}]."
                head_dims[i] = _head_dim(overrides, "head_dim", head_dims[i], name)
                kv[i] = _int(overrides, "num_key_value_heads", 1, n_heads, kv[i], where=name)
    else:
        # Google's spelling; same resolution as transformers' Gemma4TextConfig.__post_init__.
        global_head_dim = _head_dim(d, "global_head_dim", 512, where) if d.get("global_head_dim") else 512
        global_kv = _int(d, "num_global_key_value_heads", 1, n_heads, None, where=where)
        for i, t in enumerate(layer_types):
            if t == FULL:
                head_dims[i] = global_head_dim
                if global_kv is not None and k_eq_v:
                    kv[i] = global_kv

    for i in range(n_layers):
        if n_heads % kv[i]:
            raise ConfigError(f"layer {i}: {n_heads} query heads are not a multiple of {kv[i]} KV heads")

    bidir = d.get("use_bidirectional_attention")
    if bidir not in (None, "vision"):
        raise ConfigError(f"use_bidirectional_attention={bidir!r} is not supported (only null or 'vision')")

    rope_params = _dict(d.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    }, where + "rope_parameters")
    rope = {t: _rope_entry(rope_params.get(t) or {}, f"{where}rope_parameters[{t}]") for t in set(layer_types)}

    moe = _bool(d, "enable_moe_block", False, where)
    num_experts = top_k = moe_width = 0
    if moe:
        num_experts = _int(d, "num_experts", 1, MAX_EXPERTS, where=where)
        top_k = _int(d, "top_k_experts", 1, num_experts, where=where)
        width_key = next((k for k in ("moe_intermediate_size", "expert_intermediate_size") if d.get(k) is not None),
                         "moe_intermediate_size")
        if d.get(width_key) is None:
            raise ConfigError(f"{where}enable_moe_block is set but moe_intermediate_size is missing")
        moe_width = _int(d, width_key, 1, MAX_INTERMEDIATE_SIZE, where=where)
    ple = _int(d, "hidden_size_per_layer_input", 0, MAX_HIDDEN_SIZE, 0, where=where)
    ple_vocab = _int(d, "vocab_size_per_layer_input", 1, MAX_VOCAB_SIZE, 0, where=where) if ple else 0
    if ple and not ple_vocab:
        raise ConfigError(f"{where}hidden_size_per_layer_input is set but vocab_size_per_layer_input is missing")
    n_shared = _int(d, "num_kv_shared_layers", 0, n_layers - 1, 0, where=where)

    cfg = TextConfig(
        model_type="gemma4_unified_text" if unified else "gemma4_text",
        **_shared_fields(d, where),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        layer_types=layer_types,
        layer_head_dims=head_dims,
        layer_kv_heads=kv,
        rope=rope,
        attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=n_shared,
        use_double_wide_mlp=_bool(d, "use_double_wide_mlp", False, where),
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=ple_vocab,
        enable_moe_block=moe,
        num_experts=num_experts,
        top_k_experts=top_k,
        moe_intermediate_size=moe_width,
        use_bidirectional_attention=bidir,
        vision_blocks_on_all_layers=unified and bidir == "vision",
        max_position_embeddings=_int(d, "max_position_embeddings", 1, MAX_POSITIONS, 131072, where=where),
    )
    for i in range(n_layers):
        cfg.kv_producer(i)  # validates KV sharing
    return cfg


_GEMMA3_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_local_base_freq", "rope_scaling", "rope_parameters", "attention_bias", "sliding_window",
    "sliding_window_pattern", "layer_types", "final_logit_softcapping", "query_pre_attn_scalar",
    "use_bidirectional_attention", "_sliding_window_pattern",
}


def _parse_gemma3(d: dict, where: str = "") -> TextConfig:
    _check_unknown(d, _GEMMA3_KEYS)
    _check_activation(d)
    if d.get("use_bidirectional_attention"):
        raise ConfigError("gemma3_text with use_bidirectional_attention is not supported")
    n_layers = _int(d, "num_hidden_layers", 1, MAX_LAYERS, where=where)
    pattern_key = "sliding_window_pattern" if d.get("sliding_window_pattern") is not None else "_sliding_window_pattern"
    pattern = _int(d, pattern_key, 1, MAX_LAYERS, 6, where=where)
    layer_types = _layer_types(d, n_layers, pattern, where)
    head_dim = _head_dim(d, "head_dim", _MISSING, where)
    n_heads = _int(d, "num_attention_heads", 1, MAX_HEADS, where=where)
    kv = _int(d, "num_key_value_heads", 1, n_heads, where=where)
    if n_heads % kv:
        raise ConfigError(f"{where}num_attention_heads={n_heads} is not a multiple of num_key_value_heads={kv}")
    if d.get("rope_parameters"):
        rp = _dict(d["rope_parameters"], where + "rope_parameters")
        rope = {t: _rope_entry(rp.get(t) or {}, f"{where}rope_parameters[{t}]") for t in set(layer_types)}
    else:
        scaling = _dict(d.get("rope_scaling") or {}, where + "rope_scaling")
        full = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                "rope_theta": d.get("rope_theta", 1000000.0)}
        if "factor" in scaling:
            full["factor"] = scaling["factor"]
        rope = {FULL: _rope_entry(full, where + "rope_scaling"),
                SLIDING: _rope_entry({"rope_theta": d.get("rope_local_base_freq", 10000.0)},
                                     where + "rope_local_base_freq")}
    return TextConfig(
        model_type="gemma3_text",
        **_shared_fields(d, where),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        layer_types=layer_types,
        layer_head_dims=[head_dim] * n_layers,
        layer_kv_heads=[kv] * n_layers,
        rope=rope,
        max_position_embeddings=_int(d, "max_position_embeddings", 1, MAX_POSITIONS, 32768, where=where),
        norm_offset=1.0,
        attention_scale=_float(d, "query_pre_attn_scalar", 0.0, None, float(head_dim), where=where,
                               lo_open=True) ** -0.5,
        use_value_norm=False,
        use_layer_scalar=False,
    )


def _token_ids(d: dict, key: str, where: str = "") -> list[int]:
    """A token id or list of them (eos_token_id). Ids past the vocabulary are allowed (shrunk synthetic configs
    keep the published ids): such a token is never produced, so it does nothing."""
    value = d.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [check_int(f"{where}{key}", v, 0, MAX_VOCAB_SIZE - 1) for v in values]


@dataclass
class ModelConfig:
    """A whole checkpoint: the text decoder plus optional vision/audio towers and multimodal token ids."""

    text: TextConfig
    vision: dict | None = None  # raw HF vision_config; parsed by mlx_gemma4.vision
    audio: dict | None = None  # raw HF audio_config; parsed by mlx_gemma4.audio
    image_token_id: int | None = None
    video_token_id: int | None = None
    audio_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    boa_token_id: int | None = None
    eoa_token_id: int | None = None
    vision_soft_tokens_per_image: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization: dict | None = None
    raw: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.raw.get("model_type", self.text.model_type)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no model_type; is this a Gemma 4 checkpoint?")
        quant = d.get("quantization")
        if quant is not None:
            _dict(quant, "quantization")
        if model_type in DRAFTER_TYPES:
            raise ConfigError(f"this is a {model_type} checkpoint: an MTP drafter, not a model of its own; load it "
                              "with load_drafter(path) (or --draft-model) next to its target model")
        if model_type in ("gemma4", "gemma3", "gemma4_unified"):
            if "text_config" not in d:
                raise ConfigError(f"{model_type} config has no text_config")
            text_d = dict(_dict(d["text_config"], "text_config"))
            text_d.setdefault("model_type", model_type + "_text")
            text_d.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
            text = TextConfig.from_dict(text_d, "text_config.")
            eos_ids = _token_ids(d, "eos_token_id") or _token_ids(text_d, "eos_token_id", "text_config.")
            for key in ("vision_config", "audio_config"):
                if d.get(key) is not None:
                    _dict(d[key], key)

            def token(*keys):
                key = next((k for k in keys if d.get(k) is not None), keys[0])
                return _int(d, key, 0, MAX_VOCAB_SIZE - 1, None)

            return cls(
                text=text,
                vision=d.get("vision_config"),
                audio=d.get("audio_config"),
                image_token_id=token("image_token_id", "image_token_index"),
                video_token_id=token("video_token_id"),
                audio_token_id=token("audio_token_id"),
                boi_token_id=token("boi_token_id"),
                eoi_token_id=token("eoi_token_id"),
                boa_token_id=token("boa_token_id"),
                eoa_token_id=token("eoa_token_id", "eoa_token_index"),
                vision_soft_tokens_per_image=_int(d, "vision_soft_tokens_per_image", 1, 1 << 16, None),
                eos_token_ids=eos_ids,
                quantization=quant,
                raw=d,
            )
        if model_type in SUPPORTED_TEXT_TYPES:
            text = TextConfig.from_dict(d)
            return cls(text=text, eos_token_ids=_token_ids(d, "eos_token_id"), quantization=quant, raw=d)
        raise ConfigError(
            f"model_type {model_type!r} is not a Gemma 4 checkpoint (supported: gemma4, gemma4_text, gemma4_unified, "
            "gemma4_unified_text, and the Gemma 3 text subset gemma3_text)"
        )


def read_config_json(path: str | Path) -> dict:
    """The JSON object in `config.json` of a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    return read_json(file, ConfigError, MAX_CONFIG_BYTES)


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    return ModelConfig.from_dict(read_config_json(path))

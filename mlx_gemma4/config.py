"""Parse Hugging Face `config.json` files for Gemma 4 (and the Gemma 3 text subset) into dataclasses.

Two spellings of the per-layer-type attention geometry exist in the wild:
  * Google's published files: `global_head_dim` / `num_global_key_value_heads`;
  * files saved by transformers >= 5.2x: a `per_layer_config` table {layer index: {head_dim, num_key_value_heads}}.
Both resolve to the same per-layer lists (`TextConfig.layer_head_dims`, `TextConfig.layer_kv_heads`).

Anything the decoder does not implement is an error naming the field, never a silent default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

SUPPORTED_TEXT_TYPES = ("gemma4_text", "gemma3_text", "gemma4_unified_text")
DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
SUPPORTED_ROPE_TYPES = ("default", "proportional", "linear")

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


class ConfigError(ValueError):
    """A checkpoint config this package cannot run faithfully."""


def _rope_entry(d: dict, where: str) -> dict:
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    unknown = set(d) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"}
    if unknown:
        raise ConfigError(f"{where}: unsupported RoPE parameters {sorted(unknown)}")
    if "rope_theta" not in d:
        raise ConfigError(f"{where}: rope_theta is missing")
    factor = float(d.get("factor", 1.0))
    if rope_type == "default" and factor != 1.0:
        raise ConfigError(f"{where}: a 'factor' needs rope_type 'linear' or 'proportional'")
    return {
        "rope_type": rope_type,
        "rope_theta": float(d["rope_theta"]),
        "partial_rotary_factor": float(d.get("partial_rotary_factor", 1.0)),
        "factor": factor,
    }


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
        for j in range(self.first_kv_shared_layer - 1, -1, -1):
            if self.layer_types[j] == kind:
                return j
        raise ConfigError(f"no {kind} layer owns a KV cache")

    def is_kv_shared(self, layer: int) -> bool:
        return layer >= self.first_kv_shared_layer

    def mlp_width(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_shared(layer)
        return self.intermediate_size * (2 if wide else 1)

    def has_value_proj(self, layer: int) -> bool:
        return not (self.attention_k_eq_v and self.layer_types[layer] == FULL)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        model_type = d.get("model_type", "gemma4_text")
        if model_type not in SUPPORTED_TEXT_TYPES:
            raise ConfigError(
                f"text model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_TEXT_TYPES)})"
            )
        if model_type == "gemma3_text":
            return _parse_gemma3(dict(d))
        return _parse_gemma4(dict(d), unified=model_type == "gemma4_unified_text")


def _require(d: dict, key: str, kind=int):
    if d.get(key) is None:
        raise ConfigError(f"config field {key!r} is missing")
    try:
        return kind(d[key])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config field {key!r} has an invalid value {d[key]!r}") from e


def _check_activation(d: dict) -> None:
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"hidden_activation {act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")


def _check_unknown(d: dict, known: set[str]) -> None:
    """Unknown fields that are set to something meaningful are errors; null/false/0 ones are harmless."""
    bad = {k: v for k, v in d.items() if k not in known and k not in _IGNORED_KEYS and v not in (None, False, 0, [], {})}
    if bad:
        raise ConfigError(f"unsupported config fields: {bad}")


def _shared_fields(d: dict) -> dict:
    """TextConfig fields that Gemma 4 and Gemma 3 configs spell and mean the same way."""
    return dict(
        vocab_size=_require(d, "vocab_size"),
        hidden_size=_require(d, "hidden_size"),
        intermediate_size=_require(d, "intermediate_size"),
        sliding_window=_require(d, "sliding_window"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=d.get("final_logit_softcapping"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bool(d.get("attention_bias", False)),
        pad_token_id=int(d.get("pad_token_id") or 0),
    )


_GEMMA4_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "per_layer_config",
    "hidden_activation", "rms_norm_eps", "rope_parameters", "attention_bias", "sliding_window", "layer_types",
    "final_logit_softcapping", "use_bidirectional_attention", "vocab_size_per_layer_input",
    "hidden_size_per_layer_input", "attention_k_eq_v", "num_kv_shared_layers", "enable_moe_block",
    "use_double_wide_mlp", "num_experts", "top_k_experts", "moe_intermediate_size", "expert_intermediate_size",
}


# The 12B's decoder (gemma4_unified_text) is Gemma 4's without per-layer embeddings and MoE.
_NOT_IN_UNIFIED = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
                   "top_k_experts", "moe_intermediate_size")


def _parse_gemma4(d: dict, unified: bool = False) -> TextConfig:
    _check_unknown(d, _GEMMA4_KEYS)
    if unified:
        bad = {k: d[k] for k in _NOT_IN_UNIFIED if d.get(k) not in (None, False, 0)}
        if bad:
            raise ConfigError(f"gemma4_unified_text has no per-layer embeddings or MoE, but the config sets {bad}")
        # transformers' Gemma4UnifiedTextConfig defaults: vision tokens attend bidirectionally, 256K positions
        d.setdefault("use_bidirectional_attention", "vision")
        d.setdefault("max_position_embeddings", 262144)
    _check_activation(d)
    n_layers = _require(d, "num_hidden_layers")
    layer_types = list(d.get("layer_types") or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)])
    if len(layer_types) != n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
    for t in set(layer_types) - {SLIDING, FULL}:
        raise ConfigError(f"layer type {t!r} is not supported")
    if layer_types[-1] != FULL:
        # transformers forces the last layer to full attention (with a warning); do the same, loudly documented.
        layer_types[-1] = FULL

    head_dim = _require(d, "head_dim")
    kv_heads = _require(d, "num_key_value_heads")
    k_eq_v = bool(d.get("attention_k_eq_v", False))
    head_dims = [head_dim] * n_layers
    kv = [kv_heads] * n_layers
    if d.get("per_layer_config"):
        # As in transformers, a per_layer_config table takes precedence over global_head_dim & co.
        for key, overrides in d["per_layer_config"].items():
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
                head_dims[i] = int(overrides.get("head_dim", head_dims[i]))
                kv[i] = int(overrides.get("num_key_value_heads", kv[i]))
    else:
        # Google's spelling; same resolution as transformers' Gemma4TextConfig.__post_init__.
        global_head_dim = int(d.get("global_head_dim") or 512)
        global_kv = d.get("num_global_key_value_heads")
        for i, t in enumerate(layer_types):
            if t == FULL:
                head_dims[i] = global_head_dim
                if global_kv is not None and k_eq_v:
                    kv[i] = int(global_kv)

    n_heads = _require(d, "num_attention_heads")
    for i in range(n_layers):
        if n_heads % kv[i]:
            raise ConfigError(f"layer {i}: {n_heads} query heads are not a multiple of {kv[i]} KV heads")

    bidir = d.get("use_bidirectional_attention")
    if bidir not in (None, "vision"):
        raise ConfigError(f"use_bidirectional_attention={bidir!r} is not supported (only null or 'vision')")

    rope_params = d.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    }
    rope = {t: _rope_entry(rope_params.get(t) or {}, f"rope_parameters[{t}]") for t in set(layer_types)}

    moe = bool(d.get("enable_moe_block", False))
    if moe:
        for key in ("num_experts", "top_k_experts"):
            _require(d, key)
        if d.get("moe_intermediate_size") is None and d.get("expert_intermediate_size") is None:
            raise ConfigError("enable_moe_block is set but moe_intermediate_size is missing")
    ple = int(d.get("hidden_size_per_layer_input") or 0)
    n_shared = int(d.get("num_kv_shared_layers") or 0)
    if not 0 <= n_shared < n_layers:
        raise ConfigError(f"num_kv_shared_layers={n_shared} must be in [0, {n_layers})")

    cfg = TextConfig(
        model_type="gemma4_unified_text" if unified else "gemma4_text",
        **_shared_fields(d),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        layer_types=layer_types,
        layer_head_dims=head_dims,
        layer_kv_heads=kv,
        rope=rope,
        attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=n_shared,
        use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or 0) if ple else 0,
        enable_moe_block=moe,
        num_experts=int(d.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(d.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(d.get("moe_intermediate_size") or d.get("expert_intermediate_size") or 0) if moe else 0,
        use_bidirectional_attention=bidir,
        vision_blocks_on_all_layers=unified and bidir == "vision",
        max_position_embeddings=int(d.get("max_position_embeddings") or 131072),
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


def _parse_gemma3(d: dict) -> TextConfig:
    _check_unknown(d, _GEMMA3_KEYS)
    _check_activation(d)
    if d.get("use_bidirectional_attention"):
        raise ConfigError("gemma3_text with use_bidirectional_attention is not supported")
    n_layers = _require(d, "num_hidden_layers")
    layer_types = d.get("layer_types")
    if not layer_types:
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
    layer_types = list(layer_types)
    if len(layer_types) != n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
    head_dim = _require(d, "head_dim")
    kv = _require(d, "num_key_value_heads")
    if d.get("rope_parameters"):
        rp = d["rope_parameters"]
        rope = {t: _rope_entry(rp[t], f"rope_parameters[{t}]") for t in set(layer_types)}
    else:
        scaling = d.get("rope_scaling") or {}
        full = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                "rope_theta": d.get("rope_theta", 1000000.0)}
        if "factor" in scaling:
            full["factor"] = scaling["factor"]
        rope = {FULL: _rope_entry(full, "rope_scaling"),
                SLIDING: _rope_entry({"rope_theta": d.get("rope_local_base_freq", 10000.0)}, "rope_local_base_freq")}
    return TextConfig(
        model_type="gemma3_text",
        **_shared_fields(d),
        num_hidden_layers=n_layers,
        num_attention_heads=_require(d, "num_attention_heads"),
        layer_types=layer_types,
        layer_head_dims=[head_dim] * n_layers,
        layer_kv_heads=[kv] * n_layers,
        rope=rope,
        max_position_embeddings=int(d.get("max_position_embeddings") or 32768),
        norm_offset=1.0,
        attention_scale=float(d.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        use_value_norm=False,
        use_layer_scalar=False,
    )


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
        eos = d.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        quant = d.get("quantization")
        if model_type in DRAFTER_TYPES:
            raise ConfigError(f"this is a {model_type} checkpoint: an MTP drafter, not a model of its own; load it "
                              "with load_drafter(path) (or --draft-model) next to its target model")
        if model_type in ("gemma4", "gemma3", "gemma4_unified"):
            if not isinstance(d.get("text_config"), dict):
                raise ConfigError(f"{model_type} config has no text_config")
            text_d = dict(d["text_config"])
            text_d.setdefault("model_type", model_type + "_text")
            text_d.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
            text = TextConfig.from_dict(text_d)
            if not eos_ids:
                te = text_d.get("eos_token_id")
                eos_ids = [te] if isinstance(te, int) else list(te or [])
            return cls(
                text=text,
                vision=d.get("vision_config"),
                audio=d.get("audio_config"),
                image_token_id=d.get("image_token_id", d.get("image_token_index")),
                video_token_id=d.get("video_token_id"),
                audio_token_id=d.get("audio_token_id"),
                boi_token_id=d.get("boi_token_id"),
                eoi_token_id=d.get("eoi_token_id"),
                boa_token_id=d.get("boa_token_id"),
                eoa_token_id=d.get("eoa_token_id", d.get("eoa_token_index")),
                vision_soft_tokens_per_image=d.get("vision_soft_tokens_per_image"),
                eos_token_ids=eos_ids,
                quantization=quant,
                raw=d,
            )
        if model_type in SUPPORTED_TEXT_TYPES:
            return cls(text=TextConfig.from_dict(d), eos_token_ids=eos_ids, quantization=quant, raw=d)
        raise ConfigError(
            f"model_type {model_type!r} is not a Gemma 4 checkpoint (supported: gemma4, gemma4_text, gemma4_unified, "
            "gemma4_unified_text, and the Gemma 3 text subset gemma3_text)"
        )


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e
    return ModelConfig.from_dict(d)

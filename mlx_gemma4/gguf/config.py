"""GGUF metadata -> a Hugging Face `config.json`-style dict (gemma3_text / gemma4_text)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from ..limits import check_block_count
from .names import check_architecture
from .reader import GGUFFile


def _meta(gf: GGUFFile, key: str, default: Any = ...) -> Any:
    full = f"{gf.architecture}.{key}"
    if full in gf.metadata:
        value = gf.metadata[full]
        return value.tolist() if isinstance(value, np.ndarray) else value
    if default is ...:
        raise ValueError(f"{gf.path}: GGUF metadata {full!r} is missing")
    return default


def _first(value):
    return value[0] if isinstance(value, list) else value


def _token_ids(gf: GGUFFile) -> dict[str, Any]:
    md = gf.metadata
    ids = {}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in md:
            ids[hf_key] = int(md[f"tokenizer.ggml.{key}"])
    return ids


def _common_config(gf: GGUFFile) -> dict[str, Any]:
    embed = gf.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{gf.path}: the GGUF file has no token_embd.weight tensor")
    config = {
        "vocab_size": embed.shape[0],
        "hidden_size": int(_meta(gf, "embedding_length")),
        "num_hidden_layers": check_block_count(_meta(gf, "block_count"), gf.tensors, gf.path),
        "num_attention_heads": int(_first(_meta(gf, "attention.head_count"))),
        "rms_norm_eps": float(_meta(gf, "attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(_meta(gf, "context_length", 131072)),
        "sliding_window": int(_meta(gf, "attention.sliding_window")),
        "final_logit_softcapping": _meta(gf, "final_logit_softcapping", None),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    }
    return {**config, **_token_ids(gf)}


def _gemma3_config(gf: GGUFFile) -> dict[str, Any]:
    config = _common_config(gf)
    n_layers = config["num_hidden_layers"]
    head_dim = int(_meta(gf, "attention.key_length", 256))
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3) hard-codes a 5:1 sliding:full pattern, a 10k local RoPE base and
    # the attention scale: 1/sqrt(head_dim), except the 62-layer 27B which uses 1/sqrt(hidden/heads).
    pattern = _meta(gf, "attention.sliding_window_pattern", 6)
    if not isinstance(pattern, (list, int)) or isinstance(pattern, bool) or (isinstance(pattern, int) and pattern < 1):
        raise ConfigError(f"{gf.path}: GGUF metadata attention.sliding_window_pattern = {pattern!r} must be a "
                          "positive integer or a list of per-layer flags")
    if isinstance(pattern, list):
        layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        layer_types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]
    query_pre_attn_scalar = config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else head_dim
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(_meta(gf, "rope.freq_base", 1e6))}
    scaling = _meta(gf, "rope.scaling.type", "none")
    if scaling == "linear":
        full_rope = {**full_rope, "rope_type": "linear", "factor": float(_meta(gf, "rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise ValueError(f"{gf.path}: unsupported RoPE scaling {scaling!r} for gemma3")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **config,
        "intermediate_size": int(_first(_meta(gf, "feed_forward_length"))),
        "num_key_value_heads": int(_first(_meta(gf, "attention.head_count_kv"))),
        "head_dim": head_dim,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "attn_logit_softcapping": None,
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(_meta(gf, "rope.freq_base_swa", 10000.0))},
        },
    }


def _gemma4_config(gf: GGUFFile) -> dict[str, Any]:
    config = _common_config(gf)
    n_layers = config["num_hidden_layers"]
    pattern = _meta(gf, "attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n_layers:
        raise ValueError(f"{gf.path}: gemma4 needs a per-layer attention.sliding_window_pattern of {n_layers} bools")
    layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    full_layers = [i for i, s in enumerate(pattern) if not s]

    head_dim = int(_meta(gf, "attention.key_length_swa"))
    global_head_dim = int(_meta(gf, "attention.key_length"))
    kv_heads = _meta(gf, "attention.head_count_kv")
    if isinstance(kv_heads, list):
        sliding_kv = next((kv_heads[i] for i, s in enumerate(pattern) if s), kv_heads[0])
        global_kv = kv_heads[full_layers[0]] if full_layers else None
    else:
        sliding_kv, global_kv = kv_heads, None
    ffn = _meta(gf, "feed_forward_length")
    intermediate = int(_first(ffn))
    double_wide = isinstance(ffn, list) and any(int(v) == 2 * intermediate for v in ffn)

    # k = v on full layers: llama.cpp's "alternative attention" leaves out attn_v there
    k_eq_v = bool(full_layers) and all(
        f"blk.{i}.attn_v.weight" not in gf.tensors and f"blk.{i}.attn_k.weight" in gf.tensors for i in full_layers)

    # Full layers use "proportional" RoPE: rope_freqs is 1 on the rotated frequency pairs, 1e30 on the rest.
    if "rope_freqs.weight" in gf.tensors:
        rotated_pairs = int(np.sum(gf.tensor("rope_freqs.weight") < 1e10))
        partial_full = rotated_pairs / (global_head_dim // 2)
    else:
        partial_full = int(_meta(gf, "rope.dimension_count", global_head_dim)) / global_head_dim
    sliding_rope: dict[str, Any] = {"rope_type": "default",
                                    "rope_theta": float(_meta(gf, "rope.freq_base_swa", 10000.0))}
    rot_swa = int(_meta(gf, "rope.dimension_count_swa", head_dim))
    if rot_swa != head_dim:
        sliding_rope["partial_rotary_factor"] = rot_swa / head_dim

    n_experts = int(_meta(gf, "expert_count", 0))
    per_layer = int(_meta(gf, "embedding_length_per_layer_input", 0))
    ple = gf.tensors.get("per_layer_token_embd.weight")
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        **config,
        "intermediate_size": intermediate,
        "use_double_wide_mlp": double_wide,
        "num_key_value_heads": int(sliding_kv),
        "num_global_key_value_heads": None if global_kv is None else int(global_kv),
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "attention_k_eq_v": k_eq_v,
        "num_kv_shared_layers": int(_meta(gf, "attention.shared_kv_layers", 0)),
        "layer_types": layer_types,
        "hidden_size_per_layer_input": per_layer,
        "vocab_size_per_layer_input": ple.shape[0] if ple is not None else config["vocab_size"],
        "enable_moe_block": n_experts > 0,
        "num_experts": n_experts or None,
        "top_k_experts": int(_meta(gf, "expert_used_count")) if n_experts else None,
        "moe_intermediate_size": int(_meta(gf, "expert_feed_forward_length")) if n_experts else None,
        "rope_parameters": {
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": partial_full,
                               "rope_theta": float(_meta(gf, "rope.freq_base", 1e6))},
            "sliding_attention": sliding_rope,
        },
    }


def gguf_config(gf: GGUFFile) -> dict[str, Any]:
    """An HF `config.json`-style dict (gemma3_text / gemma4_text) from the file's metadata and tensor shapes."""
    arch = check_architecture(gf)
    return _gemma3_config(gf) if arch == "gemma3" else _gemma4_config(gf)

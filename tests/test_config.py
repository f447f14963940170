"""Config parsing: both spellings, the published configs' full-size trees, unsupported values."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

import checkpoints
from mlx_gemma4.config import ConfigError, ModelConfig, TextConfig, load_config
from mlx_gemma4.loading import build_model

PRESETS = Path(__file__).resolve().parent.parent / "mlx_gemma4" / "presets"
PARAM_COUNTS = json.loads((Path(__file__).parent / "fixtures" / "param_counts.json").read_text())
VARIANTS = ["e2b", "e4b", "26b-a4b", "31b"]


def preset(variant: str) -> dict:
    return json.loads((PRESETS / f"{variant}.json").read_text())


def component(name: str) -> str:
    """Which param_counts.json component a text parameter belongs to."""
    if name.endswith("embed_tokens.weight"):
        return "embed_tokens"
    if "embed_tokens_per_layer" in name:
        return "ple_embed_table"
    if "per_layer_model_projection" in name or "per_layer_projection_norm" in name:
        return "ple_model_projection"
    if "per_layer_input_gate" in name or "per_layer_projection." in name or "post_per_layer_input_norm" in name:
        return "ple_per_layer_gate_proj"
    if "router." in name:
        return "moe_router"
    if "experts." in name:
        return "moe_experts"
    if "self_attn." in name:  # projections and q/k norms
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    if name.endswith("layer_scalar"):
        return "buffers"  # a buffer in transformers, not counted among parameters
    if "norm" in name:
        return "norms_scalars"
    raise AssertionError(f"unclassified parameter {name}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_published_configs_build_full_size_trees_with_exact_parameter_counts(variant):
    model = build_model(ModelConfig.from_dict(preset(variant)))  # lazy: nothing is allocated
    counts: dict[str, int] = {}
    for name, p in tree_flatten(model.language_model.parameters()):
        counts[component(name)] = counts.get(component(name), 0) + p.size
    expected = PARAM_COUNTS[variant]
    assert counts.pop("buffers") == model.config.text.num_hidden_layers
    for comp, n in counts.items():
        assert n == expected[comp], comp
    assert sum(counts.values()) == expected["text_decoder_total(incl. embeddings, excl. encoders)"]


@pytest.mark.parametrize("variant", ["e2b", "26b", "31b"])
def test_both_spellings_resolve_to_the_same_geometry(text_checkpoint, variant):
    a = load_config(text_checkpoint(variant, "published")).text
    b = load_config(text_checkpoint(variant, "per_layer_config")).text
    assert a.layer_head_dims == b.layer_head_dims and a.layer_kv_heads == b.layer_kv_heads
    t = checkpoints.TEXT_VARIANTS[variant]
    full = [i for i, x in enumerate(t["layer_types"]) if x == "full_attention"]
    assert all(a.layer_head_dims[i] == t["global_head_dim"] for i in full)
    if t.get("attention_k_eq_v"):
        assert all(a.layer_kv_heads[i] == t["num_global_key_value_heads"] for i in full)


def test_real_e2b_geometry():
    c = TextConfig.from_dict(preset("e2b")["text_config"])
    assert c.layer_head_dims[4] == 512 and c.layer_head_dims[0] == 256
    assert c.first_kv_shared_layer == 15
    assert c.kv_producer(15) == 13 and c.kv_producer(19) == 14  # sliding -> 13, full -> 14
    assert c.mlp_width(14) == 6144 and c.mlp_width(15) == 12288
    assert c.rope["full_attention"]["partial_rotary_factor"] == 0.25


def test_26b_geometry():
    c = TextConfig.from_dict(preset("26b-a4b")["text_config"])
    assert c.layer_kv_heads[5] == 2 and c.layer_kv_heads[0] == 8
    assert not c.has_value_proj(5) and c.has_value_proj(0)
    assert (c.num_experts, c.top_k_experts, c.moe_intermediate_size) == (128, 8, 704)


@pytest.mark.parametrize("change,message", [
    ({"hidden_activation": "relu"}, "hidden_activation"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1.0}}}, "yarn"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({"some_new_feature": 3}, "some_new_feature"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"per_layer_config": {"4": {"sliding_window": 3}}}, "sliding_window"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_unsupported_values_are_clear_errors(change, message):
    d = copy.deepcopy(preset("e2b"))
    d["text_config"].update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_other_model_type_is_rejected():
    with pytest.raises(ConfigError, match="llama"):
        ModelConfig.from_dict({"model_type": "llama", "hidden_size": 8})


def test_gemma3_text_config_maps_onto_the_same_decoder():
    c = TextConfig.from_dict({
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "query_pre_attn_scalar": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "sliding_window": 512, "sliding_window_pattern": 6, "final_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6})
    assert c.norm_offset == 1.0 and c.attention_scale == 256**-0.5
    assert not c.use_value_norm and not c.use_layer_scalar and c.final_logit_softcapping is None
    assert c.layer_types[5] == "full_attention" and c.layer_types[4] == "sliding_attention"
    assert c.rope["full_attention"]["rope_type"] == "default"

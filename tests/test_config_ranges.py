"""Every config field is range-checked when the config is read: a ConfigError naming the field and its allowed
range, never a ZeroDivisionError / OverflowError at the first request or garbage output. Sampling arguments:
NaN, infinities and negative seeds are refused before anything runs."""

from __future__ import annotations

import copy
import json
import math

import pytest

from mlx_gemma4 import memory
from mlx_gemma4.config import ModelConfig, load_config
from mlx_gemma4.errors import ConfigError
from mlx_gemma4.sample import Sampler, make_logits_processors, make_sampler


def with_value(config: dict, path: str, value) -> dict:
    """A copy of config with the dotted `path` set to value ("text_config.rope_parameters.full_attention.x")."""
    out = copy.deepcopy(config)
    node = out
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return out


# (variant, field path, bad value, text the message must contain)
TEXT_CASES = [
    ("e2b", "text_config.sliding_window", 0, "1 <= text_config.sliding_window"),
    ("e2b", "text_config.num_key_value_heads", 0, "1 <= text_config.num_key_value_heads"),
    ("e2b", "text_config.num_key_value_heads", 16, "text_config.num_key_value_heads <= 8"),
    ("26b-a4b", "text_config.top_k_experts", 0, "1 <= text_config.top_k_experts <= 128"),
    ("26b-a4b", "text_config.top_k_experts", -3, "1 <= text_config.top_k_experts <= 128"),
    ("26b-a4b", "text_config.top_k_experts", 129, "1 <= text_config.top_k_experts <= 128"),
    ("26b-a4b", "text_config.num_experts", 0, "1 <= text_config.num_experts"),
    ("26b-a4b", "text_config.moe_intermediate_size", 0, "1 <= text_config.moe_intermediate_size"),
    ("e2b", "text_config.rms_norm_eps", -1e-6, "0.0 < text_config.rms_norm_eps <= 1.0"),
    ("e2b", "text_config.rms_norm_eps", 0, "0.0 < text_config.rms_norm_eps"),
    ("e2b", "text_config.rms_norm_eps", math.nan, "text_config.rms_norm_eps must be finite"),
    ("e2b", "text_config.rope_parameters.full_attention.partial_rotary_factor", 1.5,
     "0.0 < text_config.rope_parameters[full_attention].partial_rotary_factor <= 1.0"),
    ("e2b", "text_config.rope_parameters.full_attention.partial_rotary_factor", 0,
     "0.0 < text_config.rope_parameters[full_attention].partial_rotary_factor"),
    ("e2b", "text_config.rope_parameters.sliding_attention.partial_rotary_factor", 0.5,
     "needs rope_type 'proportional'"),
    ("e2b", "text_config.rope_parameters.sliding_attention.rope_theta", 0, "rope_theta"),
    ("e2b", "text_config.rope_parameters.sliding_attention.rope_theta", math.inf, "must be finite"),
    ("e2b", "text_config.vocab_size", 10**12, "1 <= text_config.vocab_size <= 16777216"),
    ("e2b", "text_config.vocab_size", 0, "1 <= text_config.vocab_size"),
    ("e2b", "text_config.vocab_size", "262144", "text_config.vocab_size must be an integer"),
    ("e2b", "text_config.hidden_size", 2**40, "text_config.hidden_size <= 65536"),
    ("e2b", "text_config.hidden_size", 1536.5, "text_config.hidden_size must be an integer"),
    ("e2b", "text_config.intermediate_size", -1, "1 <= text_config.intermediate_size"),
    ("e2b", "text_config.num_hidden_layers", 100000, "1 <= text_config.num_hidden_layers <= 1024"),
    ("e2b", "text_config.num_hidden_layers", True, "text_config.num_hidden_layers must be an integer"),
    ("e2b", "text_config.num_attention_heads", 0, "1 <= text_config.num_attention_heads"),
    ("e2b", "text_config.head_dim", 0, "2 <= text_config.head_dim"),
    ("e2b", "text_config.head_dim", 255, "text_config.head_dim = 255 must be even"),
    ("e2b", "text_config.global_head_dim", 10**9, "text_config.global_head_dim <= 4096"),
    ("e2b", "text_config.num_kv_shared_layers", 35, "0 <= text_config.num_kv_shared_layers <= 34"),
    ("e2b", "text_config.hidden_size_per_layer_input", -256, "0 <= text_config.hidden_size_per_layer_input"),
    ("e2b", "text_config.vocab_size_per_layer_input", 0, "1 <= text_config.vocab_size_per_layer_input"),
    ("e2b", "text_config.max_position_embeddings", 0, "1 <= text_config.max_position_embeddings"),
    ("e2b", "text_config.final_logit_softcapping", -30.0, "0.0 < text_config.final_logit_softcapping"),
    ("e2b", "text_config.pad_token_id", 262144, "0 <= text_config.pad_token_id <= 262143"),
    ("e2b", "text_config.layer_types", "sliding_attention", "text_config.layer_types must be a list"),
    ("e2b", "text_config.layer_types", ["global"] * 35, "layer type 'global' is not supported"),
    ("e2b", "text_config.attention_k_eq_v", "yes", "text_config.attention_k_eq_v must be true or false"),
    ("e2b", "text_config.rope_parameters", ["default"], "text_config.rope_parameters must be a JSON object"),
    ("e2b", "text_config", [], "text_config must be a JSON object"),
    ("e2b", "image_token_id", -1, "0 <= image_token_id"),
    ("e2b", "eos_token_id", [1, "x"], "eos_token_id must be an integer"),
    ("e2b", "vision_config.num_key_value_heads", 0, "1 <= vision_config.num_key_value_heads"),
    ("e2b", "vision_config.hidden_size", 0, "1 <= vision_config.hidden_size"),
    ("e2b", "vision_config.num_hidden_layers", 10**6, "vision_config.num_hidden_layers <= 1024"),
    ("e2b", "vision_config.rms_norm_eps", -1.0, "0.0 < vision_config.rms_norm_eps"),
    ("e2b", "vision_config.patch_size", 0, "1 <= vision_config.patch_size"),
    ("e2b", "vision_config.pooling_kernel_size", 0, "1 <= vision_config.pooling_kernel_size"),
    ("e2b", "vision_config.head_dim", 6, "divisible by 4"),
    ("e2b", "audio_config.num_attention_heads", 0, "1 <= audio_config.num_attention_heads"),
    ("e2b", "audio_config.hidden_size", 10**9, "audio_config.hidden_size <= 65536"),
    ("e2b", "audio_config.attention_chunk_size", 0, "1 <= audio_config.attention_chunk_size"),
    ("e2b", "audio_config.conv_kernel_size", 0, "1 <= audio_config.conv_kernel_size"),
    ("e2b", "audio_config.rms_norm_eps", math.nan, "audio_config.rms_norm_eps must be finite"),
    ("e2b", "audio_config.subsampling_conv_channels", [128, 0], "audio_config.subsampling_conv_channels[1]"),
    ("e2b", "audio_config.subsampling_conv_channels", 7, "subsampling_conv_channels must be a list"),
]


def parse_all(config: dict) -> ModelConfig:
    """What load() parses before building anything: the text config, then the towers' configs."""
    from mlx_gemma4.audio import AudioConfig
    from mlx_gemma4.vision import VisionConfig

    parsed = ModelConfig.from_dict(config)
    if parsed.vision is not None:
        VisionConfig.from_dict(parsed.vision)
    if parsed.audio is not None:
        AudioConfig.from_dict(parsed.audio)
    return parsed


@pytest.mark.parametrize("variant,path,value,message", TEXT_CASES,
                         ids=[f"{c[1]}={c[2]!r}"[:60] for c in TEXT_CASES])
def test_out_of_range_field_is_a_config_error(variant, path, value, message):
    config = memory.load_preset(variant)
    parse_all(config)  # the published config is fine
    with pytest.raises(ConfigError) as e:
        parse_all(with_value(config, path, value))
    assert message in str(e.value)
    field = path.split(".")[-1]
    assert field in str(e.value) or field.replace("_", " ") in str(e.value)


def test_gemma3_fields(tmp_path):
    import checkpoints

    config = dict(checkpoints.GEMMA3_TEXT, model_type="gemma3_text", sliding_window=8, head_dim=16,
                  num_hidden_layers=2, layer_types=None, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                  intermediate_size=64, vocab_size=512)
    ModelConfig.from_dict(config)
    for key, value, message in [("sliding_window_pattern", 0, "1 <= sliding_window_pattern"),
                                ("query_pre_attn_scalar", -1.0, "0.0 < query_pre_attn_scalar"),
                                ("num_key_value_heads", 0, "1 <= num_key_value_heads <= 2"),
                                ("rope_theta", math.nan, "must be finite")]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict(dict(config, **{key: value}))


def test_bad_config_fails_at_load_with_the_field(text_checkpoint, tmp_path):
    """The issue's reports: sliding_window=0 and num_key_value_heads=0 loaded and then failed with
    ZeroDivisionError on every request; now loading the checkpoint says which field is wrong."""
    import shutil

    from mlx_gemma4.loading import load

    source = text_checkpoint("e2b")
    for key, value in [("sliding_window", 0), ("num_key_value_heads", 0), ("rms_norm_eps", -1e-6)]:
        bad = tmp_path / key
        shutil.copytree(source, bad)
        config = json.loads((bad / "config.json").read_text())
        config[key] = value
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=f"{key} = "):
            load(bad)


def test_config_file_errors(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ConfigError, match="config.json is not a text"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(tmp_path)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"temperature": math.nan}, ValueError, "temperature must be a finite number"),
    ({"temperature": math.inf}, ValueError, "temperature must be a finite number"),
    ({"temperature": -0.5}, ValueError, "0.0 <= temperature"),
    ({"top_p": math.nan}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "0.0 < top_p <= 1.0"),
    ({"min_p": math.nan}, ValueError, "min_p"),
    ({"min_p": -math.inf}, ValueError, "min_p"),
    ({"top_k": 2.5}, TypeError, "top_k must be an integer"),
    ({"top_k": -1}, ValueError, "0 <= top_k"),
    ({"seed": -1}, ValueError, "0 <= seed <= 18446744073709551615"),
    ({"seed": 2**64}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number"),
])
def test_bad_sampling_arguments_are_refused_up_front(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_sampler(**kwargs)
    Sampler(seed=2**64 - 1, temperature=1.0)  # the largest seed is fine


@pytest.mark.parametrize("penalty", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_bad_repetition_penalty(penalty):
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number with 0.0 < repetition_penalty"):
        make_logits_processors(penalty)


def test_sampling_errors_come_before_any_work(monkeypatch):
    """stream_generate refuses a NaN temperature before prefilling anything (the model is never called)."""
    import numpy as np

    from mlx_gemma4.generate import stream_generate

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the arguments were checked")

    class TextOnly:
        stop_token_ids = [1]

        def prompt_inputs(self, *args, **kwargs):
            return [2, 3, 4], {}

    for kwargs in ({"temperature": math.nan}, {"seed": -1}, {"repetition_penalty": math.nan},
                   {"top_p": np.float64("nan")}):
        with pytest.raises((ValueError, TypeError)):
            next(stream_generate(Untouchable(), TextOnly(), "hi", **kwargs))

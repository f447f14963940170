"""Synthetic checkpoint maker: the tensors it writes are exactly the ones transformers' model has."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import checkpoints
from mlx_gemma4 import cli, memory, synth

import mlx.core as mx


def _tiny_config(variant: str, **text_overrides) -> dict:
    """A full Gemma4Config dict around one of the test suite's tiny text configs (dims multiple of 64)."""
    from transformers import Gemma4TextConfig

    text = Gemma4TextConfig(**dict(checkpoints.TEXT_VARIANTS[variant], **text_overrides)).to_dict()
    return {"model_type": "gemma4", "text_config": text, "vision_config": None, "audio_config": None,
            "tie_word_embeddings": True}


def _transformers_text_shapes(text_config: dict) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

    with torch.device("meta"):
        model = Gemma4TextModel(Gemma4TextConfig(**text_config))
    return {"language_model." + k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", sorted(checkpoints.TEXT_VARIANTS))
def test_param_specs_match_transformers_tiny(variant):
    text = _tiny_config(variant)["text_config"]  # per_layer_config spelling, as transformers saves it
    assert dict(memory.text_param_specs(text)) == _transformers_text_shapes(text)


@pytest.mark.parametrize("variant", memory.VARIANTS)
def test_param_specs_match_transformers_published(variant):
    text = memory.load_preset(variant)["text_config"]  # published spelling (global_head_dim, ...)
    assert dict(memory.text_param_specs(text)) == _transformers_text_shapes(text)


def test_shrink_keeps_pattern_and_kv_sharing():
    e2b = memory.load_preset("e2b")
    ten = memory.text_config_of(synth.shrink_config(e2b, layers=10, vocab=1000))
    assert ten["layer_types"] == (["sliding_attention"] * 4 + ["full_attention"]) * 2
    # 20/35 of 10 layers rounds to 6, but the shared tail must start after a full layer: 5
    assert ten["num_kv_shared_layers"] == 5
    assert ten["vocab_size"] == ten["vocab_size_per_layer_input"] == 1000
    moe = memory.text_config_of(synth.shrink_config(memory.load_preset("26b-a4b"), layers=3))
    assert moe["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert moe["num_kv_shared_layers"] == 0
    assert memory.text_config_of(e2b)["num_hidden_layers"] == 35  # the preset itself is untouched
    with pytest.raises(ValueError, match="--layers"):
        synth.shrink_config(e2b, layers=36)
    with pytest.raises(ValueError, match="--vocab"):
        synth.shrink_config(e2b, vocab=0)


def test_quantized_mlx_checkpoint_roundtrip(tmp_path):
    config = _tiny_config("26b", hidden_size=128, intermediate_size=128, moe_intermediate_size=64, vocab_size=256)
    out = synth.write_checkpoint(config, tmp_path / "q4", bits=4, shard_bytes=100_000, seed=1)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    weights = {}
    for f in files:
        weights.update(mx.load(str(out / f)))
    assert set(weights) == set(index["weight_map"])
    specs = memory.text_param_specs(config["text_config"])
    expected = {}
    for name, shape in specs:
        if memory.is_quantizable(name, shape):
            for key, qshape, _ in memory.quantized_specs(name, shape, 4):
                expected[key] = qshape
        else:
            expected[name] = shape
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    bank = "language_model.layers.0.experts.gate_up_proj"
    assert weights[bank].dtype == mx.uint32
    dense = mx.dequantize(weights[bank], weights[bank + "_scales"], weights[bank + "_biases"],
                          group_size=64, bits=4).astype(mx.float32)
    assert dense.shape == (16, 128, 128)
    assert 0.01 < np.std(np.array(dense)) < 0.04  # N(0, 0.02) values survive quantization
    norm = np.array(weights["language_model.layers.0.input_layernorm.weight"].astype(mx.float32))
    assert abs(norm.mean() - 1) < 0.1 and norm.std() > 0.01
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"] == {"group_size": 64, "bits": 4}
    # the planner's byte count of this checkpoint equals what was written
    assert memory.stored_bytes(specs, 4) == memory.safetensors_bytes(out) == index["metadata"]["total_size"]


def test_hf_checkpoint_loads_in_transformers_without_missing_keys(tmp_path):
    import torch
    from transformers import Gemma4ForConditionalGeneration

    config = _tiny_config("e2b", hidden_size=64, vocab_size=128, vocab_size_per_layer_input=128)
    out = synth.write_checkpoint(config, tmp_path / "hf", fmt="hf")
    model, info = Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sd = model.state_dict()
    q = sd["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert 0.01 < q.std().item() < 0.04
    logits = model(torch.tensor([[2, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()


def test_towers_are_written_when_asked(tmp_path):
    import torch
    from transformers import Gemma4ForConditionalGeneration, Gemma4VisionConfig

    config = _tiny_config("31b", vocab_size=128)
    config["vision_config"] = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, global_head_dim=16, position_embedding_size=64, patch_size=4, pooling_kernel_size=2,
    ).to_dict()
    out = synth.write_checkpoint(config, tmp_path / "towers", fmt="hf", towers=True)
    _, info = Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    keys = json.loads((out / "config.json").read_text())
    assert keys["vision_config"]["hidden_size"] == 32


def test_bad_arguments_are_rejected(tmp_path, capsys):
    config = _tiny_config("31b")
    with pytest.raises(ValueError, match="bf16"):
        synth.write_checkpoint(config, tmp_path / "x", bits=4, fmt="hf")
    with pytest.raises(ValueError, match="bits"):
        synth.write_checkpoint(config, tmp_path / "x", bits=3)
    with pytest.raises(ValueError, match="format"):
        synth.write_checkpoint(config, tmp_path / "x", fmt="gguf")
    assert cli.synth_main(["--variant", "e2b", "--out", str(tmp_path / "y"), "--layers", "99"]) == 1
    assert "--layers" in capsys.readouterr().err


def test_cli_writes_real_dims_with_few_layers(tmp_path, capsys):
    cli.synth_main(["--variant", "e2b", "--out", str(tmp_path / "c"), "--layers", "1", "--vocab", "64", "--bits", "8"])
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    text = config["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["layer_types"]) == (1536, 1, ["full_attention"])
    assert config["vision_config"] is None and config["audio_config"] is None
    header = mx.load(str(tmp_path / "c" / "model.safetensors"))
    q = header["language_model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (8 * 512, 1536 * 8 // 32) and q.dtype == mx.uint32
    n_params = sum(math.prod(s) for _, s in memory.text_param_specs(text))
    assert memory.safetensors_bytes(tmp_path / "c") == memory.stored_bytes(memory.text_param_specs(text), 8)
    assert n_params > 30e6  # one real E2B layer with its per-layer-embedding projection is ~37M parameters

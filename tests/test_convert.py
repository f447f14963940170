"""convert / quantize: converted checkpoints load back, quantization is applied exactly as recorded, logits stay
within measured tolerances of float32, `mixed` keeps the sensitive tensors at 8 bits, and quantizing at load time
equals converting."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma4 import cli
from mlx_gemma4.convert import convert
from mlx_gemma4.loading import MIXED_8BIT, load

PROMPT = "hello world, the cat sat on the mat"

# Measured on the tiny random checkpoints (float32 reference, group size 64), mean KL(ref || quantized) over all
# positions / mean relative error of the dequantized weights:
#   e2b 8-bit: KL 0.0011, weights 0.4%     e2b 4-bit: KL 0.015 (uniform), 0.012 (mixed), weights 7%
#   26b 8-bit: KL 0.0025                   26b 4-bit: KL 0.020 (uniform), 0.017 (mixed)
# Random tiny models amplify weight noise far more than trained ones (max |logit| error 0.33 at 8 bits on
# logits of magnitude 0.7), so the bounds are on the distribution (KL), with ~3x headroom over the measurement.
KL_BOUND = {8: 0.008, 4: 0.06}


def _kl(ref: np.ndarray, other: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(other.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _dequantized_twin(quantized, float_model):
    """float_model with every quantized weight replaced by its dequantized value."""
    weights = []
    for name, m in quantized.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights.append((f"{name}.weight", mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)))
    float_model.load_weights(weights, strict=False)
    return float_model, [name for name, _ in weights]


@pytest.fixture(scope="module")
def reference(chat_checkpoint):
    out = {}
    for variant in ("e2b", "26b"):
        model, processor = load(chat_checkpoint(variant), dtype="float32")
        ids = mx.array([processor.prompt_ids(PROMPT)])
        out[variant] = (ids, np.array(model(ids)))
    return out


@pytest.mark.parametrize("variant", ["e2b", "26b"])
@pytest.mark.parametrize("bits,recipe", [(8, "uniform"), (4, "uniform"), (4, "mixed")])
def test_converted_checkpoint_loads_within_tolerance(chat_checkpoint, reference, tmp_path, variant, bits, recipe):
    src = chat_checkpoint(variant)
    out = convert(src, tmp_path / "q", bits=bits, recipe=recipe, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 64
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()

    model, processor = load(out)
    assert processor is not None and processor.stop_token_ids == [1, 106]
    ids, ref = reference[variant]
    logits = np.array(model(ids))
    # 1) the quantized model computes exactly what its dequantized weights do (packing, scales, names right)
    twin, replaced = _dequantized_twin(model, load(src, dtype="float32")[0])
    assert "language_model.embed_tokens.weight" in replaced and len(replaced) > 10
    np.testing.assert_allclose(logits, np.array(twin(ids)), atol=1e-4, rtol=1e-4)
    # 2) and stays close to float32
    kl = _kl(ref, logits)
    assert 0 < kl < KL_BOUND[bits], kl
    # 3) quantizing at load time gives the same model
    on_load, _ = load(src, quantize=bits, recipe=recipe, dtype="float32")
    np.testing.assert_array_equal(np.array(on_load(ids)), logits)
    assert dict(tree_flatten(on_load.parameters())).keys() == dict(tree_flatten(model.parameters())).keys()


def _bits_of(model) -> dict[str, int]:
    return {name: m.bits for name, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_mixed_recipe_keeps_sensitive_tensors_at_8_bits(chat_checkpoint, tmp_path, variant):
    out = convert(chat_checkpoint(variant), tmp_path / "mixed", bits=4, recipe="mixed", dtype="float32")
    bits = _bits_of(load(out)[0])
    sensitive = {n: b for n, b in bits.items() if any(n.endswith(k) for k in MIXED_8BIT)}
    others = {n: b for n, b in bits.items() if n not in sensitive}
    assert "language_model.embed_tokens" in sensitive
    if variant == "e2b":
        assert "language_model.per_layer_model_projection" in sensitive
        assert "language_model.layers.0.per_layer_input_gate" in sensitive
    else:
        assert "language_model.layers.0.router.proj" in sensitive
    assert set(sensitive.values()) == {8}
    assert others and set(others.values()) == {4}
    uniform = _bits_of(load(chat_checkpoint(variant), quantize=4, dtype="float32")[0])
    assert set(uniform.values()) == {4} and uniform.keys() == bits.keys()


def test_unquantized_conversion_round_trips(chat_checkpoint, reference, tmp_path):
    out = convert(chat_checkpoint("e2b"), tmp_path / "f32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "float32"  # the source's dtype
    ids, ref = reference["e2b"]
    np.testing.assert_array_equal(np.array(load(out)[0](ids)), ref)
    out16 = convert(chat_checkpoint("e2b"), tmp_path / "bf16", dtype="bfloat16")
    assert {w.dtype for w in mx.load(str(out16 / "model.safetensors")).values()} == {mx.bfloat16}


def test_sharded_output_loads(chat_checkpoint, reference, tmp_path):
    out = convert(chat_checkpoint("e2b"), tmp_path / "sharded", bits=8, max_shard_gb=20e3 / (1 << 30))
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ids, _ = reference["e2b"]
    single = convert(chat_checkpoint("e2b"), tmp_path / "single", bits=8)
    np.testing.assert_array_equal(np.array(load(out)[0](ids)), np.array(load(single)[0](ids)))


def test_convert_errors(chat_checkpoint, tmp_path, capsys):
    src = chat_checkpoint("e2b")
    with pytest.raises(ValueError, match="must differ"):
        convert(src, src, bits=4)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(src, tmp_path / "taken", bits=4)
    with pytest.raises(SystemExit):
        cli.convert_main(["--model", str(src), "--out", str(tmp_path / "o"), "--bits", "7"])
    assert "invalid choice" in capsys.readouterr().err
    assert cli.convert_main(["--model", str(src), "--out", str(tmp_path / "o"), "--mode", "mxfp4",
                             "--group-size", "64"]) == 1
    assert "error: mxfp4 quantization takes group size 32, got 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.convert_main(["--model", str(src), "--out", str(tmp_path / "o"), "--recipe", "mixed"])
    assert "--recipe, --calibration and --target-bpw need --bits" in capsys.readouterr().err
    assert cli.convert_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "no checkpoint directory" in capsys.readouterr().err
    assert cli.convert_main(["--model", str(src), "--out", str(tmp_path / "ok"), "--bits", "4",
                             "--recipe", "mixed"]) == 0
    assert "affine 4-bit, group 64, mixed recipe" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already quantized"):
        load(tmp_path / "ok", quantize=4)


def test_moe_expert_banks_quantize_with_group_32(chat_checkpoint, reference, tmp_path):
    """The tiny 26b's experts (intermediate 32) only fit group size 32: converted, they are 4-bit banks and the
    router stays at 8 bits under `mixed`. Measured KL vs float32: 0.018."""
    from mlx_gemma4.moe import BankQuantization, QuantizedExperts

    out = convert(chat_checkpoint("26b"), tmp_path / "g32", bits=4, group_size=32, recipe="mixed", dtype="float32")
    model, _ = load(out)
    experts = [m for n, m in model.named_modules() if n.endswith(".experts")]
    banks = {"gate_up_proj": BankQuantization(32, 4), "down_proj": BankQuantization(32, 4)}
    assert experts and all(isinstance(m, QuantizedExperts) and m.quantization == banks for m in experts)
    assert _bits_of(model)["language_model.layers.0.router.proj"] == 8
    ids, ref = reference["26b"]
    assert _kl(ref, np.array(model(ids))) < KL_BOUND[4]
    on_load, _ = load(chat_checkpoint("26b"), quantize=4, group_size=32, recipe="mixed", dtype="float32")
    np.testing.assert_array_equal(np.array(on_load(ids)), np.array(model(ids)))

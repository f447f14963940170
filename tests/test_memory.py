"""Memory planner: parameter counts, KV-cache accounting, config resolution and its error paths.

The estimate-vs-measured-peak check (within 10%) lives in test_memory_measured.py; it needs the text model."""

from __future__ import annotations

import json
import math

import pytest

from mlx_gemma4 import cli, memory

GiB = memory.GiB

# Text-decoder parameters (M) computed from the published configs with transformers on the meta device,
# recorded in shared/reference/gemma4/README.md ("text decoder only", E2B/E4B without the unused KV-shared k/v).
PUBLISHED_TEXT_PARAMS_M = {"e2b": 4628.6, "e4b": 7463.0, "26b-a4b": 25233.1, "31b": 30697.3}


@pytest.mark.parametrize("variant", memory.VARIANTS)
def test_text_parameter_counts_match_reference(variant):
    text = memory.load_preset(variant)["text_config"]
    n = sum(math.prod(shape) for _, shape in memory.text_param_specs(text))
    assert n / 1e6 == pytest.approx(PUBLISHED_TEXT_PARAMS_M[variant], abs=0.1)


def test_layer_geometry_of_published_variants():
    """The planner's geometry is the loader's (TextConfig of the parsed config)."""
    e2b = memory.model_config_of(memory.load_preset("e2b")).text
    layers = range(e2b.num_hidden_layers)
    assert [i for i in layers if e2b.layer_types[i] != "sliding_attention"] == [4, 9, 14, 19, 24, 29, 34]
    assert [i for i in layers if e2b.is_kv_shared(i)] == list(range(15, 35))
    assert {e2b.mlp_width(i) for i in layers if e2b.is_kv_shared(i)} == {12288}
    assert {e2b.mlp_width(i) for i in layers if not e2b.is_kv_shared(i)} == {6144}
    moe = memory.model_config_of(memory.load_preset("26b-a4b")).text

    def geometry(i):
        return moe.layer_head_dims[i], moe.layer_kv_heads[i], not moe.has_value_proj(i)

    full = [i for i, kind in enumerate(moe.layer_types) if kind != "sliding_attention"]
    sliding = [i for i, kind in enumerate(moe.layer_types) if kind == "sliding_attention"]
    assert {geometry(i) for i in full} == {(512, 2, True)}
    assert {geometry(i) for i in sliding} == {(256, 8, False)}


def test_kv_cache_sliding_constant_full_linear_shared_free():
    text = memory.load_preset("e2b")["text_config"]
    a = memory.kv_cache_bytes(text, 8192, dtype_bytes=2)
    b = memory.kv_cache_bytes(text, 16384, dtype_bytes=2)
    assert a["sliding"] == b["sliding"] > 0  # bounded by the 512-token window
    assert b["full"] == 2 * a["full"]
    # E2B: layers 0-14 own caches (12 sliding, 3 full); 20 KV-shared layers cost nothing
    assert (a["sliding_layers"], a["full_layers"], a["shared_layers"]) == (12, 3, 20)
    # full layer: K and V, 1 head x 512 dims x 8192 tokens x 2 bytes
    assert a["full"] == 3 * 2 * 1 * 512 * 8192 * 2
    assert a["sliding"] == 12 * 2 * 1 * 256 * 512 * 2
    # a prefill chunk in flight sits in the sliding cache next to the window
    c = memory.kv_cache_bytes(text, 8192, dtype_bytes=2, chunk=512)
    assert c["sliding"] == 12 * 2 * 1 * 256 * (512 + 511) * 2
    # short contexts never hold more than the context
    assert memory.kv_cache_bytes(text, 100, dtype_bytes=2)["sliding"] == 12 * 2 * 256 * 100 * 2


def test_kv_cache_k_eq_v_layers_store_keys_and_values():
    text = memory.load_preset("26b-a4b")["text_config"]
    kv = memory.kv_cache_bytes(text, 4096, dtype_bytes=2)
    assert kv["full"] == 5 * 2 * 2 * 512 * 4096 * 2


def test_weights_at_each_precision():
    config = memory.load_preset("26b-a4b")
    e16 = memory.estimate(config, 512, bits=16, dtype="bfloat16")
    e4 = memory.estimate(config, 512, bits=4, dtype="bfloat16")
    assert e16.weights / 1e9 == pytest.approx(2 * 25.2331, rel=1e-3)
    # 4-bit: 0.5 byte + bf16 scale and bias per 64 values, on (almost) every parameter
    assert e4.weights / e16.weights == pytest.approx((0.5 + 4 / 64) / 2, rel=0.01)
    assert 13 * GiB < e4.weights < 15 * GiB
    e32 = memory.estimate(config, 512, bits=16, dtype="float32")
    assert e32.weights == pytest.approx(2 * e16.weights, rel=1e-6)


def test_fits_verdict_and_cli(capsys):
    e = memory.estimate(memory.load_preset("e4b"), 8192, bits=4, dtype="bfloat16")
    assert e.fits(24 * GiB) and not e.fits(2 * GiB)
    cli.memory_main(["--model", "google/gemma-4-E4B-it", "--context", "8192", "--bits", "4", "--ram", "24",
                 "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "fits in 24 GiB" in out and "NOT" not in out
    cli.memory_main(["--model", "31b", "--context", "131072", "--bits", "16", "--ram", "24", "--dtype", "bfloat16"])
    assert "does NOT fit in 24 GiB" in capsys.readouterr().out


def test_moe_prefill_chunk_cost_of_the_per_expert_path():
    """kernels.expert_glu_segments reads the expert bank in place and unpacks a 4-bit expert at a time, so a
    512-token chunk costs only per-pair rows more than a 16-token one, never a float copy of a layer's bank, and
    26B-A4B at 4 bits with 8K context fits in 24 GiB either way."""
    config = memory.load_preset("26b-a4b")
    big = memory.estimate(config, 8192, bits=4, dtype="float32", chunk=512)
    small = memory.estimate(config, 8192, bits=4, dtype="float32", chunk=16)
    per_token_moe = 8 * (4 * 2816 + 3 * 704 // 2) * 4 + 2 * 128 * 4
    bank = 128 * 3 * 704 * 2816 * 4
    assert big.activations - small.activations >= (512 - 16) * per_token_moe
    assert small.activations < 0.1 * bank and big.activations < 0.5 * bank
    assert small.fits(24 * GiB) and big.fits(24 * GiB)


def test_resolves_ids_variants_and_directories(tmp_path):
    assert memory.variant_of("google/gemma-4-E2B-it") == "e2b"
    assert memory.variant_of("mlx-community/gemma-4-26b-a4b-it-4bit") == "26b-a4b"
    assert memory.variant_of("31B") == "31b"
    assert memory.variant_of("gemma-3-12b") is None
    config = memory.load_preset("e4b")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, directory = memory.resolve_model(str(tmp_path))
    assert loaded == config and directory == tmp_path


def test_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="neither a local directory nor a known"):
        memory.resolve_model("llama-3-8b")
    with pytest.raises(FileNotFoundError, match="config.json"):
        memory.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown Gemma 4 variant"):
        memory.load_preset("e8b")
    config = memory.load_preset("e2b")
    with pytest.raises(ValueError, match="context"):
        memory.estimate(config, 0)
    with pytest.raises(ValueError, match="dtype"):
        memory.estimate(config, 10, dtype="int8")
    with pytest.raises(ValueError, match="text decoder"):
        memory.estimate({"model_type": "gemma4"}, 10)
    assert cli.memory_main(["--model", "nope", "--context", "10"]) == 1
    assert "neither a local directory" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="safetensors"):
        memory.safetensors_bytes(tmp_path)


def test_weights_dtype_halves_float_weights_and_leaves_quantized_models_alone():
    config = memory.load_preset("e2b")
    fp32 = memory.estimate(config, 4096, dtype="float32")
    bf16w = memory.estimate(config, 4096, dtype="float32", weights_dtype="bfloat16")
    assert bf16w.weights == pytest.approx(fp32.weights / 2, rel=0.01)
    assert bf16w.activations > fp32.activations  # upcast copies of weight matrices during prefill
    q4 = memory.estimate(config, 4096, bits=4, dtype="float32")
    assert memory.estimate(config, 4096, bits=4, dtype="float32", weights_dtype="bfloat16") == q4

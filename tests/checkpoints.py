"""Tiny random Gemma 4 checkpoints, written by transformers in the exact Hugging Face layout.

This is the one place test checkpoints are made; every test module shares it (see conftest.py).
Each variant's config is shrunk but keeps every feature of the published model it mimics:

  e2b   PLE, 4:1 sliding:full pattern, KV-shared final layers, double-wide MLP on shared layers
  e4b   PLE, 5:1 pattern, KV sharing, 2 KV heads
  26b   MoE (top-8 of 16 experts + dense shared MLP), k=v on full layers, own global KV heads/head dim,
        bidirectional vision attention
  31b   dense, k=v on full layers, global KV heads/head dim, bidirectional vision attention

Sliding windows are tiny (8-16) so test prompts exceed them several times. Norm weights and scalars are
set to 1 + 0.3*randn so a forgotten one changes the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VOCAB = 512

# Shared tiny text dimensions; variants override.
_BASE_TEXT = dict(
    vocab_size=VOCAB,
    vocab_size_per_layer_input=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
)


def _pattern(n_layers: int, every: int) -> list[str]:
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]


TEXT_VARIANTS: dict[str, dict] = {
    "e2b": dict(
        _BASE_TEXT,
        num_hidden_layers=10,
        layer_types=_pattern(10, 5),
        num_key_value_heads=1,
        sliding_window=8,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=4,
        use_double_wide_mlp=True,
    ),
    "e4b": dict(
        _BASE_TEXT,
        num_hidden_layers=12,
        layer_types=_pattern(12, 6),
        num_key_value_heads=2,
        sliding_window=8,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=4,
    ),
    "26b": dict(
        _BASE_TEXT,
        num_hidden_layers=6,
        layer_types=_pattern(6, 6),
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=16,
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=16,
        top_k_experts=8,
        moe_intermediate_size=32,
        intermediate_size=48,
        use_bidirectional_attention="vision",
    ),
    "31b": dict(
        _BASE_TEXT,
        num_hidden_layers=6,
        layer_types=_pattern(6, 3),
        num_attention_heads=8,
        num_key_value_heads=4,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        sliding_window=12,
        hidden_size_per_layer_input=0,
        use_bidirectional_attention="vision",
    ),
}


def randomize_norms_and_scalars(model, seed: int = 0) -> None:
    """Set every norm weight, layer_scalar and router scale to 1 + 0.3*randn (transformers inits them to 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            is_norm = "norm" in parent and leaf == "weight"
            is_scalar = leaf in ("layer_scalar", "per_expert_scale", "scale") or (
                parent == "router" and leaf == "scale"
            )
            if is_norm or is_scalar:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def _to_published_spelling(config_path: Path) -> None:
    """Rewrite a transformers-5.2x `per_layer_config` into Google's `global_head_dim` keys."""

    def fix(text: dict) -> None:
        plc = text.pop("per_layer_config", None) or {}
        overrides = next(iter(plc.values()), {})
        text["global_head_dim"] = overrides.get("head_dim", text.get("head_dim"))
        text["num_global_key_value_heads"] = overrides.get("num_key_value_heads")

    cfg = json.loads(config_path.read_text())
    fix(cfg["text_config"] if "text_config" in cfg else cfg)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_text_checkpoint(out_dir: str | os.PathLike, variant: str, *, spelling: str = "per_layer_config",
                         wrapper: str = "causal_lm", seed: int = 0, extra: dict | None = None) -> Path:
    """Save a tiny random text checkpoint of `variant` into out_dir (safetensors + config.json).

    wrapper: "causal_lm" (Gemma4ForCausalLM, keys `model.*`) or "conditional" (Gemma4ForConditionalGeneration
    without towers, keys `model.language_model.*`). spelling: "per_layer_config" or "published"."""
    import torch
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    out = Path(out_dir)
    torch.manual_seed(seed)
    text_kwargs = dict(TEXT_VARIANTS[variant], **(extra or {}))
    text_config = Gemma4TextConfig(**text_kwargs)
    if wrapper == "causal_lm":
        model = Gemma4ForCausalLM(text_config)
    else:
        config = Gemma4Config(text_config=text_config.to_dict(), vision_config=None, audio_config=None)
        model = Gemma4ForConditionalGeneration(config)
    model = model.float().eval()
    randomize_norms_and_scalars(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    if spelling == "published":
        _to_published_spelling(out / "config.json")
    return out


def load_hf(path, dtype=None):
    """Load a test checkpoint with transformers (eager attention, float32) as the oracle."""
    import torch
    from transformers import AutoConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    cfg = AutoConfig.from_pretrained(path)
    cls = Gemma4ForConditionalGeneration if cfg.model_type == "gemma4" else Gemma4ForCausalLM
    model = cls.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="eager")
    return model.eval()


# ---- Gemma 3 text (the subset of Gemma 4's decoder that real offline weights use) -----------------

GEMMA3_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
    layer_types=_pattern(7, 6), rope_theta=1000000.0, rope_local_base_freq=10000.0,
    final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    max_position_embeddings=4096, tie_word_embeddings=True,
)


def make_gemma3_checkpoint(out_dir: str | os.PathLike, seed: int = 0, extra: dict | None = None) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**dict(GEMMA3_TEXT, **(extra or {})))).float().eval()
    # Gemma 3 norms multiply by (1 + w): transformers inits w = 0, so set w = 0.3*randn for the same effect.
    randomize_norms_and_scalars(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.sub_(1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def load_hf_gemma3(path):
    import torch
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


# ---------------------------------------------------------------------------------------------------------------
# GGUF checkpoints (gguf helper): a make_text_checkpoint() checkpoint rewritten as a llama.cpp `gemma4` GGUF,
# the way llama.cpp's convert_hf_to_gguf.py (Gemma4Model) writes one: llama.cpp tensor names from the gguf
# package's own name map, ggml dimension order, the metadata keys llama.cpp reads, and a tiny "gemma4" BPE
# tokenizer.
# ---------------------------------------------------------------------------------------------------------------

# Tiny ranked-BPE vocabulary for the synthetic GGUFs: specials, 256 byte tokens, characters, a few merges.
GGUF_MERGES = [("h", "e"), ("▁", "t"), ("a", "t"), ("▁t", "he"), ("c", "at"), ("▁", "cat"), ("s", "at"), ("▁", "sat")]


def gguf_test_vocab(size: int = VOCAB) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """(tokens, token types, merges) of a small Gemma-4-style tokenizer padded with <unusedN> to `size`."""
    from gguf.constants import TokenType

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens = list(specials)
    types = [TokenType.CONTROL] * len(specials)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    chars = ["▁", "\n"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("ABCDEFGHIJ0123456789.,!?")
    merged = [a + b for a, b in GGUF_MERGES]
    tokens += chars + merged + ["\n\n"]
    types += [TokenType.NORMAL] * (len(chars) + len(merged) + 1)
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(TokenType.CONTROL)
    return tokens, [int(t) for t in types], list(GGUF_MERGES)


def make_gemma4_gguf(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike,
                     tensor_type: str = "F32") -> Path:
    """Write the Gemma4ForCausalLM checkpoint in checkpoint_dir as a llama.cpp gemma4 GGUF file.

    tensor_type: "F32", "F16", "BF16" or "Q8_0" for the weight matrices (norms, scalars and rows that are not a
    whole number of quantization blocks stay F32, as llama.cpp's converter does)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if "per_layer_config" in cfg or "global_head_dim" not in cfg:
        raise ValueError("make_gemma4_gguf needs a checkpoint written with spelling='published'")
    weights = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    n_layers = cfg["num_hidden_layers"]
    swa = [t == "sliding_attention" for t in cfg["layer_types"]]

    out_path = Path(out_path)
    w = gguf.GGUFWriter(str(out_path), arch="gemma4")
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(cfg["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(cfg["num_kv_shared_layers"])
    w.add_embedding_length_per_layer_input(cfg["hidden_size_per_layer_input"] or 0)
    w.add_key_length(cfg["global_head_dim"])
    w.add_value_length(cfg["global_head_dim"])
    w.add_key_length_swa(cfg["head_dim"])
    w.add_value_length_swa(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["global_head_dim"])
    w.add_rope_dimension_count_swa(cfg["head_dim"])
    n_ff = cfg["intermediate_size"]
    if cfg.get("use_double_wide_mlp"):
        first_shared = n_layers - cfg["num_kv_shared_layers"]
        w.add_feed_forward_length([n_ff if i < first_shared else 2 * n_ff for i in range(n_layers)])
    else:
        w.add_feed_forward_length(n_ff)
    if cfg.get("num_global_key_value_heads") is not None:
        w.add_head_count_kv([cfg["num_key_value_heads"] if s else cfg["num_global_key_value_heads"] for s in swa])
    else:
        w.add_head_count_kv(cfg["num_key_value_heads"])
    if cfg.get("enable_moe_block"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["top_k_experts"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])

    tokens, types, merges = gguf_test_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)

    # "proportional" RoPE on full layers: frequency factor 1 on rotated pairs, 1e30 (no rotation) on the rest
    full = cfg["rope_parameters"]["full_attention"]
    n_rot_pairs = int(cfg["global_head_dim"] * full["partial_rotary_factor"] / 2)
    rope_freqs = np.array([1.0] * n_rot_pairs + [1e30] * (cfg["global_head_dim"] // 2 - n_rot_pairs), np.float32)
    w.add_tensor("rope_freqs.weight", rope_freqs)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_layers)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for hf_name, value in weights.items():
        value = value.astype(np.float32)
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("router.scale"):
            name = f"blk.{layer}.ffn_gate_inp.scale"
        elif hf_name.endswith("router.per_expert_scale"):
            name = f"blk.{layer}.ffn_down_exps.scale"
        else:
            if hf_name.endswith(("layer_scalar", "experts.gate_up_proj", "experts.down_proj")):
                hf_name += ".weight"
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if name is None:
                raise ValueError(f"no llama.cpp name for {hf_name}")
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if value.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32 and value.shape[-1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path

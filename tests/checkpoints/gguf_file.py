"""Synthetic GGUF checkpoints: a make_text_checkpoint() checkpoint rewritten as a llama.cpp `gemma4` GGUF, the way
llama.cpp's convert_hf_to_gguf.py (Gemma4Model) writes one: llama.cpp tensor names from the gguf package's own
name map, ggml dimension order, the metadata keys llama.cpp reads, and a tiny "gemma4" BPE tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .text import VOCAB

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
                     tensor_type: str = "F32", split_experts: bool = False) -> Path:
    """Write the Gemma4ForCausalLM checkpoint in checkpoint_dir as a llama.cpp gemma4 GGUF file.

    tensor_type: "F32", "F16", "BF16" or "Q8_0" for the weight matrices (norms, scalars and rows that are not a
    whole number of quantization blocks stay F32, as llama.cpp's converter does). split_experts: store the MoE
    gate/up banks as separate ffn_gate_exps/ffn_up_exps tensors (which llama.cpp also reads)."""
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
    for hf_name, value in list(weights.items()):
        if split_experts and hf_name.endswith("experts.gate_up_proj"):
            gate, up = np.split(weights.pop(hf_name), 2, axis=1)
            weights[hf_name.replace("gate_up_proj", "gate_proj")] = gate
            weights[hf_name.replace("gate_up_proj", "up_proj")] = up
    for hf_name, value in weights.items():
        value = value.astype(np.float32)
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith(("experts.gate_proj", "experts.up_proj")):
            part = "gate" if hf_name.endswith("gate_proj") else "up"
            w.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", value)
            continue
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

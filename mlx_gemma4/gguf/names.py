"""Tensor names: llama.cpp's (gguf-py/gguf/constants.py TENSOR_NAMES) -> Hugging Face's, and the model's
weights read under those names.

gemma3 files store every RMSNorm weight as (1 + w): we subtract 1 again (HF Gemma 3 multiplies by 1 + w);
gemma4 files store norms unshifted. Gemma uses NEOX-style RoPE, so llama.cpp does not permute q/k rows: no
un-permutation. ggml's dimension order is the reverse of numpy's, so a tensor read in numpy order has HF's shape.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .reader import GGUFFile

SUPPORTED_ARCHITECTURES = ("gemma3", "gemma4")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
_BLOCK_NAMES_GEMMA3 = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAMES_GEMMA4 = {
    **_BLOCK_NAMES_GEMMA3,
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
}
_BLOCK_NAMES = {"gemma3": _BLOCK_NAMES_GEMMA3, "gemma4": _BLOCK_NAMES_GEMMA4}
# Not weights of the HF model: gemma4's rope_freqs encodes the partial rotary factor (read into the config).
_DERIVED_TENSORS = {"rope_freqs.weight"}
# Experts stored as separate gate/up tensors (older gemma4 files) are fused into HF's gate_up_proj.
_SPLIT_EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight")


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """The HF name of a llama.cpp tensor of architecture `arch` (None if it is not a model weight)."""
    if gguf_name in _DERIVED_TENSORS:
        return None
    if gguf_name in _GLOBAL_NAMES and (arch == "gemma4" or not gguf_name.startswith("per_layer")):
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES[arch]:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[arch][parts[2]]}"
    raise ValueError(f"unknown tensor {gguf_name!r} for GGUF architecture {arch!r}")


def iter_weights(gf: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every model tensor, dequantized one at a time (gemma3 norm shift undone)."""
    arch = check_architecture(gf)
    split_experts: dict[str, dict[str, str]] = {}
    for name in gf.tensors:
        block_part = name.split(".", 2)[-1]
        if arch == "gemma4" and name.startswith("blk.") and block_part in _SPLIT_EXPERTS:
            split_experts.setdefault(name.split(".")[1], {})[block_part] = name
            continue
        hf_name = hf_tensor_name(name, arch)
        if hf_name is None:
            continue
        value = gf.tensor(name)
        if arch == "gemma3" and name.endswith("norm.weight"):
            value -= 1.0  # llama.cpp stores Gemma 3's (1 + w); HF's Gemma3RMSNorm adds the 1 itself
        yield hf_name, value
    for layer, parts in split_experts.items():
        if len(parts) != 2:
            raise ValueError(f"{gf.path}: layer {layer} has only {sorted(parts)} of the expert gate/up pair")
        gate_up = [gf.tensor(parts[p]) for p in _SPLIT_EXPERTS]  # (E, I, H) each -> HF's (E, 2I, H), gate first
        yield f"model.layers.{layer}.experts.gate_up_proj", np.concatenate(gate_up, axis=1)


def hf_tensor_shapes(gf: GGUFFile) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of the model tensors, from the tensor table alone (nothing is read or dequantized)."""
    arch = check_architecture(gf)
    names = {n: hf_tensor_name(n, arch) for n in gf.tensors if n.split(".", 2)[-1] not in _SPLIT_EXPERTS}
    return {hf: gf.tensors[n].shape for n, hf in names.items() if hf is not None}


def read_weights(gf: GGUFFile) -> dict[str, np.ndarray]:
    """Every model tensor dequantized to float32 under its HF name."""
    return dict(iter_weights(gf))


def check_architecture(gf: GGUFFile) -> str:
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: unsupported GGUF architecture {arch!r} (general.architecture); "
            f"mlx-gemma4 imports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch

"""Tiny random checkpoints of the newer Gemma 4 family members, written by transformers:

  unified     Gemma 4 12B-like (`gemma4_unified`): dense decoder, k=v full layers with their own KV-head count,
              bidirectional vision attention, the encoder-free image embedder and raw-waveform audio embedder.
              Patch size / pooling stay at the published 16 / 3 and audio frames at 640 samples, so real
              processor outputs feed it.
  assistants  MTP drafters (`gemma4_assistant`, `gemma4_unified_assistant`), each paired with a tiny target:
              e2b (PLE + KV-shared target, centroid-masked LM head), 26b (MoE target), 31b (dense, k=v),
              12b (the unified target). Same 4-layer [sliding x3, full] shape as the published drafters.

Norm weights, LayerNorm weights/biases and scalars are 1 + 0.3*randn (biases 0.3*randn), the position table
randn, so a forgotten parameter changes the result.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .text import MM_TOKEN_IDS, TEXT_VARIANTS, randomize_norms_and_scalars

_PLE_AND_MOE = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
                "top_k_experts", "moe_intermediate_size")


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


# 12B-like: 5 sliding : 1 full (here 2 : 1), k=v with one global KV head, sliding window 8 (prompts cross it).
UNIFIED_TEXT = dict(
    _without(TEXT_VARIANTS["31b"], _PLE_AND_MOE),
    num_hidden_layers=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=8,
    use_bidirectional_attention="vision",
)
UNIFIED_VISION = dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=1120)
UNIFIED_AUDIO = dict(audio_embed_dim=640)


def randomize_layer_norms(model, seed: int = 0) -> None:
    """torch.nn.LayerNorm weights -> 1 + 0.3*randn, biases -> 0.3*randn; the unified position table -> randn."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("pos_embedding"):
                p.copy_(torch.randn(p.shape, generator=g))


def make_unified_model(seed: int = 0, *, vision: bool = True, audio: bool = True, text_extra: dict | None = None):
    """A tiny random Gemma4UnifiedForConditionalGeneration, float32, eval mode."""
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma4UnifiedConfig(text_config=dict(UNIFIED_TEXT, **(text_extra or {})),
                                 vision_config=dict(UNIFIED_VISION) if vision else None,
                                 audio_config=dict(UNIFIED_AUDIO) if audio else None, **MM_TOKEN_IDS)
    model = Gemma4UnifiedForConditionalGeneration(config).float().eval()
    randomize_norms_and_scalars(model, seed)
    randomize_layer_norms(model, seed)
    return model


def make_unified_checkpoint(out_dir: str | os.PathLike, seed: int = 0, *, vision: bool = True, audio: bool = True,
                            wrapper: str = "conditional") -> Path:
    """Save a tiny 12B-like checkpoint: wrapper "conditional" (Gemma4UnifiedForConditionalGeneration, keys
    model.language_model.*, model.embed_vision.*, model.embed_audio.*) or "causal_lm" (Gemma4UnifiedForCausalLM,
    text only, keys model.*)."""
    import torch
    from transformers import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

    out = Path(out_dir)
    if wrapper == "causal_lm":
        torch.manual_seed(seed)
        model = Gemma4UnifiedForCausalLM(Gemma4UnifiedTextConfig(**UNIFIED_TEXT)).float().eval()
        randomize_norms_and_scalars(model, seed)
    else:
        model = make_unified_model(seed, vision=vision, audio=audio)
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_hf_unified(path):
    import torch
    from transformers import AutoConfig, Gemma4UnifiedForCausalLM, Gemma4UnifiedForConditionalGeneration

    cls = (Gemma4UnifiedForConditionalGeneration if AutoConfig.from_pretrained(path).model_type == "gemma4_unified"
           else Gemma4UnifiedForCausalLM)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


# ---- MTP drafters ----------------------------------------------------------------------------------------------

DRAFTER_LAYERS = ["sliding_attention"] * 3 + ["full_attention"]
# target kind -> (target text config, centroid-masked LM head?)
ASSISTANT_TARGETS = {
    "e2b": (TEXT_VARIANTS["e2b"], True),
    "26b": (TEXT_VARIANTS["26b"], False),
    "31b": (TEXT_VARIANTS["31b"], False),
    "12b": (UNIFIED_TEXT, False),
}


def assistant_text_config(target_text: dict, **overrides) -> dict:
    """The drafter's text_config: the target's attention geometry (head dims, KV heads per layer type, window,
    RoPE, vocabulary) on a narrow 4-layer Q-only stack."""
    text = _without(copy.deepcopy(target_text), _PLE_AND_MOE + ("use_double_wide_mlp", "num_kv_shared_layers"))
    text.update(hidden_size=32, intermediate_size=48, num_hidden_layers=len(DRAFTER_LAYERS),
                layer_types=list(DRAFTER_LAYERS), num_attention_heads=4, final_logit_softcapping=None,
                num_kv_shared_layers=len(DRAFTER_LAYERS))
    if target_text is not UNIFIED_TEXT:
        # Gemma4TextConfig defaults to PLE on; transformers' assistant config insists on these being off
        text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False,
                    use_double_wide_mlp=False)
    text.update(overrides)
    return text


def make_assistant_model(target: str, seed: int = 0, *, text_overrides: dict | None = None, **config_overrides):
    """A tiny random Gemma4AssistantForCausalLM (Gemma4UnifiedAssistantForCausalLM for target "12b") paired with
    the tiny `target` text variant; with the centroid head, token_ordering is a random permutation."""
    import torch
    from transformers import (Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantConfig,
                              Gemma4UnifiedAssistantForCausalLM)

    target_text, centroids = ASSISTANT_TARGETS[target]
    text = assistant_text_config(target_text, **(text_overrides or {}))
    kwargs = dict(backbone_hidden_size=target_text["hidden_size"], use_ordered_embeddings=centroids,
                  num_centroids=16, centroid_intermediate_top_k=4)
    kwargs.update(config_overrides)
    torch.manual_seed(seed)
    if target == "12b":
        model = Gemma4UnifiedAssistantForCausalLM(Gemma4UnifiedAssistantConfig(text_config=text, **kwargs))
    else:
        model = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(text_config=text, **kwargs))
    model = model.float().eval()
    randomize_norms_and_scalars(model, seed)
    if model.masked_embedding is not None:
        g = torch.Generator().manual_seed(seed + 11)
        ordering = model.masked_embedding.token_ordering
        ordering.copy_(torch.randperm(ordering.numel(), generator=g))
    return model


def make_assistant_checkpoint(out_dir: str | os.PathLike, target: str, seed: int = 0, **overrides) -> Path:
    out = Path(out_dir)
    make_assistant_model(target, seed, **overrides).save_pretrained(out, safe_serialization=True)
    return out


def load_hf_assistant(path):
    import torch
    from transformers import AutoConfig, Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantForCausalLM

    unified = AutoConfig.from_pretrained(path).model_type == "gemma4_unified_assistant"
    cls = Gemma4UnifiedAssistantForCausalLM if unified else Gemma4AssistantForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()

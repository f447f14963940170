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


class OracleDrafter:
    """A drafter that knows its target (for tests and the benchmark's acceptance ceiling): each proposal's logits are
    the target's own for the context (the cached tokens, then the tokens handed to the drafter this round, read back
    from their embeddings), plus Gaussian noise of std `noise` times theirs (0: every proposal is the target's
    choice; more: some are rejected). The real drafter still runs for its hidden state, so the whole hand-off is
    exercised. `tokens`: the PromptCache's token list the generation uses (positions 0 .. p-1 at a round at position p)."""

    def __init__(self, drafter, target, tokens: list, noise: float = 0.0, seed: int = 0):
        import mlx.core as mx

        self.drafter, self.target, self.tokens, self.noise = drafter, target, tokens, noise
        self.config = drafter.config
        self._key = mx.random.key(seed)
        self._table = target.language_model.embed(mx.arange(target.text_config.vocab_size)[None])[0]  # (V, H)
        self._round: tuple[int | None, list[int]] = (None, [])

    def __call__(self, embeds, kv, position):
        import mlx.core as mx

        logits, hidden = self.drafter(embeds, kv, position)
        H = self._table.shape[1]
        token = int(mx.argmin(((self._table - embeds[0, 0, :H].astype(self._table.dtype)) ** 2).sum(-1)))
        at, seen = self._round
        seen = (seen if at == position else []) + [token]
        self._round = (position, seen)
        own = self.target(mx.array(self.tokens[:position] + seen, dtype=mx.int32)[None], last_only=True)
        if self.noise:
            self._key, key = mx.random.split(self._key)
            own = own + self.noise * own.std() * mx.random.normal(own.shape, key=key)
        return own.astype(logits.dtype), hidden


class ScriptedDrafter:
    """A drafter that proposes a continuation the test already knows (`sequence`: the prompt and the target's greedy
    output, indexed by position), each proposal replaced by another token with probability `miss` (seeded): the
    target accepts the proposals up to the first miss. Cheap (no target forward); the real drafter still runs."""

    def __init__(self, drafter, sequence: list[int], miss: float = 0.3, seed: int = 0):
        import numpy as np

        self.drafter, self.sequence, self.miss = drafter, list(sequence), miss
        self.config = drafter.config
        self._rng = np.random.RandomState(seed)
        self._round: tuple[int | None, int] = (None, 0)

    def __call__(self, embeds, kv, position):
        import mlx.core as mx

        logits, hidden = self.drafter(embeds, kv, position)
        at, step = self._round
        step = step + 1 if at == position else 0
        self._round = (position, step)
        vocab = logits.shape[-1]
        i = position + 1 + step
        token = self.sequence[i] if i < len(self.sequence) else 0
        if self._rng.rand() < self.miss:
            token = (token + 1 + self._rng.randint(vocab - 1)) % vocab
        return mx.where(mx.arange(vocab) == token, 10.0, -10.0).reshape(1, 1, vocab).astype(logits.dtype), hidden

"""The top-level Gemma 4 model: text decoder, LM head with soft-capping, and (when the checkpoint has them)
the vision and audio towers whose soft tokens replace the placeholder tokens of the prompt.

`model(input_ids, cache=...) -> logits (B, L, vocab)`. Reference: `Gemma4ForConditionalGeneration`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .text import TextModel


class Gemma4(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text
        self.language_model = TextModel(config.text)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    # ---- text ---------------------------------------------------------------------------------
    def logits(self, h: mx.array) -> mx.array:
        out = self.lm_head(h) if "lm_head" in self else self.language_model.embed_tokens.as_linear(h)
        cap = self.text_config.final_logit_softcapping
        if cap:
            out = mx.tanh(out / cap) * cap
        return out

    def __call__(self, input_ids: mx.array, cache=None, *, inputs_embeds: mx.array | None = None,
                 block_ids: mx.array | None = None, last_only: bool = False) -> mx.array:
        input_ids = self.check_ids(input_ids)
        h = self.language_model(input_ids, cache, inputs_embeds=inputs_embeds, block_ids=block_ids,
                                last_only=last_only)
        return self.logits(h)

    def check_ids(self, input_ids) -> mx.array:
        """(B, L) int ids in range. Host inputs are always checked; lazy device arrays only for prompts
        (L > 1), so a decode step never forces a sync (its ids come from the sampler, always in range)."""
        if not isinstance(input_ids, mx.array):
            input_ids = mx.array(input_ids)
            check = True
        else:
            check = input_ids.shape[-1] > 1
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (mx.int32, mx.int64, mx.uint32, mx.int16, mx.uint16, mx.uint8, mx.int8):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        vocab = self.text_config.vocab_size
        if check and input_ids.size:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab}); got range [{lo}, {hi}]")
        return input_ids

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    @property
    def dtype(self) -> mx.Dtype:
        return self.language_model.norm.weight.dtype

"""Gemma 4 MTP drafters ("assistants"): `gemma4_assistant` (for E2B, E4B, 26B A4B, 31B) and
`gemma4_unified_assistant` (for the 12B), loaded from their own checkpoints with `load_drafter(path, target)`.

A drafter is a few Gemma 4 decoder layers that are all KV-shared: they have query projections only and attend
over the target's own keys and values, those of the target's last cache-owning layer of the same type
(sliding / full). One draft step, at position p (the position of the last token t known to the target):

  x      = pre_projection(concat(target's scaled embedding of t, hidden))     2 * H_target -> H_drafter
  x      = layers(x): queries at position p over the target's keys at positions < p (sliding layers: the
           last `sliding_window` of them), no causal mask among them
  h      = norm(x)
  logits = h @ LM head (tied to the drafter's own embedding table; E-model drafters: the centroid-masked head)
  hidden = post_projection(h)                                                  H_drafter -> H_target

`hidden` starts as the target's final-normed hidden state at p - 1 (the one that predicted t) and is the
drafter's own for the following steps; p stays the same for all the steps of a round.
Reference: transformers' `Gemma4AssistantForCausalLM`, `Gemma4AssistantMaskedEmbedder`,
`SinglePositionMultiTokenCandidateGenerator` (generation/candidate_generator.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .attention import AttentionInputs
from .config import DRAFTER_TYPES, SLIDING, ConfigError, TextConfig, read_config_json
from .norm import RMSNorm
from .runtime import RuntimePolicy
from .text import DecoderLayer

# drafter type -> the target model types it drafts for
TARGET_TYPES = {"gemma4_assistant": ("gemma4", "gemma4_text"),
                "gemma4_unified_assistant": ("gemma4_unified", "gemma4_unified_text")}
_TEXT_TYPE = {"gemma4_assistant": "gemma4_text", "gemma4_unified_assistant": "gemma4_unified_text"}
_IGNORED = {"architectures", "dtype", "torch_dtype", "transformers_version", "model_type", "initializer_range",
            "_name_or_path", "image_token_id", "audio_token_id", "video_token_id", "boi_token_id", "eoi_token_id",
            "boa_token_id", "eoa_token_id", "eoa_token_index", "pad_token_id", "bos_token_id", "eos_token_id",
            "block_size", "num_assistant_tokens", "output_attentions", "output_hidden_states", "return_dict",
            "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "text_config",
            "quantization", "quantization_config"}


@dataclass
class DrafterConfig:
    model_type: str
    text: TextConfig  # every layer KV-shared
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    quantization: dict | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "DrafterConfig":
        model_type = d.get("model_type")
        if model_type not in DRAFTER_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not an MTP drafter (expected one of {DRAFTER_TYPES}); "
                              "load target models with load()")
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError(f"{model_type} config has no text_config")
        unknown = sorted(k for k, v in d.items() if k not in _IGNORED and k not in {f.name for f in
                                                                                 dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{model_type}: unsupported config fields {unknown}")
        text_d = dict(d["text_config"])
        text_d.setdefault("model_type", _TEXT_TYPE[model_type])
        text_d.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
        if text_d["model_type"] != _TEXT_TYPE[model_type]:
            raise ConfigError(f"a {model_type} has a {_TEXT_TYPE[model_type]} text_config, got "
                              f"{text_d['model_type']!r}")
        n_layers = int(text_d.get("num_hidden_layers") or 0)
        shared = int(text_d.pop("num_kv_shared_layers", 0) or 0)
        if shared not in (0, n_layers):  # 0: transformers' default for assistants is "all of them"
            raise ConfigError(f"every drafter layer reads the target's KV: num_kv_shared_layers must equal "
                              f"num_hidden_layers ({n_layers}), got {shared}")
        for key in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp"):
            if text_d.get(key):
                raise ConfigError(f"drafters have no per-layer embeddings, MoE or double-wide MLP; text_config "
                                  f"sets {key}={text_d[key]!r}")
        text = dataclasses.replace(TextConfig.from_dict(text_d), num_kv_shared_layers=n_layers)
        cfg = cls(model_type=model_type, text=text, backbone_hidden_size=int(d.get("backbone_hidden_size") or 0),
                  use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
                  num_centroids=int(d.get("num_centroids", 2048)),
                  centroid_intermediate_top_k=int(d.get("centroid_intermediate_top_k", 32)),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), quantization=d.get("quantization"),
                  raw=d)
        if cfg.backbone_hidden_size <= 0:
            raise ConfigError(f"{model_type}: backbone_hidden_size is missing")
        if cfg.use_ordered_embeddings and (cfg.num_centroids <= 0 or text.vocab_size % cfg.num_centroids
                                           or not 0 < cfg.centroid_intermediate_top_k <= cfg.num_centroids):
            raise ConfigError(f"{model_type}: the centroid head needs num_centroids dividing vocab_size "
                              f"({text.vocab_size}) and 0 < centroid_intermediate_top_k <= num_centroids; got "
                              f"{cfg.num_centroids} / {cfg.centroid_intermediate_top_k}")
        return cfg


class DrafterStack(nn.Module):
    """`model.*` of a drafter checkpoint: the embedding table (its LM head), Q-only layers, final norm."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)


class CentroidHead(nn.Module):
    """E-model drafters' LM head (`masked_embedding`): score `num_centroids` clusters of the vocabulary, keep the
    top-k clusters, and compute logits only for their tokens; every other token gets (smallest computed logit - 1),
    as transformers' Gemma4AssistantMaskedEmbedder does (the minimum taken over the whole call)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_centroids: int, top_k: int):
        super().__init__()
        self.centroids = nn.Linear(hidden_size, num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab_size,), mx.int32)  # cluster c holds tokens [c*K, (c+1)*K) of it
        self.top_k = top_k

    def __call__(self, h: mx.array, rows) -> mx.array:
        """h (B, L, H); rows(ids) -> LM-head rows (..., H) of the given token ids."""
        B, L, _ = h.shape
        n_clusters = self.centroids.weight.shape[0]
        clusters = mx.argpartition(-self.centroids(h), self.top_k - 1, axis=-1)[..., : self.top_k]
        members = self.token_ordering.reshape(n_clusters, -1)[clusters].reshape(B, L, -1)  # (B, L, k*K)
        selected = (rows(members).astype(h.dtype) @ h[..., None])[..., 0]
        vocab = self.token_ordering.shape[0]
        out = mx.full((B, L, vocab), selected.min() - 1, dtype=h.dtype)
        return mx.put_along_axis(out, members, selected, axis=-1)


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        self.policy = None  # the RuntimePolicy load_drafter() gives it (mlx_gemma4.runtime), applied in __call__
        text = config.text
        self.model = DrafterStack(text)
        for layer in self.model.layers:
            layer.self_attn.window = None  # the drafter cuts the sliding keys itself (see __call__)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = CentroidHead(text.hidden_size, text.vocab_size, config.num_centroids,
                                                 config.centroid_intermediate_top_k)

    def lm_rows(self, ids: mx.array) -> mx.array:
        """Rows of the LM head for token ids (dequantized when the head is quantized)."""
        if "lm_head" in self:
            head = self.lm_head
            if isinstance(head, nn.QuantizedLinear):
                return mx.dequantize(head.weight[ids], head.scales[ids], head.biases[ids], head.group_size,
                                     head.bits)
            return head.weight[ids]
        return self.model.embed_tokens(ids)

    def logits(self, h: mx.array) -> mx.array:
        if "masked_embedding" in self:
            return self.masked_embedding(h, self.lm_rows)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    def __call__(self, inputs_embeds: mx.array, target_kv: dict, position: int) -> tuple[mx.array, mx.array]:
        """One draft step. inputs_embeds (B, 1, 2 * backbone): concat(target's scaled token embedding, hidden);
        target_kv: {layer type: (keys, values)} from `target_kv(...)`; position: p.
        Returns (logits (B, 1, vocab), next hidden (B, 1, backbone))."""
        with self.policy.applied() if self.policy is not None else contextlib.nullcontext():
            return self._step(inputs_embeds, target_kv, position)

    def _step(self, inputs_embeds: mx.array, target_kv: dict, position: int) -> tuple[mx.array, mx.array]:
        x = self.pre_projection(inputs_embeds)
        step = AttentionInputs(offset=position)
        # transformers' bidirectional sliding mask is inclusive (|q - k| <= window), flipped to look back from p:
        # sliding layers see the window + 1 keys before p
        seen = self.config.text.sliding_window + 1
        for layer, kind in zip(self.model.layers, self.config.text.layer_types):
            keys, values = target_kv[kind]
            if kind == SLIDING:
                keys, values = keys[:, :, -seen:], values[:, :, -seen:]
            # every key given is visible (they all precede p); the attention call wants the query's own position
            # among the keys', so they are numbered to end at p (RoPE was applied by the target: numbering only)
            x, _ = layer(x, step, None, None, (keys, values, position + 1 - keys.shape[2]))
        h = self.model.norm(x)
        return self.logits(h), self.post_projection(h)

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype


# ---- pairing with a target ---------------------------------------------------------------------------------

def target_kv(target, cache) -> dict:
    """{layer type: (keys, values)} a drafter reads: the cache of the target's last cache-owning layer of each type,
    in temporal order (oldest first), covering every position the target has processed."""
    text = target.text_config
    return {kind: tuple(cache[text.last_kv_layer(kind)].state[:2]) for kind in set(text.layer_types)}


def check_pair(drafter: Drafter, target) -> None:
    """ConfigError naming the first thing that makes `drafter` unable to draft for `target`."""
    cfg, text, tt = drafter.config, drafter.config.text, target.text_config
    target_type = target.config.model_type
    if target_type not in TARGET_TYPES[cfg.model_type]:
        raise ConfigError(f"a {cfg.model_type} drafter drafts for {' / '.join(TARGET_TYPES[cfg.model_type])} "
                          f"targets; this target is {target_type}")
    if cfg.backbone_hidden_size != tt.hidden_size:
        raise ConfigError(f"the drafter was trained on a target of hidden size {cfg.backbone_hidden_size} "
                          f"(backbone_hidden_size); this target's hidden size is {tt.hidden_size}: use the drafter "
                          "made for this model")
    if text.vocab_size != tt.vocab_size:
        raise ConfigError(f"drafter vocabulary ({text.vocab_size}) != target vocabulary ({tt.vocab_size})")
    target_kinds = set(tt.layer_types[: tt.first_kv_shared_layer])
    for i, kind in enumerate(text.layer_types):
        if kind not in target_kinds:
            raise ConfigError(f"drafter layer {i} attends over the target's {kind} keys, but the target has no "
                              f"{kind} layers")
        j = tt.last_kv_layer(kind)
        if (text.layer_head_dims[i], text.layer_kv_heads[i]) != (tt.layer_head_dims[j], tt.layer_kv_heads[j]):
            raise ConfigError(
                f"drafter layer {i} ({kind}) expects keys of head dim {text.layer_head_dims[i]} with "
                f"{text.layer_kv_heads[i]} KV heads; the target's {kind} layers have head dim "
                f"{tt.layer_head_dims[j]} with {tt.layer_kv_heads[j]} KV heads")
        if text.rope[kind] != tt.rope[kind]:
            raise ConfigError(f"drafter and target use different RoPE on {kind} layers: {text.rope[kind]} vs "
                              f"{tt.rope[kind]}")
    if SLIDING in text.layer_types and text.sliding_window != tt.sliding_window:
        raise ConfigError(f"drafter sliding window ({text.sliding_window}) != target sliding window "
                          f"({tt.sliding_window})")


# ---- loading -----------------------------------------------------------------------------------------------

def load_drafter(path_or_repo: str | os.PathLike, target=None, *, dtype: mx.Dtype | str | None = None,
                 revision: str | None = None, lazy: bool = False) -> Drafter:
    """Load an MTP drafter checkpoint (a local directory or a Hub repo id such as google/gemma-4-E2B-it-assistant).

    With `target` (a model from load()), the pair is checked (ConfigError naming the mismatch) and the drafter takes
    the target's compute dtype unless `dtype` is given."""
    from .loading import CheckpointError, apply_quantization, check_weights, read_weights, resolve_path

    path = resolve_path(path_or_repo, revision)
    config = DrafterConfig.from_dict(read_config_json(path))
    drafter = Drafter(config)
    if target is not None:
        check_pair(drafter, target)
    weights = read_weights(path)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    # KV-shared layers never read k/v projections (some checkpoints still carry them)
    weights = {k: v for k, v in weights.items()
               if not any(p in k for p in (".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.k_norm."))}
    if "masked_embedding.token_ordering" in weights:
        weights["masked_embedding.token_ordering"] = weights["masked_embedding.token_ordering"].astype(mx.int32)
    if config.quantization:
        apply_quantization(drafter, config.quantization)
    check_weights(drafter, weights)
    if target is not None and dtype is None:
        dtype = target.dtype
    policy = RuntimePolicy.from_arguments(dtype)
    if target is not None and target.policy is not None:  # the target's kernel choices, at this dtype
        policy = dataclasses.replace(target.policy, dtype=policy.dtype, weights_dtype=policy.dtype)
    compute = policy.dtype
    weights = {k: (v.astype(compute) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    drafter.load_weights(list(weights.items()), strict=False)
    ordering = drafter.masked_embedding.token_ordering if "masked_embedding" in drafter else None
    if ordering is not None and not lazy:
        vocab = config.text.vocab_size
        seen = mx.zeros((vocab,), mx.int32).at[ordering].add(1)
        if ordering.min().item() < 0 or ordering.max().item() >= vocab or not mx.all(seen == 1).item():
            raise CheckpointError("masked_embedding.token_ordering is not a permutation of the vocabulary")
    drafter.policy = policy
    drafter.eval()
    if not lazy:
        mx.eval(drafter.parameters())
    return drafter



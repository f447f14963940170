"""The 26B A4B mixture-of-experts block: router and the stacked expert bank.

Router (transformers' `Gemma4TextRouter`): scale-free RMSNorm, times a learned per-channel scale and
hidden_size**-0.5, linear projection to expert scores, softmax over all experts (float32), top-k, the k
probabilities renormalized to sum to 1, then multiplied by a learned per-expert scale.

Experts (`Gemma4TextExperts`): one (E, 2I, H) gate/up bank and one (E, H, I) down bank per layer; each token's
output is the routing-weighted sum of its k experts' GeGLU MLPs. The bank is read in place by
`kernels.expert_glu` (no per-expert copies).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .kernels import expert_glu


def route_top_k(scores: mx.array, k: int, per_expert_scale: mx.array) -> tuple[mx.array, mx.array]:
    """(T, E) router logits -> (indices (T, k) int32, weights (T, k) float32)."""
    probs = mx.softmax(scores.astype(mx.float32), axis=-1)
    indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
    top = mx.take_along_axis(probs, indices, axis=-1)
    top = top / top.sum(axis=-1, keepdims=True)
    return indices.astype(mx.int32), top * per_expert_scale[indices].astype(mx.float32)


class Router(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = mx.ones((config.hidden_size,))
        self.per_expert_scale = mx.ones((config.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        h = mx.fast.rms_norm(x, None, self.eps) * self.scale.astype(x.dtype) * self.root_size
        return route_top_k(self.proj(h), self.top_k, self.per_expert_scale)


class Experts(nn.Module):
    """Expert bank in the checkpoint's own layout: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        E, H, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = mx.zeros((E, 2 * inter, H))
        self.down_proj = mx.zeros((E, H, inter))

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return expert_glu(x, indices, weights, self.gate_up_proj, self.down_proj)

"""The 26B A4B mixture-of-experts block: router and the stacked expert bank.

Router (transformers' `Gemma4TextRouter`): scale-free RMSNorm, times a learned per-channel scale and
hidden_size**-0.5, linear projection to expert scores, softmax over all experts (float32), top-k, the k
probabilities renormalized to sum to 1, then multiplied by a learned per-expert scale.

Experts (`Gemma4TextExperts`): one (E, 2I, H) gate/up bank and one (E, H, I) down bank per layer; each token's
output is the routing-weighted sum of its k experts' GeGLU MLPs. The bank is read in place by
`kernels.expert_glu` (no per-expert copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .kernels import ExpertBank, expert_glu

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
        # called as observer(indices) after every call when set: expert_trace.record_expert_choices (the app's and
        # notebooks' expert plots); None costs nothing
        self.observer = None

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x (T, H) -> (indices (T, k) int32, weights (T, k) float32)."""
        h = mx.fast.rms_norm(x, None, self.eps) * self.scale.astype(x.dtype) * self.root_size
        indices, weights = route_top_k(self.proj(h), self.top_k, self.per_expert_scale)  # scores (T, E)
        if self.observer is not None:
            self.observer(indices)
        return indices, weights


class Experts(nn.Module):
    """Expert bank in the checkpoint's own layout: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        E, H, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = mx.zeros((E, 2 * inter, H))
        self.down_proj = mx.zeros((E, H, inter))

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (T, H), indices and weights (T, k) -> (T, H): each token's k experts' outputs, weighted and summed."""
        return expert_glu(x, indices, weights, ExpertBank(self.gate_up_proj), ExpertBank(self.down_proj))

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", *,
                     gate_up_proj: dict | bool | None = None, down_proj: dict | bool | None = None,
                     **kwargs) -> "QuantizedExperts":
        """Both banks quantized alike, unless `gate_up_proj` / `down_proj` give a bank its own {group_size, bits,
        mode} (mixed recipes give the down bank more bits) or False to keep it in float (mlx-lm leaves a bank
        whose input width is not a multiple of the group size in float)."""
        default = BankQuantization(group_size, bits, mode)

        def spec(override):
            if override is False:
                return None
            return BankQuantization(**{**default.__dict__, **override}) if isinstance(override, dict) else default

        return QuantizedExperts.from_experts(self, spec(gate_up_proj), spec(down_proj))


@dataclass(frozen=True)
class BankQuantization:
    """How one expert bank is quantized (mx.quantize's group_size, bits, mode)."""

    group_size: int
    bits: int
    mode: str = "affine"


class QuantizedExperts(nn.Module):
    """MLX-quantized expert banks: `<bank>` packed uint32, `<bank>_scales`, and `<bank>_biases` in the affine mode.
    Each bank has its own quantization (`quantization[bank]`), or None for a bank kept in float."""

    def __init__(self, num_experts: int, hidden: int, inter: int, gate_up: BankQuantization | None,
                 down: BankQuantization | None):
        super().__init__()
        self.quantization = {"gate_up_proj": gate_up, "down_proj": down}
        for name, (out_dim, in_dim) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            q = self.quantization[name]
            if q is None:
                setattr(self, name, mx.zeros((num_experts, out_dim, in_dim)))
                continue
            groups = (num_experts, out_dim, in_dim // q.group_size)
            setattr(self, name, mx.zeros((num_experts, out_dim, in_dim * q.bits // 32), mx.uint32))
            setattr(self, name + "_scales", mx.zeros(groups, mx.float32 if q.mode == "affine" else mx.uint8))
            if q.mode == "affine":
                setattr(self, name + "_biases", mx.zeros(groups))

    @classmethod
    def from_experts(cls, experts: Experts, gate_up: BankQuantization | None,
                     down: BankQuantization | None) -> "QuantizedExperts":
        E, two_i, H = experts.gate_up_proj.shape
        q = cls(E, H, two_i // 2, gate_up, down)
        for name, spec in q.quantization.items():
            if spec is None:
                setattr(q, name, getattr(experts, name))
                continue
            w, scales, *biases = mx.quantize(getattr(experts, name), group_size=spec.group_size, bits=spec.bits,
                                             mode=spec.mode)
            setattr(q, name, w)
            setattr(q, name + "_scales", scales)
            if biases:
                setattr(q, name + "_biases", biases[0])
        return q

    def bank(self, name: str) -> ExpertBank:
        q = self.quantization[name]
        if q is None:
            return ExpertBank(self[name])
        return ExpertBank(self[name], self[name + "_scales"], self.get(name + "_biases"), q.bits, q.group_size,
                          q.mode)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return expert_glu(x, indices, weights, self.bank("gate_up_proj"), self.bank("down_proj"))

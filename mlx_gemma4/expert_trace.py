"""Which experts the router of a mixture-of-experts model (26B A4B) picked, token by token and layer by layer.

    with record_expert_choices(model) as trace:
        generate(model, processor, "Hello")
    trace.choices(layer)      # (tokens, top_k) expert ids in the order the tokens went through the model
    trace.usage()             # (moe_layers, num_experts) how many tokens each expert served

Recording sets each router's `observer`: it keeps the router's lazy index arrays and reads them only when asked,
so it adds no synchronization to the forward pass. One recording of a model at a time.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import numpy as np


@dataclass
class ExpertTrace:
    layers: list[int]  # decoder-layer index of each MoE layer, in model order
    num_experts: int
    top_k: int
    _calls: dict[int, list[mx.array]] = field(default_factory=dict)

    def _record(self, layer: int, indices: mx.array) -> None:
        self._calls.setdefault(layer, []).append(indices)

    @property
    def num_tokens(self) -> int:
        """Tokens routed so far (counted at the first MoE layer)."""
        return sum(int(a.shape[0]) for a in self._calls.get(self.layers[0], []))

    def choices(self, layer: int, start: int = 0) -> np.ndarray:
        """(tokens, top_k) expert ids chosen at decoder layer `layer`, from token `start` on."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} has no router; MoE layers are {self.layers}")
        calls = self._calls.get(layer, [])
        if not calls:
            return np.zeros((0, self.top_k), dtype=np.int32)
        return np.concatenate([np.array(a, dtype=np.int32).reshape(-1, self.top_k) for a in calls])[start:]

    def usage(self, start: int = 0) -> np.ndarray:
        """(len(layers), num_experts): how many tokens (from `start` on) each expert served in each MoE layer."""
        out = np.zeros((len(self.layers), self.num_experts), dtype=np.int64)
        for row, layer in enumerate(self.layers):
            ids = self.choices(layer, start).reshape(-1)
            out[row] = np.bincount(ids, minlength=self.num_experts)
        return out

    def token_map(self, layer: int, start: int = 0) -> np.ndarray:
        """(tokens, num_experts) 0/1 matrix: 1 where the token was sent to the expert (a heatmap's input)."""
        ids = self.choices(layer, start)
        out = np.zeros((ids.shape[0], self.num_experts), dtype=np.int8)
        np.put_along_axis(out, ids, 1, axis=1)
        return out


def moe_layers(model) -> list[int]:
    """Decoder-layer indices that have a router (empty for dense models)."""
    return [i for i, layer in enumerate(model.language_model.layers) if "router" in layer]


@contextmanager
def record_expert_choices(model) -> Iterator[ExpertTrace]:
    """Record every routing decision `model` makes inside the `with` block."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("this model has no mixture-of-experts layers (only the 26B A4B variant routes to experts)")
    routers = {i: model.language_model.layers[i].router for i in layers}
    if any(router.observer is not None for router in routers.values()):
        raise RuntimeError("expert choices are already being recorded (one recording at a time)")
    text = model.text_config
    trace = ExpertTrace(layers, text.num_experts, text.top_k_experts)
    for layer, router in routers.items():
        router.observer = functools.partial(trace._record, layer)
    try:
        yield trace
    finally:
        for router in routers.values():
            router.observer = None

"""Activation statistics from a calibration text: what each weight matrix multiplies.

`collect(model, batches, paths)` runs the float model once over the calibration tokens and records, for every
module named in `paths`, the mean square of each input channel (its importance: the expected squared output error
of a weight error in that column is the weight error squared times it), the mean absolute value (AWQ's per-channel
activation scale), and for expert banks the same per expert over the tokens routed to it (the down bank's inputs,
gelu(gate) * up, are recomputed from the float weights for each expert's tokens).

The modules are observed by giving each instance, for the duration of the pass, a subclass of its own class whose
__call__ records its arguments first (nothing else about the model changes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

DEFAULT_TEXT = "calibration.txt"  # shipped with the package: varied English prose, dialogue, code, lists, numbers


def calibration_text(source: str | Path | None = None) -> str:
    """The calibration text: a UTF-8 file, or (None / "default") the one shipped with the package."""
    if source is None or str(source) == "default":
        return resources.files(__package__).joinpath(DEFAULT_TEXT).read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration text not found: {path}")
    return path.read_text(encoding="utf-8")


def calibration_batches(processor, text: str, seq_len: int = 512, max_tokens: int | None = None) -> mx.array:
    """(B, seq_len) token rows, each starting with <bos>, cut from the text in order (the tail that does not fill
    a row is dropped unless it is the only row)."""
    if processor is None:
        raise ValueError("calibration needs the model's tokenizer (the checkpoint has none)")
    body = processor.encode(text, add_bos=False)
    if max_tokens:
        body = body[:max_tokens]
    bos = processor.encode("", add_bos=True)
    width = seq_len - len(bos)
    rows = [bos + body[i:i + width] for i in range(0, len(body), width)]
    rows = [r for r in rows if len(r) == seq_len] or rows[:1]
    if len(rows[0]) < 16:
        raise ValueError(f"the calibration text is too short ({len(body)} tokens)")
    return mx.array(rows)


@dataclass
class InputStats:
    """Per-input-channel statistics of a module's inputs; leading axes index experts for expert banks."""

    sum_sq: mx.array  # (..., in) Σ x²
    sum_abs: mx.array  # (..., in) Σ |x|
    count: mx.array  # (..., 1) tokens seen

    def mean_sq(self) -> mx.array:
        return self.sum_sq / mx.maximum(self.count, 1)

    def mean_abs(self) -> mx.array:
        return self.sum_abs / mx.maximum(self.count, 1)

    def add(self, other: "InputStats") -> "InputStats":
        return InputStats(self.sum_sq + other.sum_sq, self.sum_abs + other.sum_abs, self.count + other.count)


def input_stats(x: mx.array) -> InputStats:
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    return InputStats((x * x).sum(0), mx.abs(x).sum(0), mx.array([x.shape[0]], mx.float32))


def _per_expert_stats(x: mx.array, indices: mx.array, num_experts: int) -> InputStats:
    """Stats of the tokens routed to each expert: one-hot routing (E, T) times x², |x|."""
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    onehot = (indices[..., None] == mx.arange(num_experts)).any(axis=1).astype(mx.float32).T  # (E, T)
    return InputStats(onehot @ (x * x), onehot @ mx.abs(x), onehot.sum(-1, keepdims=True))


def _down_inputs_stats(experts, x: mx.array, indices: mx.array) -> InputStats:
    """Stats of each expert's down-projection input gelu(x Wg^T) * (x Wu^T) over the tokens routed to it."""
    bank = experts.gate_up_proj
    E, two_i, _ = bank.shape
    inter = two_i // 2
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    routed = np.array(indices.reshape(x.shape[0], -1))
    sum_sq, sum_abs, count = [], [], []
    for e in range(E):
        tokens = np.flatnonzero((routed == e).any(-1))
        if len(tokens) == 0:
            sum_sq.append(mx.zeros((inter,)))
            sum_abs.append(mx.zeros((inter,)))
            count.append(0)
            continue
        gu = x[mx.array(tokens)] @ bank[e].astype(mx.float32).T
        h = nn.gelu_approx(gu[:, :inter]) * gu[:, inter:]
        sum_sq.append((h * h).sum(0))
        sum_abs.append(mx.abs(h).sum(0))
        count.append(len(tokens))
    return InputStats(mx.stack(sum_sq), mx.stack(sum_abs), mx.array(count, mx.float32)[:, None])


_paused = 0  # > 0 while observed modules are being re-run by a hook (no recording, no nested hooks)


@contextlib.contextmanager
def unobserved():
    """Observed modules behave as their own class inside this block (hooks may re-run what they observe)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def _observed_call(cls, path: str, before, after):
    def __call__(self, *args, **kwargs):
        if _paused:
            return cls.__call__(self, *args, **kwargs)
        if before is not None:
            before(path, self, args)
        out = cls.__call__(self, *args, **kwargs)
        if after is not None:
            with unobserved():
                after(path, self, args, out)
        return out

    return __call__


@contextlib.contextmanager
def observe(modules: dict[str, nn.Module], before=None, after=None):
    """While active, every call of modules[path] first calls before(path, module, args) and then
    after(path, module, args, output)."""
    originals = {}
    try:
        for path, module in modules.items():
            cls = type(module)
            originals[path] = cls
            module.__class__ = type(cls.__name__, (cls,), {"__call__": _observed_call(cls, path, before, after)})
        yield
    finally:
        for path, cls in originals.items():
            modules[path].__class__ = cls


def recorder(stats: dict[str, InputStats]):
    """A `before` hook that adds each call's input statistics to `stats` (see the module docstring)."""
    from ..moe import Experts

    def add(key, value):
        mx.eval(value.sum_sq, value.sum_abs, value.count)
        stats[key] = stats[key].add(value) if key in stats else value

    def record(path, module, args):
        x = args[0]
        if isinstance(module, Experts):
            indices = args[1]
            add(path, _per_expert_stats(x, indices, module.gate_up_proj.shape[0]))
            add(path + ".down_proj", _down_inputs_stats(module, x, indices))
        else:
            add(path, input_stats(x))

    record.add = add
    return record


def collect(model: nn.Module, batches: mx.array, paths: list[str]) -> dict[str, InputStats]:
    """Input statistics of the named modules over forward passes of the float model on `batches` (B, L), one row
    at a time. Expert banks (`Experts`) get per-expert stats for both banks: `<path>` for the gate/up input and
    `<path>.down_proj` for the down input. `lm_head` holds the final hidden states' (the LM head's input)."""
    modules = dict(model.named_modules())
    stats: dict[str, InputStats] = {}
    record = recorder(stats)
    with observe({p: modules[p] for p in paths if p in modules}, before=record):
        for row in range(batches.shape[0]):
            record.add("lm_head", input_stats(model.language_model(batches[row:row + 1])))
    return stats

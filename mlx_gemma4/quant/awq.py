"""AWQ-style per-channel scaling, folded exactly into the operation that produces the scaled input.

For a group of linears that read the same input x, scaling input channel j of their weights by s_j and dividing the
producer's output channel j by s_j leaves the model's function unchanged, while the channels that carry large
activations get finer quantization steps (their weights become larger within their group). s = mean|x|^alpha, the
alpha chosen per group (a grid search) to minimize the activation-weighted quantization error Σ_j E[x_j²]/s_j² ·
Σ_i (W_ij s_j - Q(W s)_ij)².

Where Gemma's structure makes the fold exact:
  * q/k/v projections (one scale for all three): into `input_layernorm` (RMSNorm: weight w for Gemma 4, (1 + w) for
    Gemma 3; the q/k norms come after the projections and the scale is on their input side, so they are untouched).
  * dense MLP gate/up: into `pre_feedforward_layernorm`; the expert bank's gate/up (one scale shared by all
    experts): into `pre_feedforward_layernorm_2`.
  * down projections: into the rows of the up projection (GeGLU: down(gelu(gate) * up) is linear in up), per expert
    for the bank.
  * o_proj: into the rows of v_proj only without a value norm (Gemma 3; Gemma 4 normalizes v, which undoes any
    scale) and when v has its own projection (not Gemma 4's k=v layers); one scale per kv-head channel, shared by
    the query heads that read it.
Not folded (no exact producer): the PLE gate and projection, the router, the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import affine
from .calibrate import InputStats

ALPHAS = tuple(i / 10 for i in range(11))


@dataclass
class ScaleGroup:
    """Weight matrices reading one input, and how to fold a per-channel scale into what produces that input."""

    kind: str  # qkv, gate_up, down, o_proj, experts.gate_up, experts.down
    matrices: list[tuple[nn.Module, str]]  # (module, attribute): weight matrices, input channels last
    stats_keys: list[str]  # calibrate.collect keys of the matrices' input statistics (rescaled with the input)
    magnitude: mx.array  # mean |x| per producer channel (..., c): AWQ's s = magnitude^alpha
    fold: Callable[[mx.array], None]  # divides producer channel j by s_j
    expand: Callable[[mx.array], mx.array] = lambda s: s  # producer channels -> the matrices' input channels


def _norm_fold(norm: nn.Module):
    def fold(s):
        offset = getattr(norm, "offset", 0.0)
        w = norm.weight.astype(mx.float32)
        norm.weight = ((w + offset) / s - offset).astype(norm.weight.dtype)
    return fold


def _rows_fold(module: nn.Module, name: str, start: int = 0):
    """Divide the output rows start:start+len(s) of module.<name> (..., out, in) by s (..., len)."""
    def fold(s):
        w = getattr(module, name)
        wf = w.astype(mx.float32)
        stop = start + s.shape[-1]
        part = wf[..., start:stop, :] / s[..., None]
        wf = mx.concatenate([wf[..., :start, :], part, wf[..., stop:, :]], axis=-2)
        setattr(module, name, wf.astype(w.dtype))
    return fold


def scale_groups(layer: nn.Module, path: str, stats: dict[str, InputStats]) -> list[ScaleGroup]:
    """The exact folds available in one decoder layer (see the module docstring)."""
    groups = []
    attn, mlp = layer.self_attn, layer.mlp
    key = f"{path}.self_attn.q_proj"
    if key in stats:
        names = [n for n in ("q_proj", "k_proj", "v_proj") if n in attn]
        groups.append(ScaleGroup("qkv", [(attn[n], "weight") for n in names], [f"{path}.self_attn.{n}" for n in names],
                                 stats[key].mean_abs(), _norm_fold(layer.input_layernorm)))
    key = f"{path}.mlp.gate_proj"
    if key in stats:
        groups.append(ScaleGroup("gate_up", [(mlp.gate_proj, "weight"), (mlp.up_proj, "weight")],
                                 [key, f"{path}.mlp.up_proj"], stats[key].mean_abs(),
                                 _norm_fold(layer.pre_feedforward_layernorm)))
    key = f"{path}.mlp.down_proj"
    if key in stats:
        groups.append(ScaleGroup("down", [(mlp.down_proj, "weight")], [key], stats[key].mean_abs(),
                                 _rows_fold(mlp.up_proj, "weight")))
    key = f"{path}.self_attn.o_proj"
    if key in stats and "v_proj" in attn and not attn.use_value_norm:
        # o_proj's input channel (head h, d) is v's channel (h // heads_per_kv, d): one scale per v channel
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        magnitude = stats[key].mean_abs().reshape(Hkv, H // Hkv, D).mean(1).reshape(-1)
        expand = lambda s: mx.repeat(s.reshape(Hkv, 1, D), H // Hkv, axis=1).reshape(-1)
        groups.append(ScaleGroup("o_proj", [(attn.o_proj, "weight")], [key], magnitude, _rows_fold(attn.v_proj, "weight"),
                                 expand))
    key = f"{path}.experts"
    if key in stats and getattr(layer, "has_moe", False):
        experts = layer.experts
        st = stats[key]
        pooled = st.sum_abs.sum(0) / mx.maximum(st.count.sum(), 1)
        groups.append(ScaleGroup("experts.gate_up", [(experts, "gate_up_proj")], [key], pooled,
                                 _norm_fold(layer.pre_feedforward_layernorm_2)))
        inter = experts.down_proj.shape[-1]
        groups.append(ScaleGroup("experts.down", [(experts, "down_proj")], [key + ".down_proj"],
                                 stats[key + ".down_proj"].mean_abs(), _rows_fold(experts, "gate_up_proj", inter)))
    return groups


def _per_row(x: mx.array) -> mx.array:
    """A per-input-channel vector against the matrices: (in,) as is, per expert (E, in) as (E, 1, in)."""
    return x[:, None, :] if x.ndim == 2 else x


SEARCH_ROWS = 256  # rows of each matrix the alpha search quantizes (evenly spaced; the error is a sample mean)


def _sample_rows(w: mx.array) -> mx.array:
    rows = w.shape[-2]
    if rows <= SEARCH_ROWS:
        return w
    return w[..., mx.arange(0, rows, rows // SEARCH_ROWS)[:SEARCH_ROWS], :]


def _scaled_error(group: ScaleGroup, s: mx.array, stats: dict[str, InputStats], bits: int,
                  group_size: int) -> mx.array:
    """Σ over the group's matrices (sampled rows) of the activation-weighted error of quantizing W·s with the
    fitted quantizer, in the original units: Σ_j a_j / s_j² · (W_ij s_j - Q(W s)_ij)²."""
    total = mx.array(0.0)
    sc = _per_row(group.expand(s))
    for (module, name), key in zip(group.matrices, group.stats_keys):
        importance = _per_row(stats[key].mean_sq()) / (sc * sc)  # expert banks: each expert's own tokens
        ws = _sample_rows(getattr(module, name).astype(mx.float32)) * sc
        total = total + ((ws - affine.fake_quantize(ws, group_size, bits, importance)) ** 2 * importance).sum()
    return total


def search_scale(group: ScaleGroup, stats: dict[str, InputStats], bits: int, group_size: int) -> mx.array | None:
    """The per-channel scale with the least weighted error over ALPHAS (None when alpha 0, no scaling, wins)."""
    x = group.magnitude + 1e-8
    best, best_err = None, None
    for alpha in ALPHAS:
        s = x ** alpha
        s = s / mx.sqrt(s.max(-1, keepdims=True) * s.min(-1, keepdims=True))
        err = float(_scaled_error(group, s, stats, bits, group_size))
        if best_err is None or err < best_err:
            best, best_err = (None if alpha == 0 else s), err
    return best


def apply_scale(group: ScaleGroup, s: mx.array, stats: dict[str, InputStats]) -> None:
    """Fold s into the producer, multiply the matrices' input channels by it, and rescale their input stats."""
    group.fold(s)
    sc = group.expand(s)
    for module, name in group.matrices:
        w = getattr(module, name)
        setattr(module, name, (w.astype(mx.float32) * _per_row(sc)).astype(w.dtype))
    for key in set(group.stats_keys):
        st = stats[key]
        stats[key] = InputStats(st.sum_sq / (sc * sc), st.sum_abs / sc, st.count)


def scale_layer(layer: nn.Module, prefix: str, stats: dict[str, InputStats], bits: int, group_size: int) -> int:
    """Search and fold the scales of one decoder layer; returns how many groups were scaled. Groups with a matrix
    whose input width is not a multiple of `group_size` stay as they are (that matrix stays in float)."""
    scaled = 0
    for group in scale_groups(layer, prefix, stats):
        if any(getattr(module, name).shape[-1] % group_size for module, name in group.matrices):
            continue
        s = search_scale(group, stats, bits, group_size)
        if s is not None:
            apply_scale(group, s, stats)
            mx.eval(layer.parameters())
            scaled += 1
    return scaled

"""The MLX checkpoint layouts of Gemma 4 on disk, mapped onto our parameter tree and back.

mlx-vlm (`mlx_vlm.convert`, text + towers) and mlx-lm (`mlx_lm.convert`, text only) write the same names:

  decoder      `language_model.model.X`           ours: `language_model.X`
  LM head      `language_model.lm_head.X`         ours: `lm_head.X` (only when not tied)
  MoE experts  `...experts.switch_glu.gate_proj`  ours: one fused bank `...experts.gate_up_proj` (E, 2I, H),
               `...experts.switch_glu.up_proj`          gate rows first, then up rows (concatenated at load)
               `...experts.switch_glu.down_proj`  ours: `...experts.down_proj`
               each `.weight` / `.scales` / `.biases`;  ours: `<bank>`, `<bank>_scales`, `<bank>_biases`
  towers       `vision_tower.*`, `embed_vision.*`, `audio_tower.*`, `embed_audio.*`: as ours, the audio
               convolutions already channels-last (MLX layout)

Their `config.json` carries a `quantization` entry (mlx-lm/mlx-vlm also copy it to `quantization_config`):
global `group_size` / `bits` / `mode` plus per-module overrides keyed by module path (a dict, or `false` for a
module left in float). An override without `mode` is affine (what `to_quantized` defaults to). A module that is
not named stays in float unless its `.scales` are stored: how each module is actually quantized is read off its
tensors (packed width -> bits, scales count -> group size, uint8 scales -> a floating-point mode) and checked
against what the config declares for it. mlx-lm drops `vision_config` from text-only conversions but keeps
`audio_config`; a tower whose config is present but whose tensors are all absent is left out of the model.

Our own earlier layout (`language_model.X`, fused banks, config `quantization` with a `recipe` key) still loads;
`python -m mlx_gemma4.convert` now writes the mlx-vlm layout (`to_mlx_layout`, `mlx_quantization_entry`).
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .kernels.products import QUANT_MODES, quant_params_problem
from .moe import Experts, QuantizedExperts

MLX_DECODER = "language_model.model."
OUR_DECODER = "language_model."
MLX_HEAD, OUR_HEAD = "language_model.lm_head.", "lm_head."
BANK_SUFFIXES = {"weight": "", "scales": "_scales", "biases": "_biases"}  # theirs -> appended to our bank name
# each optional front end's top-level modules (vision_embedder: the 12B's encoder-free one)
TOWER_PARTS = {"vision": ("vision_tower", "vision_embedder", "embed_vision"), "audio": ("audio_tower", "embed_audio")}
FORMATS = ("mlx-vlm", "mlx-lm")


# ---- names ----------------------------------------------------------------------------------------------

def our_module_path(path: str) -> str:
    """An mlx-lm/mlx-vlm module or tensor path -> ours (HF and our own paths pass through)."""
    if path.startswith(MLX_DECODER):
        return OUR_DECODER + path[len(MLX_DECODER):]
    if path.startswith(MLX_HEAD):
        return OUR_HEAD + path[len(MLX_HEAD):]
    return path


def mlx_module_path(path: str) -> str:
    """One of our module or tensor paths -> mlx-vlm's (expert banks excluded: see `to_mlx_layout`)."""
    if path.startswith(OUR_HEAD):
        return MLX_HEAD + path[len(OUR_HEAD):]
    if path.startswith(OUR_DECODER):
        return MLX_DECODER + path[len(OUR_DECODER):]
    return path


def _switch_glu_parts(name: str) -> tuple[str, str, str] | None:
    """`P.experts.switch_glu.gate_proj.scales` -> ("P.experts", "gate_proj", "scales")."""
    m = re.fullmatch(r"(.*\.experts)\.switch_glu\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)", name)
    return (m[1], m[2], m[3]) if m else None


def from_mlx_layout(weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], list[str]]:
    """mlx-lm/mlx-vlm names -> ours, each expert module's gate and up banks stacked into our fused bank (read
    and concatenated here, one bank at a time). Other layouts pass through unchanged (lazily).
    Consumes `weights`. Returns (weights, problems): a gate bank without a matching up bank is a problem."""
    out: dict[str, mx.array] = {}
    split: dict[tuple[str, str], dict[str, mx.array]] = {}
    problems = []
    for name in list(weights):
        parts = _switch_glu_parts(name)
        w = weights.pop(name)
        if parts is None:
            out[our_module_path(name)] = w
            continue
        experts, proj, kind = parts
        experts = our_module_path(experts)
        if proj == "down_proj":
            out[f"{experts}.down_proj{BANK_SUFFIXES[kind]}"] = w
        else:
            split.setdefault((experts, kind), {})[proj] = w
    for (experts, kind), banks in split.items():
        gate, up = banks.get("gate_proj"), banks.get("up_proj")
        if gate is None or up is None or gate.dtype != up.dtype or gate.shape != up.shape:
            shapes = {p: (tuple(w.shape), str(w.dtype)) for p, w in banks.items()}
            problems.append(f"{mlx_module_path(experts)}.switch_glu: gate_proj and up_proj {kind} must be stored "
                            f"alike to form one gate/up bank, got {shapes}")
            continue
        fused = mx.concatenate([gate, up], axis=-2)
        # evaluated now, bank by bank, so the split halves are freed as we go: left lazy, MLX may read every
        # layer's halves before concatenating any (the 26B: ~9 GB more at the peak)
        mx.eval(fused)
        out[f"{experts}.gate_up_proj{BANK_SUFFIXES[kind]}"] = fused
        del gate, up, banks
    return out, problems


def to_mlx_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameter names -> mlx-vlm's; each fused gate/up bank split back into gate_proj and up_proj."""
    out: dict[str, mx.array] = {}
    for name, w in weights.items():
        m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)(|_scales|_biases)", name)
        if m is None:
            out[mlx_module_path(name)] = w
            continue
        base = mlx_module_path(m[1]) + ".switch_glu."
        kind = {v: k for k, v in BANK_SUFFIXES.items()}[m[3]]
        if m[2] == "down_proj":
            out[f"{base}down_proj.{kind}"] = w
        else:
            inter = w.shape[-2] // 2
            out[f"{base}gate_proj.{kind}"] = w[..., :inter, :]
            out[f"{base}up_proj.{kind}"] = w[..., inter:, :]
    return out


def drop_absent_towers(config: ModelConfig, names) -> None:
    """Leave out of `config` each tower none of whose tensors the checkpoint has (text-only conversions keep the
    tower's config)."""
    present = {n.removeprefix("model.").split(".", 1)[0] for n in names}
    for kind, parts in TOWER_PARTS.items():
        if getattr(config, kind) is not None and not present & set(parts):
            setattr(config, kind, None)


# ---- quantization ---------------------------------------------------------------------------------------

def quantization_entry(raw: dict) -> dict | None:
    """The config's MLX quantization entry: `quantization`, else mlx-lm's copy in `quantization_config`."""
    entry = raw.get("quantization")
    if entry is None:
        entry = raw.get("quantization_config")
    return entry or None


def _as_rule(rule: Any) -> dict | bool:
    """A config rule for one matrix as {group_size, bits, mode} (an override without a mode is affine), or
    False (float)."""
    if isinstance(rule, dict):
        return {"group_size": rule.get("group_size"), "bits": rule.get("bits"), "mode": rule.get("mode", "affine")}
    return False


def _describe(q: dict | bool) -> str:
    return f"{q['mode']} {q['bits']}-bit, group size {q['group_size']}" if q else "float (not quantized)"


def _rules(entry: dict, problems: list[str], rename) -> dict[str, dict | bool]:
    """The config's per-module overrides keyed by our matrix paths (`rename` maps a checkpoint module path onto
    ours): a module path, or `<experts>.gate_up_proj` / `<experts>.down_proj` for one expert bank (from SwitchGLU
    overrides, or our expert modules' per-bank entries)."""
    rules: dict[str, dict | bool] = {}
    for key, rule in entry.items():
        if not (isinstance(rule, dict) or rule is False):
            continue
        parts = _switch_glu_parts(key + ".weight")
        if parts is None:
            path = rename(key)
            rules[path] = _as_rule(rule)
            for bank in ("gate_up_proj", "down_proj"):  # our expert modules' per-bank entries
                if isinstance(rule, dict) and bank in rule:
                    rules[f"{path}.{bank}"] = _as_rule(rule[bank])
            continue
        experts, proj, _ = parts
        bank = f"{rename(experts)}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        if bank in rules and rules[bank] != _as_rule(rule):
            problems.append(f"{experts}.switch_glu: gate_proj and up_proj are declared with different "
                            "quantizations; they form one gate/up bank here")
        rules[bank] = _as_rule(rule)
    return rules


def _stored(in_dim: int, packed: mx.array | None, scales: mx.array | None) -> dict | bool | str:
    """How a matrix is stored, read off its tensors: {group_size, bits, mode}, False (float, no scales), or why
    the tensors can't be a quantized matrix."""
    if scales is None:
        if packed is not None and packed.dtype == mx.uint32:
            return f"packed uint32 weight {tuple(packed.shape)} stored without its scales"
        return False
    if packed is None or packed.dtype != mx.uint32 or packed.ndim < 2 or scales.ndim != packed.ndim:
        what = "missing" if packed is None else f"{packed.dtype} {tuple(packed.shape)}"
        return f"scales {tuple(scales.shape)} stored with a packed weight that is {what}, not MLX's uint32 packing"
    bits, rem_b = divmod(packed.shape[-1] * 32, in_dim)
    group_size, rem_g = divmod(in_dim, scales.shape[-1]) if scales.shape[-1] else (0, 1)
    if rem_b or rem_g:
        return f"packed width {packed.shape[-1]} and {scales.shape[-1]} scales per row do not fit {in_dim} inputs"
    if scales.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    modes = [m for m in QUANT_MODES if m != "affine" and not quant_params_problem(group_size, bits, m)]
    if not modes:
        return f"uint8 scales with {bits} bits and group size {group_size} match no MLX floating-point mode"
    return {"group_size": group_size, "bits": bits, "mode": modes[0]}


def _matrices(path: str, module: nn.Module) -> list[tuple[str, str, str, int]]:
    """(matrix path, packed tensor key, scales key, input width) of each matrix a quantizable module holds."""
    if isinstance(module, Experts):
        return [(f"{path}.{bank}", f"{path}.{bank}", f"{path}.{bank}_scales", module[bank].shape[-1])
                for bank in ("gate_up_proj", "down_proj")]
    return [(path, f"{path}.weight", f"{path}.scales", module.weight.shape[-1])]


def checkpoint_quantization(model: nn.Module, weights: dict[str, mx.array], raw_config: dict,
                            rename=our_module_path) -> tuple[dict | None, list[str]]:
    """Our quantization plan for a quantized MLX checkpoint (weights under our names, model not yet quantized):
    the global settings plus, for each quantizable module, how its tensors are quantized ({group_size, bits,
    mode}; for an expert module also `gate_up_proj` / `down_proj`, each bank's own or False) or False.

    `rename` maps the module paths the entry names onto ours (mlx-lm's Gemma 4 text-only model says `model.X`).
    Returns (plan, problems); plan None when the config declares no quantization. A problem is an invalid
    setting, a module whose tensors disagree with what the config declares for it (its own override, else the
    global setting when the module is quantized: modules the config does not name may stay in float, as mlx-lm
    and mlx-vlm write them), or quantized tensors with no quantization entry at all."""
    entry = quantization_entry(raw_config)
    if entry is None:
        packed = [k for k in weights if k.endswith((".scales", "_scales"))]
        return None, [f"the checkpoint stores quantized tensors ({packed[0]} and {len(packed) - 1} more) but its "
                      "config.json has no `quantization` entry"] if packed else []
    if not isinstance(entry, dict):
        return {}, [f"the quantization entry must be a JSON object, got {entry!r}"]
    if "quant_method" in entry and "bits" not in entry:
        return {}, [f"quantization_config quant_method {entry['quant_method']!r} is not an MLX quantization "
                    "(convert the checkpoint with mlx_lm.convert or mlx_vlm.convert, or load the original weights)"]
    problems: list[str] = []
    default = {"group_size": entry.get("group_size"), "bits": entry.get("bits"), "mode": entry.get("mode", "affine")}
    if problem := quant_params_problem(**default):
        problems.append(f"global quantization setting: {problem}")
    rules = _rules(entry, problems, rename)
    problems += [f"{path}: {problem}" for path, rule in rules.items()
                 if rule and (problem := quant_params_problem(**rule))]
    if problems:  # settings no module could be checked against
        return {}, problems
    plan: dict[str, Any] = dict(default)
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        found = []
        for matrix, packed_key, scales_key, in_dim in _matrices(path, module):
            stored = _stored(in_dim, weights.get(packed_key), weights.get(scales_key))
            declared = rules.get(matrix, rules.get(path))
            if declared is None:  # not named: float, or quantized with the global settings
                declared = default if stored else False
            if isinstance(stored, str):
                problems.append(f"{matrix}: {stored}")
            elif stored and (problem := quant_params_problem(**stored)):
                problems.append(f"{matrix}: {problem}")
            elif stored != declared:
                problems.append(f"{matrix}: the config says {_describe(declared)}, its tensors are "
                                f"{_describe(stored)}")
            found.append(stored if isinstance(stored, dict) else False)
        if len(found) == 2 and any(found):  # expert banks: each its own (mlx-lm may leave one in float)
            plan[path] = dict(found[0] or found[1], gate_up_proj=found[0], down_proj=found[1])
        else:
            plan[path] = found[0] if len(found) == 1 else False
    return plan, sorted(problems, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


def mlx_quantization_entry(model: nn.Module) -> dict | None:
    """The `quantization` entry mlx-lm and mlx-vlm load a model's current quantization from: the most common
    (group_size, bits, mode) as the global setting, an override (mlx-vlm's module path) for every quantized
    module that differs from it or that mlx-vlm would otherwise skip (weights whose size is not a multiple of 64),
    None when nothing is quantized."""
    specs: dict[str, dict] = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            specs[mlx_module_path(path)] = {"group_size": module.group_size, "bits": module.bits,
                                            "mode": module.mode, "_size": module.weight.size * 32 // module.bits}
        elif isinstance(module, QuantizedExperts):
            base = mlx_module_path(path) + ".switch_glu."
            for bank, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                q = module.quantization[bank]
                if q is None:
                    continue  # a float bank: no scales stored, which both loaders read as float
                size = module[bank].size * 32 // q.bits // len(projs)
                for proj in projs:
                    specs[base + proj] = {"group_size": q.group_size, "bits": q.bits, "mode": q.mode, "_size": size}
    if not specs:
        return None
    counts: dict[tuple, int] = {}
    for q in specs.values():
        key = (q["group_size"], q["bits"], q["mode"])
        counts[key] = counts.get(key, 0) + 1
    gs, bits, mode = max(counts, key=counts.get)
    entry: dict[str, Any] = {"group_size": gs, "bits": bits, "mode": mode}
    for path, q in specs.items():
        if (q["group_size"], q["bits"], q["mode"]) != (gs, bits, mode) or q["_size"] % 64:
            entry[path] = {k: q[k] for k in ("group_size", "bits", "mode")}
    return entry


# ---- config ---------------------------------------------------------------------------------------------

def published_text_config(text: dict, parsed) -> dict:
    """A text config in Google's published spelling (`global_head_dim`, `num_global_key_value_heads`) that
    mlx-lm and mlx-vlm read; transformers >= 5.2x writes a `per_layer_config` table instead."""
    text = dict(text)
    if not text.pop("per_layer_config", None):
        return text
    full = [i for i, t in enumerate(parsed.layer_types) if t == "full_attention"]
    sliding = [i for i, t in enumerate(parsed.layer_types) if t != "full_attention"]
    for group, head_dim_key, kv_key in ((full, "global_head_dim", "num_global_key_value_heads"),
                                        (sliding, "head_dim", "num_key_value_heads")):
        dims = {parsed.layer_head_dims[i] for i in group}
        kvs = {parsed.layer_kv_heads[i] for i in group}
        if len(dims) > 1 or len(kvs) > 1:
            raise ValueError("per_layer_config gives layers of one attention type different head sizes; mlx-lm and "
                             "mlx-vlm cannot express that")
        if dims:
            text[head_dim_key] = dims.pop()
        if kvs and (kv_key == "num_key_value_heads" or parsed.attention_k_eq_v):
            text[kv_key] = kvs.pop()
    return text


def mlx_config(raw: dict, config: ModelConfig, quantization: dict | None, fmt: str) -> dict:
    """config.json for a checkpoint written in `fmt` ("mlx-vlm" or "mlx-lm"): the quantization entry under both
    keys as they write it and, for Gemma 4, a `gemma4` config (a text-only `gemma4_text` one is wrapped, as
    mlx_vlm/mlx_lm expect) in the published spelling with the top-level `vocab_size` mlx-lm reads (it assumes
    262144 otherwise); mlx-lm's text-only layout has no tower configs."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r} (expected one of {', '.join(FORMATS)})")
    out = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config", "torch_dtype")}
    if quantization:
        out["quantization"] = out["quantization_config"] = quantization
    if config.model_type not in ("gemma4", "gemma4_text"):
        return out  # other family members (Gemma 3, the 12B, drafters) keep their config: only we read them
    if config.model_type == "gemma4_text":  # wrapped: the text config inside, the model-level keys outside
        top = ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings", "dtype", "quantization",
               "quantization_config")
        out = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
               "text_config": {k: v for k, v in out.items() if not k.startswith("quantization")},
               **{k: out[k] for k in top if k in out}}
    out["text_config"] = published_text_config(out["text_config"], config.text)
    out["vocab_size"] = config.text.vocab_size
    for kind in TOWER_PARTS:
        if fmt == "mlx-lm" or getattr(config, kind) is None:
            out.pop(f"{kind}_config", None)
    return out

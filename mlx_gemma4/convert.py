"""Convert a Gemma 4 checkpoint (Hugging Face or any MLX layout `load` reads) into an MLX checkpoint, optionally
quantized.

    python -m mlx_gemma4.convert --model google/gemma-4-E2B-it --out gemma-4-E2B-it-4bit --bits 4 --recipe mixed
    python -m mlx_gemma4.convert --model google/gemma-4-26B-A4B-it --out gemma-4-26B-A4B-it-mxfp4 --mode mxfp4

Writes the mlx-vlm layout (text + towers; `--format mlx-lm`: mlx-lm's, text only; see `layouts`): safetensors
shards (+ model.safetensors.index.json), config.json with the `quantization` entry those libraries and `load`
read, and the tokenizer, chat template and processor files. Quantization is the loader's (`mlx_gemma4.quant`
through `load(quantize=...)`), so `load(src, quantize=B, group_size=G, recipe=R, quantize_mode=M, dtype=D)`
builds exactly the model that converting with the same settings and loading the result does.

Modes: MLX's (`affine` at 2, 3, 4, 5, 6 or 8 bits, group size 32/64/128; `mxfp4`, `mxfp8`, `nvfp4`, whose bits
and group size are fixed). Recipes (`mlx_gemma4.quant.recipes`): `uniform` quantizes every eligible linear and
embedding to `bits`; `mixed` keeps the tensors 4 bits hurts most at affine 8 bits: the token embedding (also the
tied LM head), the per-layer-embedding (PLE) table, its projection and per-layer gates, and the MoE router
(`quant.plan.MIXED_8BIT`); `dynamic` also raises the decoder matrices whose quantization hurts most to 6 or 8 bits
within a bits-per-weight budget; `awq` is mixed with AWQ per-channel scales folded into the norms/linears. Affine
scales and biases are fitted to the least (activation-weighted) squared error; `minmax`/`mixed-minmax` are MLX's
plain min/max. Tensors whose input width is not a multiple of the group size stay in float.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from mlx.utils import tree_flatten

from . import layouts
from .kernels.products import QUANT_MODES, quant_params_problem
from .loading import load_model, resolve_path
from .model import is_tower_param
from .quant import Recipe, as_recipe
from .quant.budget import describe
from .runtime import RuntimePolicy
from .safetensors_io import save_shards

# Non-weight files a checkpoint ships that `load` and the processors read.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json", "processor_config.json",
              "preprocessor_config.json", "video_preprocessor_config.json")


def source_dtype(config: dict) -> str:
    """The dtype a checkpoint was published in (config `dtype`/`torch_dtype`), bfloat16 if it does not say."""
    for d in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(d.get(key), str) and d[key] in ("float32", "bfloat16", "float16"):
                return d[key]
    return "bfloat16"


def quantization_settings(bits: int | None, group_size: int | None, mode: str) -> tuple[int | None, int]:
    """(bits, group_size) for `mode` with the defaults filled in: the fp modes have one of each (mxfp4: 4 bits,
    group 32) and quantize without `bits`; affine quantizes only with `bits`, in groups of 64 by default."""
    if mode not in QUANT_MODES:
        raise ValueError(quant_params_problem(group_size, bits, mode))
    allowed = QUANT_MODES[mode]
    if mode != "affine" and bits is None:
        bits = allowed["bits"][0]
    if group_size is None:
        group_size = 64 if mode == "affine" else allowed["group_sizes"][0]
    return bits, group_size


def convert(src: str | Path, out: str | Path, *, bits: int | None = None, group_size: int | None = None,
            recipe: str | Recipe = "uniform", mode: str = "affine", dtype: str | None = None,
            max_shard_gb: float = 5.0, overwrite: bool = False, fmt: str = "mlx-vlm",
            report: Callable[[str], None] | None = None) -> Path:
    """Convert `src` (directory or Hub id, any layout `load` reads) into an MLX checkpoint at `out` in `fmt`
    ("mlx-vlm": text + towers, or "mlx-lm": text only); returns `out`. Quantized with `bits` or a non-affine
    `mode` (see quantization_settings); `recipe`: a name or a `quant.Recipe`. When quantizing, `report` receives
    the summary (bits per weight, bits of every matrix; quant.budget.describe)."""
    if fmt not in layouts.FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(layouts.FORMATS)})")
    bits, group_size = quantization_settings(bits, group_size, mode)
    src_path = resolve_path(src)
    out = Path(out)
    if out.resolve() == src_path.resolve():
        raise ValueError("--out must differ from the source checkpoint directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    if bits is None and as_recipe(recipe) != Recipe():
        raise ValueError("--recipe needs --bits")
    raw = json.loads((src_path / "config.json").read_text())
    dtype = dtype or source_dtype(raw)
    policy = RuntimePolicy.from_arguments(dtype)
    target = policy.dtype
    model = load_model(src_path, quantize=bits, group_size=group_size, recipe=recipe, policy=policy, mode=mode)
    if bits and report is not None:
        report(describe(model))
    if "lm_head" in model and fmt == "mlx-vlm":
        raise ValueError("mlx-vlm's Gemma 4 ties the LM head to the token embeddings, but this checkpoint has its "
                         "own lm_head; use --format mlx-lm")
    config = layouts.mlx_config(raw, model.config, layouts.mlx_quantization_entry(model), fmt)
    config["dtype"] = str(target).split(".")[-1]

    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if fmt == "mlx-lm":
        weights = {k: v for k, v in weights.items() if not is_tower_param(k)}
    save_shards(layouts.to_mlx_layout(weights), out, int(max_shard_gb * (1 << 30)))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (src_path / name).is_file():
            shutil.copy2(src_path / name, out / name)
    return out


if __name__ == "__main__":  # the command line lives in cli.py
    from mlx_gemma4.cli import convert_main

    raise SystemExit(convert_main())

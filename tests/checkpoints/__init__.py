"""Tiny random test checkpoints, written by transformers in the exact Hugging Face layout.

This is the one place test checkpoints are made; every test module shares it (see conftest.py), as
`import checkpoints` (pytest puts tests/ on the path: pyproject's `pythonpath`). One module per thing made:

  text.py        Gemma 4 text variants (e2b, e4b, 26b, 31b) and Gemma 3; the transformers oracle (load_hf)
  audio.py       the tiny audio tower and text + audio checkpoints
  vision.py      the tiny vision towers and text + vision (+ audio) checkpoints
  tokenizer.py   tiny byte-fallback BPE tokenizers with Gemma 4's control tokens and chat template
  gguf_file.py   make_text_checkpoint() checkpoints rewritten as llama.cpp gemma4 GGUF files
  family.py      the newer family members: Gemma 4 12B (gemma4_unified) and the MTP drafters (assistants)
  interop.py     conversions made by mlx-lm / mlx-vlm themselves, and their models on them (imported by the
                 interop tests only: it needs mlx_lm and mlx_vlm)
"""

from .audio import AUDIO_CONFIG, make_audio_checkpoint, randomize_audio_tower, tiny_audio_config
from .gguf_file import GGUF_MERGES, gguf_test_vocab, make_gemma4_gguf
from .text import (GEMMA3_TEXT, MM_TOKEN_IDS, TEXT_VARIANTS, VOCAB, load_hf, load_hf_gemma3, make_gemma3_checkpoint,
                   make_text_checkpoint, randomize_norms_and_scalars)
from .tokenizer import load_hf_tokenizer, make_tokenizer
from .vision import (VISION_FOR_TEXT, VISION_VARIANTS, calibration_images, make_multimodal_checkpoint,
                     make_multimodal_model, randomize_vision_tower, vision_config)

"""Helpers for the hardening tests: transformers' Gemma4Processor built from its parts over a tiny tokenizer,
small media files, a local HTTP server for URL media, and a subprocess runner with time/memory limits."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

import checkpoints

ROOT = Path(__file__).resolve().parent.parent
MM_SPECIAL_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                     "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}


@lru_cache(maxsize=1)
def mm_tokenizer_dir() -> Path:
    """The 512-id test tokenizer (with chat template) whose image/audio/video tokens sit at the tiny
    checkpoints' ids, made once per process."""
    out = Path(tempfile.mkdtemp(prefix="mm-tokenizer-"))
    return checkpoints.make_tokenizer(out, checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)


@lru_cache(maxsize=1)
def mm_processor():
    """Our Processor over mm_tokenizer_dir()."""
    from mlx_gemma4.processing import Processor

    return Processor.from_pretrained(mm_tokenizer_dir())


@lru_cache(maxsize=2)
def hf_processor(directory: str):
    """transformers' Gemma4Processor over the files in `directory` (its Pillow image processor, its audio
    feature extractor, a fast tokenizer with Gemma 4's multimodal tokens). transformers' video processor needs
    torchvision, which the test environment lacks: the processor is built without one (video inputs are
    compared through Gemma4Processor.replace_video_token instead)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    class WithoutVideoProcessor(Gemma4Processor):
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    directory = Path(directory)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", extra_special_tokens=MM_SPECIAL_TOKENS)
    return WithoutVideoProcessor(feature_extractor=Gemma4AudioFeatureExtractor(),
                                 image_processor=Gemma4ImageProcessorPil(), tokenizer=tokenizer,
                                 video_processor=None, chat_template=(directory / "chat_template.jinja").read_text())


def picture(seed: int, height: int = 64, width: int = 80) -> np.ndarray:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    return np.clip(base + rng.randint(0, 50, (height, width, 3)), 0, 255).astype(np.uint8)


def tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.randn(t.size)).astype(np.float32)


class StaticServer:
    """A local HTTP server (127.0.0.1, own thread) serving {path: bytes}; "/slow" never finishes its body."""

    def __init__(self, files: dict[str, bytes]):
        files = dict(files)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    for _ in range(100):
                        self.wfile.write(b"x" * 10)
                        self.wfile.flush()
                        time.sleep(0.1)
                    return
                if self.path == "/unsized":  # no Content-Length: the size limit applies while reading
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(files["/big"])
                    return
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def run_limited(code: str, *, memory_gb: float = 1.0, timeout_s: float = 5.0, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -c code` with an address-space limit (RLIMIT_AS) and a wall-clock timeout. The import of
    mlx_gemma4 happens before the limit: the limit bounds what the code under test allocates (MLX and numpy
    reserve address space at import). Prints 'ELAPSED <s>' and 'MAXRSS_MB <MB>' (the process's peak resident
    memory, /proc's VmHWM: getrusage's ru_maxrss would include the parent's peak, kept across fork and exec) on
    stderr at the end."""
    gb = int(memory_gb * 2**30)
    prelude = (
        "import resource, sys, time, traceback\n"
        "import mlx_gemma4, mlx.core, numpy\n"
        "from mlx_gemma4 import loading, gguf, config\n"
        f"_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)\n"
        f"_limit = _vm() + {gb} if (_vm := lambda: int(open('/proc/self/statm').read().split()[0]) * "
        "resource.getpagesize())() else 0\n"
        "resource.setrlimit(resource.RLIMIT_AS, (_limit, _hard))\n"
        "_t = time.perf_counter()\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.strip().splitlines()) +
        "finally:\n"
        "    print('ELAPSED', time.perf_counter() - _t, file=sys.stderr)\n"
        "    _hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "    print('MAXRSS_MB', int(_hwm) / 1024, file=sys.stderr)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tools")]))
    return subprocess.run([sys.executable, "-c", prelude], capture_output=True, text=True, timeout=timeout_s + 60,
                          env=env, cwd=cwd or ROOT)




def write_gemma3_gguf(path, *, block_count: int = 1, layers: int = 1, vocab: int = 640, hidden: int = 32,
                      metadata: dict | None = None) -> Path:
    """A small but complete llama.cpp gemma3 GGUF (random F32 weights, a `vocab`-token tokenizer) whose
    `gemma3.block_count` says `block_count` while it holds tensors for `layers` blocks. `metadata`: extra or
    replacement key -> value (strings, ints, floats, lists) written as they are."""
    import gguf

    rng = np.random.RandomState(0)
    heads, kv, head_dim, ffn = 2, 1, 16, 96
    writer = gguf.GGUFWriter(str(path), "gemma3")
    values = {"gemma3.block_count": block_count, "gemma3.embedding_length": hidden,
              "gemma3.feed_forward_length": ffn, "gemma3.attention.head_count": heads,
              "gemma3.attention.head_count_kv": kv, "gemma3.attention.key_length": head_dim,
              "gemma3.attention.value_length": head_dim, "gemma3.attention.sliding_window": 64,
              "gemma3.context_length": 2048, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
              "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}
    values.update(metadata or {})
    for key, value in values.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint64(key, value) if value >= 2**32 else writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (vocab - 260)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(vocab)])

    def tensor(name, *shape):
        writer.add_tensor(name, (0.02 * rng.randn(*shape)).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("attn_q", (heads * head_dim, hidden)),
                            ("attn_k", (kv * head_dim, hidden)), ("attn_v", (kv * head_dim, hidden)),
                            ("attn_output", (hidden, heads * head_dim)), ("attn_q_norm", (head_dim,)),
                            ("attn_k_norm", (head_dim,)), ("post_attention_norm", (hidden,)),
                            ("ffn_norm", (hidden,)), ("post_ffw_norm", (hidden,)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            tensor(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)

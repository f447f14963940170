"""Text generation: the Python API (`generate`, `stream_generate`) and the command line.

    python -m mlx_gemma4.generate --model google/gemma-4-E2B-it --prompt "Why is the sky blue?"
    python -m mlx_gemma4.generate --model PATH --chat            # multi-turn REPL, KV cache kept between turns

Tokens stream to stdout as they are generated; a stats line (prompt and generation tokens and tok/s, peak
memory, BLAS) goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx

from . import backend
from .engine import generate_step
from .prompt_cache import PromptCache, load_prompt_cache
from .sample import LogitsProcessor, make_logits_processors, make_sampler

DEFAULT_MODEL = "google/gemma-4-E2B-it"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens prefilled in this call (cached prefix tokens excluded)
    prompt_tps: float = 0.0
    cached_tokens: int = 0  # prefix tokens reused from a prompt cache
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    blas: str = ""
    finish_reason: str | None = None  # "stop" (stop token), "length" (max_tokens), None while running

    def summary(self) -> str:
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"prompt: {self.prompt_tokens} tokens{cached}, {self.prompt_tps:.1f} tok/s | "
                f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
                f"peak memory: {self.peak_memory_gb:.3f} GB | BLAS: {self.blas}")


@dataclass
class GenerationChunk:
    text: str  # newly completed text (may be empty while a multi-byte character is incomplete)
    token: int | None  # the token just generated (None on the final flush)
    stats: GenerationStats


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def stream_generate(model, processor, prompt, *, max_tokens: int = 256, system: str | None = None,
                    enable_thinking: bool = False, tools=None, use_chat_template: bool = True,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    seed: int | None = None, repetition_penalty: float | None = None, sampler=None,
                    logits_processors: Sequence[LogitsProcessor] | None = None,
                    prompt_cache: PromptCache | None = None, stop_token_ids: Sequence[int] | None = None,
                    prefill_step_size: int = 512, skip_special_tokens: bool = False, audio=None, images=None,
                    max_soft_tokens: int | None = None, media: dict | None = None) -> Iterator[GenerationChunk]:
    """Stream generated text. `prompt`: a string (formatted with the chat template unless
    use_chat_template=False), a message list, or token ids. `audio`: clips (paths, bytes or 16 kHz float
    arrays) for the user turn (see Processor.prompt_inputs). `prompt_cache`: caches holding a prefix of the
    prompt's ids (only the rest is prefilled; it is updated in place). `media`: processed image/audio arrays
    for token-id prompts whose placeholders are already expanded (see `engine.prefill`). The last chunk carries
    finish_reason."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
        if audio is not None or images is not None:
            raise ValueError("with token-id prompts pass processed media as `media=`, not audio=/images=")
        ids = [int(i) for i in prompt]
    else:
        ids, prompt_media = processor.prompt_inputs(
            prompt, system=system, enable_thinking=enable_thinking, tools=tools,
            use_chat_template=use_chat_template, images=images, audio=audio, max_soft_tokens=max_soft_tokens)
        media = {**prompt_media, **(media or {})} or None
    sampler = sampler or make_sampler(temperature, top_p, top_k, min_p, seed)
    processors = list(make_logits_processors(repetition_penalty)) + list(logits_processors or [])
    stop = set(processor.stop_token_ids if stop_token_ids is None else stop_token_ids)

    if prompt_cache is None:
        prompt_cache = PromptCache.fresh(model)
    cached = len(prompt_cache.tokens)
    if cached and (cached >= len(ids) or ids[:cached] != prompt_cache.tokens):
        warnings.warn("the prompt does not extend the prompt cache's tokens; prefilling it from scratch")
        prompt_cache.caches, prompt_cache.tokens, cached = model.make_cache(), [], 0
    new_ids = ids[cached:]
    if media and cached:
        raise ValueError("image/audio prompts cannot start from a prompt cache yet; pass a fresh one")

    stats = GenerationStats(prompt_tokens=len(new_ids), cached_tokens=cached, blas=backend.blas_in_use)
    detok = processor.tokenizer.detokenizer(skip_special=skip_special_tokens)
    mx.reset_peak_memory()
    start = time.perf_counter()
    gen_start = start
    steps = generate_step(model, new_ids, prompt_cache, sampler, logits_processors=processors,
                          max_tokens=max_tokens, prefill_step_size=prefill_step_size, media=media)
    text, token = "", None
    try:
        for n, token in enumerate(steps):
            now = time.perf_counter()
            if n == 0:
                stats.prompt_tps = len(new_ids) / max(now - start, 1e-9)
                gen_start = now
            else:
                stats.generation_tps = n / max(now - gen_start, 1e-9)
            stats.peak_memory_gb = _peak_gb()
            if token in stop:
                stats.finish_reason, text, token = "stop", "", None
                break
            stats.generation_tokens = n + 1
            text = detok.add(token)
            if n + 1 == max_tokens:
                stats.finish_reason = "length"
                break
            yield GenerationChunk(text, token, stats)
    finally:
        steps.close()
    yield GenerationChunk(text + detok.finalize(), token, stats)


def generate(model, processor, prompt, *, verbose: bool = False, **kwargs) -> str:
    """The whole reply as a string (see stream_generate for the arguments). verbose: stream it to stdout and
    print the stats line to stderr."""
    pieces = []
    chunk = None
    for chunk in stream_generate(model, processor, prompt, **kwargs):
        pieces.append(chunk.text)
        if verbose:
            print(chunk.text, end="", flush=True)
    if verbose and chunk is not None:
        print()
        print(chunk.stats.summary(), file=sys.stderr)
    return "".join(pieces)


# -- command line ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma4.generate", description="Generate text with Gemma 4 on MLX.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local directory or Hub repo id (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", help="the user message ('-' reads stdin); required unless --chat")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=_positive_int, default=256)
    p.add_argument("--temp", type=_non_negative, default=0.0, help="sampling temperature (0 = greedy, default)")
    p.add_argument("--top-p", type=_probability, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=_probability, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--thinking", action="store_true", help="let the model think before answering")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--image", nargs="+", default=[], metavar="PATH")
    p.add_argument("--max-soft-tokens", type=int, choices=(70, 140, 280, 560, 1120), default=None,
                   help="soft tokens per image (default: the checkpoint's, 280)")
    p.add_argument("--audio", nargs="+", default=[], metavar="PATH")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (KV cache kept between turns)")
    p.add_argument("--prompt-cache", metavar="FILE", help="a prefix cache from `python -m mlx_gemma4.prompt_cache`")
    p.add_argument("--dtype", default=None, help="compute dtype: float32 | bfloat16 | float16 (default: the backend's best)")
    p.add_argument("--weights-dtype", default=None,
                   help="store float weights as bfloat16 | float16 under float32 compute: half the memory, products "
                        "upcast per call (default: the compute dtype)")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="quantize the weights at load time")
    return p


def load_for_cli(model_id, dtype=None, quantize=None, weights_dtype=None):
    from .loading import load

    model, processor = load(model_id, dtype=dtype, quantize=quantize, weights_dtype=weights_dtype)
    if processor is None:
        raise FileNotFoundError(f"{model_id} has no tokenizer.json; it cannot be prompted with text")
    return model, processor


def _check_files(paths: list[str], kind: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{kind}: no such file: {path}")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"--{kind}: cannot read {path}")


def _run_chat(model, processor, args, gen_kwargs) -> None:
    from .session import ChatSession

    session = ChatSession(model, processor, system=args.system, enable_thinking=args.thinking)
    first = args.prompt
    interactive = sys.stdin.isatty()
    while True:
        if first is not None:
            text, first = first, None
        else:
            if interactive:
                print(">> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if not text:
                continue
        chunk = None
        for chunk in session.send(text, **gen_kwargs):
            print(chunk.text, end="", flush=True)
        print(flush=True)
        print(chunk.stats.summary(), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is None and not args.chat:
        parser.error("--prompt is required (or use --chat)")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p == 0:
        parser.error("--top-p must be > 0")
    if args.min_p == 1:
        parser.error("--min-p must be < 1")
    if args.no_chat_template and (args.system or args.thinking or args.chat):
        parser.error("--system, --thinking and --chat need the chat template (drop --no-chat-template)")
    try:
        _check_files(args.image, "image")
        _check_files(args.audio, "audio")
        if (args.image or args.audio) and (args.chat or args.prompt_cache or args.no_chat_template):
            raise ValueError("--image/--audio work with a single --prompt (not with --chat, --prompt-cache or "
                             "--no-chat-template)")
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        model, processor = load_for_cli(args.model, args.dtype, args.quantize, args.weights_dtype)
        gen_kwargs = dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty)
        if args.chat:
            args.prompt = prompt
            _run_chat(model, processor, args, gen_kwargs)
            return 0
        prompt_cache = load_prompt_cache(args.prompt_cache, model)[0] if args.prompt_cache else None
        chunk = None
        for chunk in stream_generate(model, processor, prompt, system=args.system, enable_thinking=args.thinking,
                                     use_chat_template=not args.no_chat_template, prompt_cache=prompt_cache,
                                     images=args.image or None, audio=args.audio or None,
                                     max_soft_tokens=args.max_soft_tokens, **gen_kwargs):
            print(chunk.text, end="", flush=True)
        print(flush=True)
        print(chunk.stats.summary(), file=sys.stderr)
        return 0
    except (FileNotFoundError, PermissionError, NotImplementedError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

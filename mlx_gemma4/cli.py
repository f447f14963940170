"""Every command line of mlx-gemma4 (installed as console scripts; `python -m mlx_gemma4.<module>` runs the same):

    mlx-gemma4               --model ID --prompt "..."  (or --chat)      generate / chat      (mlx_gemma4.generate)
    mlx-gemma4-prompt-cache  --model ID --system "..." --out FILE         save a prefix cache  (mlx_gemma4.prompt_cache)
    mlx-gemma4-convert       --model ID --out DIR [--bits 4]              convert / quantize   (mlx_gemma4.convert)
    mlx-gemma4-perplexity    --model ID --text FILE [--reference ID]      perplexity, KL       (mlx_gemma4.perplexity)
    mlx-gemma4-memory        --model ID --context N                       memory planner       (mlx_gemma4.memory)
    mlx-gemma4-synth         --variant e2b --out DIR                      synthetic checkpoint (mlx_gemma4.synth)
    mlx-gemma4-server        --model ID [--port 8080]                     OpenAI/Anthropic API (mlx_gemma4.server)

Generation streams tokens to stdout; a stats line (prompt and generation tokens and tok/s, peak memory, BLAS)
goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable, Sequence

DEFAULT_MODEL = "google/gemma-4-E2B-it"
# Failures a user can cause and fix: bad input (errors.InputError: ConfigError, CheckpointError, MediaError,
# PromptCacheError; engine.ContextError; other ValueErrors), a missing or unreadable file, too little memory.
# Each is one line `error: ...`; anything else is one line too, with a hint to rerun with --verbose.
EXPECTED_ERRORS = (ValueError, OSError, MemoryError)


# -- shared pieces --------------------------------------------------------------------------------------------
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


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def run_reporting_errors(body: Callable[[], int | None], verbose: bool = False) -> int:
    """Run a command's body: its exit code (None = 0); every exception becomes one line on stderr and exit code 1
    (expected failures as `error: <message>`, anything else with its type and a hint to rerun with --verbose,
    which prints the traceback too); Ctrl-C exits with 130."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            traceback.print_exc()
        if isinstance(e, EXPECTED_ERRORS):
            message = _one_line(e) or type(e).__name__
        else:
            message = f"unexpected {type(e).__name__}" + (f": {_one_line(e)}" if _one_line(e) else "")
            if not verbose:
                message += " (rerun with --verbose for the traceback)"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")


# -- mlx-gemma4: generate and chat ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-gemma4", description="Generate text with Gemma 4 on MLX.")
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
    p.add_argument("--image", nargs="+", default=[], metavar="PATH", help="images for the (first) message")
    p.add_argument("--max-soft-tokens", type=int, choices=(70, 140, 280, 560, 1120), default=None,
                   help="soft tokens per image (default: the checkpoint's, 280)")
    p.add_argument("--audio", nargs="+", default=[], metavar="PATH", help="audio clips for the (first) message")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (KV cache kept between turns)")
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="a prefix cache from `mlx-gemma4-prompt-cache` (with --prompt or --chat)")
    p.add_argument("--dtype", default=None, help="compute dtype: float32 | bfloat16 | float16 (default: the backend's best)")
    p.add_argument("--weights-dtype", default=None,
                   help="store float weights as bfloat16 | float16 under float32 compute: half the memory, products "
                        "upcast per call (default: the compute dtype)")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="quantize the weights at load time")
    p.add_argument("--draft-model", metavar="ID",
                   help="the model's MTP drafter (e.g. google/gemma-4-E2B-it-assistant): speculative decoding, the "
                        "same output (greedy: token for token)")
    p.add_argument("--num-draft-tokens", type=_positive_int, default=4, help="tokens the drafter proposes per step")
    p.add_argument("--drop-oldest-turns", action="store_true",
                   help="--chat: when a turn does not fit the context, drop the oldest turns (the rest is prefilled "
                        "again) instead of refusing it")
    _add_verbose(p)
    return p


CHAT_HELP = ("/image PATH and /audio PATH attach files to your next message, /reset starts a new conversation, "
             "/exit (or Ctrl-D) quits")


def _chat_inputs(first: str | None):
    """The user's lines: `first` (from --prompt), then stdin; /exit, /quit or end of input stop."""
    if first is not None:
        yield first
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        if interactive:
            print(">> ", end="", flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not line or text in ("/exit", "/quit"):
            return
        if text:
            yield text


def _chat_turn(session, text: str, attachments: dict, gen_kwargs: dict, drop_oldest: bool):
    """Stream one reply to stdout; the last chunk. With drop_oldest, a turn over the context drops the oldest
    turns until it fits."""
    from .engine import ContextError

    while True:
        try:
            chunk = None
            for chunk in session.send(text, images=attachments["image"], audio=attachments["audio"], **gen_kwargs):
                print(chunk.text, end="", flush=True)
            return chunk
        except ContextError:
            if not drop_oldest or not session.turns:
                raise
            session.drop_oldest_turn()
            print("(dropped the oldest turn to make room)", file=sys.stderr, flush=True)


def _run_chat(model, processor, args, gen_kwargs, prompt_cache) -> None:
    """The REPL. --image/--audio go with the first message, /image and /audio attach files to the next one. A
    failed turn (a prompt over the context, a bad file) is reported and the conversation goes on."""
    from .session import ChatSession

    session = ChatSession(model, processor, system=args.system, enable_thinking=args.thinking,
                          prompt_cache=prompt_cache)
    attachments = {"image": list(args.image), "audio": list(args.audio)}
    for text in _chat_inputs(args.prompt):
        command, _, rest = text.partition(" ")
        try:
            if command == "/reset":
                session.reset()
                print("(new conversation)", file=sys.stderr, flush=True)
            elif command in ("/image", "/audio"):
                paths = rest.split()
                _check_files(paths, command[1:])
                attachments[command[1:]] += paths
                print(f"(attached to your next message: {', '.join(paths) or 'nothing'})", file=sys.stderr,
                      flush=True)
            else:
                turn, attachments = attachments, {"image": [], "audio": []}
                chunk = _chat_turn(session, text, turn, gen_kwargs, args.drop_oldest_turns)
                print(flush=True)
                print(chunk.stats.summary(), file=sys.stderr, flush=True)
                if chunk.stats.finish_reason == "context":
                    print(f"(the context is full; {CHAT_HELP})", file=sys.stderr, flush=True)
        except EXPECTED_ERRORS as e:
            print(f"error: {_one_line(e)}; the conversation is kept ({CHAT_HELP})", file=sys.stderr, flush=True)


def _generate(args) -> int:
    from .prompt_cache import load_prompt_cache

    _check_files(args.image, "image")
    _check_files(args.audio, "audio")
    if (args.image or args.audio) and args.no_chat_template:
        raise ValueError("--image/--audio need the chat template (drop --no-chat-template)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, processor = load_for_cli(args.model, args.dtype, args.quantize, args.weights_dtype)
    prompt_cache = load_prompt_cache(args.prompt_cache, model)[0] if args.prompt_cache else None
    gen_kwargs = dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                      min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                      max_soft_tokens=args.max_soft_tokens)
    if args.draft_model:
        from .drafter import load_drafter

        gen_kwargs.update(draft_model=load_drafter(args.draft_model, model), num_draft_tokens=args.num_draft_tokens)
    if args.chat:
        args.prompt = prompt
        _run_chat(model, processor, args, gen_kwargs, prompt_cache)
        return 0
    from .generate import stream_generate

    chunk = None
    for chunk in stream_generate(model, processor, prompt, system=args.system, enable_thinking=args.thinking,
                                 use_chat_template=not args.no_chat_template, prompt_cache=prompt_cache,
                                 images=args.image or None, audio=args.audio or None, **gen_kwargs):
        print(chunk.text, end="", flush=True)
    print(flush=True)
    print(chunk.stats.summary(), file=sys.stderr)
    if chunk.stats.finish_reason == "context":
        print("(stopped: the model's context is full)", file=sys.stderr)
    return 0


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
    if args.drop_oldest_turns and not args.chat:
        parser.error("--drop-oldest-turns is for --chat")
    return run_reporting_errors(lambda: _generate(args), args.verbose)


# -- mlx-gemma4-prompt-cache ----------------------------------------------------------------------------------
def prompt_cache_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-gemma4-prompt-cache",
                                     description="Prefill a prompt and save its KV caches to a file.")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="", help="start of the user message shared by later prompts ('-': stdin)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--no-chat-template", action="store_true", help="the prefix is raw text")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    _add_verbose(parser)
    args = parser.parse_args(argv)

    def run() -> None:
        from .engine import prefill
        from .prompt_cache import PromptCache, prefix_ids, save_prompt_cache

        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        model, processor = load_for_cli(args.model)
        ids = prefix_ids(processor, text, system=args.system, use_chat_template=not args.no_chat_template)
        pc = PromptCache.fresh(model)
        prefill(model, ids, pc)
        save_prompt_cache(args.out, pc, model, {"model": str(args.model)})
        print(f"saved {len(ids)} prompt tokens to {args.out}", file=sys.stderr)

    return run_reporting_errors(run, args.verbose)


# -- mlx-gemma4-convert ---------------------------------------------------------------------------------------
def convert_main(argv: Sequence[str] | None = None) -> int:
    from .layouts import FORMATS

    p = argparse.ArgumentParser(prog="mlx-gemma4-convert",
                                description="Convert (and optionally quantize) a Gemma 4 checkpoint for MLX.")
    p.add_argument("--model", required=True, help="source: local directory or Hub repo id")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 5, 6, 8), default=None,
                   help="quantize weights to this many bits (affine mode)")
    add_quantization_options(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of unquantized tensors and scales (default: the source's, else bfloat16)")
    p.add_argument("--format", choices=FORMATS, default="mlx-vlm", dest="fmt",
                   help="mlx-vlm: text + towers (default); mlx-lm: text only. Both load here and in mlx-vlm / mlx-lm")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true")
    _add_verbose(p)
    args = p.parse_args(argv)
    if args.bits is None and args.mode == "affine" and (args.recipe != "uniform" or args.calibration
                                                        or args.target_bpw):
        p.error("--recipe, --calibration and --target-bpw need --bits")

    def run() -> None:
        from .convert import convert

        recipe = recipe_of(args)
        out = convert(args.model, args.out, bits=args.bits, group_size=args.group_size, recipe=recipe,
                      mode=args.mode, dtype=args.dtype, max_shard_gb=args.max_shard_gb, overwrite=args.overwrite,
                      fmt=args.fmt, report=lambda text: print(text, file=sys.stderr))
        quant = json.loads((out / "config.json").read_text()).get("quantization")
        q = f"{quant['mode']} {quant['bits']}-bit, group {quant['group_size']}" if quant else "not quantized"
        if quant and args.recipe != "uniform":
            q += f", {recipe.name} recipe"
        print(f"wrote {out} ({args.fmt} layout, {q})", file=sys.stderr)

    return run_reporting_errors(run, args.verbose)


def add_quantization_options(p: argparse.ArgumentParser) -> None:
    """--group-size, --mode, --recipe, --calibration, --target-bpw (mlx_gemma4.quant)."""
    from .kernels.products import QUANT_MODES
    from .quant import RECIPES

    p.add_argument("--group-size", type=int, choices=(16, 32, 64, 128), default=None,
                   help="weights per scale (default: 64 in affine mode; the fp modes have their own)")
    p.add_argument("--mode", choices=tuple(QUANT_MODES), default="affine",
                   help="MLX quantization mode; mxfp4, mxfp8 and nvfp4 quantize without --bits")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="uniform",
                   help="uniform: every matrix at --bits; mixed: embeddings, PLE and MoE router at 8 bits; dynamic: "
                        "mixed, plus the matrices whose quantization hurts most at 6 or 8 bits within --target-bpw; "
                        "awq: mixed with AWQ scaling; minmax / mixed-minmax: plain min/max scales (mlx-lm's)")
    p.add_argument("--calibration", metavar="FILE|none", default=None,
                   help="text whose activations weight the quantization error (default: the text shipped with "
                        "mlx_gemma4.quant; 'none': unweighted, no forward pass)")
    p.add_argument("--target-bpw", type=float, default=None,
                   help="dynamic: bits per weight of the whole model, embeddings counted (default: mixed's + 0.5)")


def recipe_of(args: argparse.Namespace):
    """The quant.Recipe the --recipe/--calibration/--target-bpw options describe."""
    from dataclasses import replace

    from .quant import as_recipe

    recipe = as_recipe(args.recipe)
    if args.calibration is not None:
        recipe = replace(recipe, calibration=False if args.calibration == "none" else args.calibration)
    if args.target_bpw is not None:
        recipe = replace(recipe, target_bpw=args.target_bpw)
    return recipe


# -- mlx-gemma4-perplexity -----------------------------------------------------------------------------------
def perplexity_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlx-gemma4-perplexity",
                                description="Perplexity of a text, and mean KL against a reference model.")
    p.add_argument("--model", required=True, help="checkpoint directory, Hub repo id, .gguf file or 'demo'")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--reference", help="reference model (e.g. the unquantized source): adds its perplexity, the "
                   "mean KL(reference || model) and the top-1 agreement")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="only the first N tokens of the text")
    p.add_argument("--chunk", type=_positive_int, default=256, help="positions per forward pass")
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 5, 6, 8), default=None, metavar="BITS",
                   help="quantize --model at load time (as load(quantize=...)) before evaluating")
    add_quantization_options(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    _add_verbose(p)
    args = p.parse_args(argv)

    def run() -> None:
        from pathlib import Path

        from .convert import quantization_settings
        from .loading import load
        from .perplexity import evaluate, text_ids

        text = Path(args.text).read_text(encoding="utf-8")
        bits, group_size = quantization_settings(args.quantize, args.group_size, args.mode)
        model, processor = load(args.model, dtype=args.dtype, quantize=bits, group_size=group_size,
                                recipe=recipe_of(args), quantize_mode=args.mode)
        ids = text_ids(processor, text, args.max_tokens)
        reference = load(args.reference, dtype=args.dtype)[0] if args.reference else None
        result = evaluate(model, [ids], reference, chunk=args.chunk)
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens (mean NLL {result.nll:.5f})")
        if reference is not None:
            change = 100 * (result.perplexity / result.reference_perplexity - 1)
            print(f"reference perplexity {result.reference_perplexity:.4f} ({change:+.2f}%); mean KL vs reference "
                  f"{result.mean_kl:.5f}; top-1 agreement {100 * result.top1_agreement:.2f}%")

    return run_reporting_errors(run, args.verbose)


# -- mlx-gemma4-memory ----------------------------------------------------------------------------------------
def memory_main(argv: Sequence[str] | None = None) -> int:
    from .memory import DTYPE_BYTES

    ap = argparse.ArgumentParser(prog="mlx-gemma4-memory",
                                 description="Memory planner: how much RAM a Gemma 4 model needs at a given context.")
    ap.add_argument("--model", required=True, help="local checkpoint dir, variant (e2b, e4b, 26b-a4b, 31b) or hub id")
    ap.add_argument("--context", type=int, required=True, help="tokens in the context (prompt + generated)")
    ap.add_argument("--bits", type=int, choices=(4, 8, 16), help="weight precision (default: the checkpoint's)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES),
                    help="compute dtype (default: the runtime policy's choice, see mlx_gemma4.runtime)")
    ap.add_argument("--weights-dtype", default=None, choices=sorted(DTYPE_BYTES),
                    help="storage dtype of float weights when narrower than the compute dtype (load(weights_dtype=...))")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    ap.add_argument("--ram", type=float, help="RAM in GiB to check the total against")
    _add_verbose(ap)
    args = ap.parse_args(argv)

    def run() -> None:
        from .memory import default_dtype_name, estimate, format_estimate, resolve_model

        config, directory = resolve_model(args.model)
        dtype = args.dtype or default_dtype_name()
        est = estimate(config, args.context, bits=args.bits, dtype=dtype,
                       chunk=args.chunk, directory=directory, weights_dtype=args.weights_dtype)
        print(f"model {args.model}, compute dtype {dtype}")
        print(format_estimate(est, args.context, args.ram))

    return run_reporting_errors(run, args.verbose)


# -- mlx-gemma4-synth -----------------------------------------------------------------------------------------
def synth_main(argv: Sequence[str] | None = None) -> int:
    from .memory import FAMILY_PRESETS, VARIANTS

    ap = argparse.ArgumentParser(prog="mlx-gemma4-synth",
                                 description="Synthetic Gemma 4 checkpoints at the published dimensions.")
    ap.add_argument("--variant", required=True, choices=VARIANTS + FAMILY_PRESETS,
                    help="a model (12b: Gemma 4 12B, gemma4_unified), or its MTP drafter (<variant>-assistant)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--layers", type=int, help="keep only the first N layers (pattern and KV sharing kept)")
    ap.add_argument("--vocab", type=int, help="smaller vocabulary (mlx-lm's gemma4 needs the real 262144)")
    ap.add_argument("--bits", type=int, choices=(4, 8), help="quantize matrices (mlx format only)")
    ap.add_argument("--format", default="mlx", choices=("mlx", "hf"), dest="fmt")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size in GB")
    ap.add_argument("--towers", action="store_true", help="also write the vision/audio towers (needs transformers)")
    ap.add_argument("--seed", type=int, default=0)
    _add_verbose(ap)
    args = ap.parse_args(argv)

    def run() -> None:
        from .memory import load_preset
        from .synth import shrink_config, write_checkpoint

        config = shrink_config(load_preset(args.variant), args.layers, args.vocab)
        out = write_checkpoint(config, args.out, bits=args.bits, fmt=args.fmt, towers=args.towers, seed=args.seed,
                               shard_bytes=int(args.shard_gb * 1e9))
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"wrote {out} ({size / 1e9:.2f} GB, format {args.fmt}, bits {args.bits or 16})")

    return run_reporting_errors(run, args.verbose)


# -- mlx-gemma4-server ----------------------------------------------------------------------------------------
def build_server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-gemma4-server",
                                description="Serve Gemma 4 over OpenAI- and Anthropic-compatible HTTP APIs.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local directory or Hub repo id (default {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("MLX_GEMMA4_API_KEY"),
                   help="require this key (Authorization: Bearer KEY, or x-api-key); default $MLX_GEMMA4_API_KEY")
    p.add_argument("--max-concurrency", type=_positive_int, default=8,
                   help="requests decoded together (continuous batching); more wait in line")
    p.add_argument("--max-tokens", type=_positive_int, default=512, help="reply length when a request sets none")
    p.add_argument("--temp", type=_non_negative, default=0.0, help="temperature when a request sets none (0 = greedy)")
    p.add_argument("--top-p", type=_probability, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=_probability, default=0.0)
    p.add_argument("--thinking", action="store_true",
                   help="think before answering unless a request says otherwise (reasoning_effort, thinking, ...)")
    p.add_argument("--prompt-cache-mb", type=float, default=2048,
                   help="memory for the KV caches of prompt prefixes kept for the next requests (0 turns reuse off)")
    p.add_argument("--prompt-cache-entries", type=int, default=32, help="most prefixes kept")
    p.add_argument("--no-fetch-urls", action="store_true", help="refuse http(s) media URLs (clients send data)")
    p.add_argument("--fetch-max-mb", type=float, default=20, help="largest media file fetched from a URL")
    p.add_argument("--fetch-timeout", type=float, default=10, help="seconds a media download may take")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body accepted")
    p.add_argument("--dtype", default=None, help="compute dtype: float32 | bfloat16 | float16")
    p.add_argument("--weights-dtype", default=None, help="storage dtype of float weights (as in mlx-gemma4)")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="quantize the weights at load time")
    p.add_argument("--draft-model", default=None,
                   help="an MTP drafter of --model: speculative decoding (requests then run one at a time)")
    p.add_argument("--num-draft-tokens", type=_positive_int, default=4, help="tokens drafted per target step")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _add_verbose(p)
    return p


def server_main(argv: Sequence[str] | None = None) -> int:
    parser = build_server_parser()
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p == 0:
        parser.error("--top-p must be > 0")

    def run() -> None:
        from .server import serve

        model, processor = load_for_cli(args.model, args.dtype, args.quantize, args.weights_dtype)
        drafter = None
        if args.draft_model:
            from .drafter import load_drafter

            drafter = load_drafter(args.draft_model, model)
        serve(model, processor, draft_model=drafter, num_draft_tokens=args.num_draft_tokens, host=args.host, port=args.port, api_key=args.api_key or None,
              max_body_bytes=int(args.max_body_mb * 2**20), log_level=args.log_level,
              model_id=args.served_model_name or str(args.model), max_concurrency=args.max_concurrency,
              max_tokens=args.max_tokens, enable_thinking=args.thinking,
              prompt_cache_bytes=int(args.prompt_cache_mb * 2**20), prompt_cache_entries=args.prompt_cache_entries,
              fetch_urls=not args.no_fetch_urls, fetch_max_bytes=int(args.fetch_max_mb * 2**20),
              fetch_timeout=args.fetch_timeout,
              sampling_defaults=dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p))

    return run_reporting_errors(run, args.verbose)

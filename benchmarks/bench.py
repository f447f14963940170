"""Side-by-side benchmark: mlx-gemma4 vs peers (mlx-lm, transformers) on the same checkpoint.

    python benchmarks/bench.py --model DIR [--peers mlx-lm,mlx-lm-fp32,transformers]
        [--contexts 512,2048,8192,32768] [--budget-s 120] [--repeat 3] [--decode-tokens 32] [--json out.json]

Every system loads DIR (a Hugging Face-layout checkpoint, e.g. from `python -m mlx_gemma4.synth --format hf`;
mlx-gemma4 also reads its own MLX layout) in its own process, `--repeat` times. Each run measures:

  load         seconds until the weights are ready (lazy arrays evaluated)
  prefill      seconds to process a random prompt of each context length, chunked (--chunk), up to the
               first token (= time to first token); a context is skipped, and the table says so, when the
               time predicted from the previous context exceeds --budget-s
  decode       tokens/s of greedy one-token steps after the shortest and after the longest prompt
  memory       MLX's peak memory counter per context, and the process's max RSS; for mlx-gemma4 also the
               memory planner's estimate (mlx_gemma4.memory) for the same context and chunk, as a ratio to the peak

Reported: the min and the median over the repeats (throughputs from the min and the median time), as a
markdown table on stdout and as JSON (--json). Peers:

  mlx-gemma4-bf16w  ours with weights_dtype="bfloat16": float32 compute, weights stored in bf16 (half the memory)
  mlx-lm         mlx_lm.utils.load_model, computing in the checkpoint dtype (bf16), its own caches
  mlx-lm-fp32    the same with the weights cast to float32 (MLX's fast path on the CPU backend)
  transformers   Gemma4ForConditionalGeneration in float32 on CPU (slow: use small contexts)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEMS = ("mlx-gemma4", "mlx-gemma4-bf16w", "mlx-lm", "mlx-lm-fp32", "transformers")


# --------------------------------------------------------------------------------------------------------------
# Systems (each used inside its own worker process)


class MlxGemma4:
    """Our model, loaded by mlx_gemma4.loading.load with the backend's compute dtype policy (and optionally its
    float weights stored in a narrower dtype, e.g. bfloat16 under float32 compute)."""

    def __init__(self, path: Path, weights_dtype: str | None = None):
        import mlx_gemma4  # noqa: F401  (optimized BLAS before mlx.core)
        from mlx_gemma4.loading import load

        import mlx.core as mx

        self.mx = mx
        self.path = path
        self.weights_dtype = weights_dtype
        self.model, _ = load(str(path), weights_dtype=weights_dtype)

    def planner_bytes(self, context: int, chunk: int) -> int:
        """mlx_gemma4.memory's estimate of the peak for this run (weights, KV cache, activations)."""
        from mlx_gemma4 import memory

        config = json.loads((self.path / "config.json").read_text())
        dtype = str(self.model.dtype).replace("mlx.core.", "")
        return memory.estimate(config, context, dtype=dtype, chunk=chunk, weights_dtype=self.weights_dtype).total

    def new_cache(self):
        from mlx_gemma4.prompt_cache import PromptCache

        return PromptCache.fresh(self.model)

    def prefill(self, tokens, cache, chunk: int) -> int:
        """mlx_gemma4.engine.prefill (what generation runs): chunks evaluating only the caches, logits of the
        last position of the last chunk; returns the greedy first token."""
        from mlx_gemma4.engine import prefill

        logits = prefill(self.model, [int(t) for t in tokens], cache, step_size=chunk)
        return int(self.mx.argmax(logits[0]).item())

    def step(self, token: int, cache) -> int:
        mx = self.mx
        logits = self.model(mx.array([[token]]), cache=cache.caches, last_only=True)
        return int(mx.argmax(logits[0, -1]).item())


class MlxLm:
    """mlx-lm's gemma4 model and caches, prefilled the way mlx_lm.generate does it."""

    def __init__(self, path: Path, float32: bool = False):
        import mlx_gemma4  # noqa: F401  (same BLAS for every MLX system)
        from mlx_lm.utils import load_model

        import mlx.core as mx

        self.mx = mx
        self.model, _ = load_model(path)
        if float32:
            self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())

    def new_cache(self):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def prefill(self, tokens, cache, chunk: int) -> int:
        """As mlx_lm.generate_step: all but the last token in chunks evaluating only the caches (the lazy logits
        are never computed), then the last token."""
        mx = self.mx
        for start in range(0, len(tokens) - 1, chunk):
            self.model(mx.array(tokens[start : min(start + chunk, len(tokens) - 1)])[None], cache=cache)
            mx.eval([c.state for c in cache])
        return self.step(int(tokens[-1]), cache)

    def step(self, token: int, cache) -> int:
        mx = self.mx
        logits = self.model(mx.array([[token]]), cache=cache)
        return int(mx.argmax(logits[0, -1]).item())


class Transformers:
    def __init__(self, path: Path):
        import torch
        from transformers import AutoConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

        torch.set_grad_enabled(False)
        self.torch = torch
        cls = Gemma4ForConditionalGeneration if AutoConfig.from_pretrained(path).model_type == "gemma4" \
            else Gemma4ForCausalLM
        self.model = cls.from_pretrained(path, dtype=torch.float32).eval()

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def prefill(self, tokens, cache, chunk: int) -> int:
        for start in range(0, len(tokens), chunk):
            ids = self.torch.tensor([[int(t) for t in tokens[start : start + chunk]]])
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    def step(self, token: int, cache) -> int:
        ids = self.torch.tensor([[token]])
        return int(self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())


def _make_system(name: str, path: Path):
    if name == "mlx-gemma4":
        return MlxGemma4(path)
    if name == "mlx-gemma4-bf16w":
        return MlxGemma4(path, weights_dtype="bfloat16")
    if name == "mlx-lm":
        return MlxLm(path)
    if name == "mlx-lm-fp32":
        return MlxLm(path, float32=True)
    if name == "transformers":
        return Transformers(path)
    raise ValueError(f"unknown system {name!r}; expected one of {', '.join(SYSTEMS)}")


# --------------------------------------------------------------------------------------------------------------
# Worker: one system, one repeat


def _peak_mlx() -> int | None:
    if "mlx.core" not in sys.modules:
        return None
    import mlx.core as mx

    return int(mx.get_peak_memory())


def _reset_peak() -> None:
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        mx.reset_peak_memory()


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def run_worker(name: str, path: Path, contexts: list[int], budget_s: float, chunk: int, decode_tokens: int) -> dict:
    import numpy as np

    config = json.loads((path / "config.json").read_text())
    vocab = (config.get("text_config") or config)["vocab_size"]
    t = time.perf_counter()
    system = _make_system(name, path)
    out = {"system": name, "load_s": time.perf_counter() - t, "contexts": {}, "decode": {}}
    rng = np.random.default_rng(0)
    last = None  # (context, seconds) of the last measured prefill
    measured = []
    for context in sorted(contexts):
        if last is not None:
            predicted = last[1] * (context / last[0]) ** 1.2  # attention makes prefill slightly superlinear
            if predicted > budget_s:
                out["contexts"][str(context)] = {"skipped": f"predicted {predicted:.0f} s > budget {budget_s:.0f} s"}
                continue
        tokens = rng.integers(3, vocab, size=context)
        _reset_peak()
        cache = system.new_cache()
        t = time.perf_counter()
        token = system.prefill(tokens, cache, chunk)  # up to the first token: prefill time == time to first token
        seconds = time.perf_counter() - t
        entry = {"prefill_s": seconds, "ttft_s": seconds, "peak_mlx_bytes": _peak_mlx()}
        if hasattr(system, "planner_bytes"):
            entry["planner_bytes"] = system.planner_bytes(context, chunk)
        last = (context, seconds)
        measured.append(context)
        # decode after every measured prompt; the table shows the shortest and the longest
        if decode_tokens > 0:
            token = system.step(token, cache)  # warm-up step, untimed
            t = time.perf_counter()
            for _ in range(decode_tokens):
                token = system.step(token, cache)
            entry["decode_s"] = time.perf_counter() - t
            entry["decode_tokens"] = decode_tokens
            entry["peak_mlx_bytes"] = _peak_mlx()
        out["contexts"][str(context)] = entry
        del cache
    if measured and decode_tokens > 0:
        out["decode"] = {"short_context": measured[0], "long_context": measured[-1]}
    out["max_rss_bytes"] = _max_rss_bytes()
    return out


# --------------------------------------------------------------------------------------------------------------
# Orchestrator


def _machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import mlx_gemma4  # noqa: F401
        from mlx_gemma4 import runtime

        import mlx.core as mx

        info.update(mlx=mx.__version__, policy=runtime.RuntimePolicy.from_arguments().describe())
    except Exception as e:  # noqa: BLE001 - informational only
        info["mlx"] = f"unavailable ({e})"
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except ImportError:
        pass
    return info


def _spawn(system: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--model", str(args.model),
           "--contexts", args.contexts, "--budget-s", str(args.budget_s), "--chunk", str(args.chunk),
           "--decode-tokens", str(args.decode_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"system": system, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1],
                "returncode": proc.returncode}
    return json.loads(lines[-1])


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values)}


def aggregate(runs: list[dict]) -> dict:
    """min/median of every timing and memory figure across the repeats of one system."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    agg = {"runs": len(ok), "load_s": _stats([r["load_s"] for r in ok]),
           "max_rss_bytes": _stats([r["max_rss_bytes"] for r in ok]), "contexts": {}, "decode": ok[0]["decode"]}
    for context, first in ok[0]["contexts"].items():
        entries = [r["contexts"][context] for r in ok if "skipped" not in r["contexts"].get(context, {"skipped": 1})]
        if "skipped" in first or not entries:
            agg["contexts"][context] = {"skipped": first.get("skipped", "not measured in every run")}
            continue
        c = int(context)
        prefill = _stats([e["prefill_s"] for e in entries])
        row = {"prefill_s": prefill, "ttft_s": prefill,
               "prefill_tok_s": {"max": c / prefill["min"], "median": c / prefill["median"]}}
        if entries[0].get("peak_mlx_bytes") is not None:
            row["peak_mlx_bytes"] = _stats([e["peak_mlx_bytes"] for e in entries])
        if "planner_bytes" in entries[0]:
            row["planner_bytes"] = entries[0]["planner_bytes"]
        if "decode_s" in entries[0]:
            d = _stats([e["decode_s"] for e in entries])
            n = entries[0]["decode_tokens"]
            row["decode_tok_s"] = {"max": n / d["min"], "median": n / d["median"]}
        agg["contexts"][context] = row
    return agg


def _fmt_pair(a: float, b: float, digits: int = 1) -> str:
    return f"{a:.{digits}f} / {b:.{digits}f}"


def markdown(results: dict, contexts: list[int]) -> str:
    systems = list(results)
    lines = ["| metric (best / median) | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(results[s]) for s in systems) + " |")

    def guard(fn):
        def cell(r):
            if "error" in r:
                return "error: " + r["error"][:60]
            try:
                return fn(r)
            except KeyError:
                return "–"
        return cell

    def ctx(r, c):
        e = r["contexts"].get(str(c))
        if e is None:
            raise KeyError(c)
        return e

    row("load s", guard(lambda r: _fmt_pair(r["load_s"]["min"], r["load_s"]["median"], 2)))
    for c in contexts:
        def prefill(r, c=c):
            e = ctx(r, c)
            if "skipped" in e:
                return "skipped: " + e["skipped"]
            return _fmt_pair(e["prefill_tok_s"]["max"], e["prefill_tok_s"]["median"])
        row(f"prefill tok/s @ {c}", guard(prefill))
    for c in contexts:
        row(f"time to first token s @ {c}", guard(
            lambda r, c=c: _fmt_pair(ctx(r, c)["ttft_s"]["min"], ctx(r, c)["ttft_s"]["median"], 2)))

    def decode(which):
        def cell(r):
            c = r["decode"][which]
            e = ctx(r, c)["decode_tok_s"]
            return f"{_fmt_pair(e['max'], e['median'], 2)} (@{c})"
        return cell

    row("decode tok/s after short prompt", guard(decode("short_context")))
    row("decode tok/s after long prompt", guard(decode("long_context")))
    for c in contexts:
        row(f"MLX peak GiB @ {c}", guard(
            lambda r, c=c: _fmt_pair(ctx(r, c)["peak_mlx_bytes"]["min"] / 2**30,
                                     ctx(r, c)["peak_mlx_bytes"]["median"] / 2**30, 2)))
    for c in contexts:
        row(f"planner GiB @ {c} (/ MLX peak)", guard(
            lambda r, c=c: f"{ctx(r, c)['planner_bytes'] / 2**30:.2f} "
                           f"({ctx(r, c)['planner_bytes'] / ctx(r, c)['peak_mlx_bytes']['median']:.2f}x)"))
    row("max RSS GiB", guard(lambda r: _fmt_pair(r["max_rss_bytes"]["min"] / 2**30,
                                                  r["max_rss_bytes"]["median"] / 2**30, 2)))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--peers", default="mlx-lm", help="comma-separated: " + ", ".join(SYSTEMS[1:]) + " (or none)")
    ap.add_argument("--contexts", default="512,2048,8192,32768")
    ap.add_argument("--budget-s", type=float, default=120.0, help="skip a context predicted to take longer")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size (the same for every system)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--skip-ours", action="store_true", help="run only the peers (e.g. to add one to a saved run)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"error: {args.model} has no config.json")
    try:
        contexts = sorted(int(c) for c in args.contexts.split(","))
    except ValueError:
        raise SystemExit(f"error: --contexts must be comma-separated integers, got {args.contexts!r}")
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.model, contexts, args.budget_s, args.chunk,
                                    args.decode_tokens)))
        return
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    unknown = [p for p in peers if p not in SYSTEMS[1:]]
    if unknown:
        raise SystemExit(f"error: unknown peer(s) {unknown}; expected {', '.join(SYSTEMS[1:])}")
    systems = peers if args.skip_ours else ["mlx-gemma4", *peers]
    if not systems:
        raise SystemExit("error: nothing to run (--skip-ours without --peers)")
    raw = {s: [] for s in systems}
    for r in range(args.repeat):  # interleave systems so background load affects them alike
        for s in systems:
            print(f"[repeat {r + 1}/{args.repeat}] {s} ...", file=sys.stderr, flush=True)
            raw[s].append(_spawn(s, args))
    results = {s: aggregate(raw[s]) for s in systems}
    machine = _machine()
    print(f"model {args.model} | {machine.get('policy', '')} | mlx {machine.get('mlx')} | "
          f"mlx-lm {machine.get('mlx_lm', 'n/a')} | {machine['processor']}, {machine['cpus']} cpus | "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | repeats {args.repeat}, chunk {args.chunk}, "
          f"{args.decode_tokens} decode tokens, budget {args.budget_s:g} s")
    print(markdown(results, contexts))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "raw": raw}, indent=2))


if __name__ == "__main__":
    main()

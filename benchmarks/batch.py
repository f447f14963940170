"""Batched decoding benchmark: aggregate decode tokens/s with 1, 2, 4, 8 concurrent streams, mlx-gemma4's
BatchEngine beside mlx-lm's BatchGenerator on the same checkpoint.

    python benchmarks/batch.py --model DIR [--streams 1,2,4,8] [--prompt 32] [--tokens 12] [--repeat 2]
        [--peers mlx-lm-fp32] [--json out.json]

One process loads every system (DIR as benchmarks/bench.py loads it; see its docstring for the peers) and, for
each stream count S and each repeat, runs the systems in turn, so that they share the machine's conditions.
A run starts S greedy requests with different random prompts of --prompt tokens. Once every request has its
first token (all prefilled), it times --tokens decode steps of the full batch: aggregate tok/s = tokens
generated in those steps / their seconds. Every request is given room for more tokens than that, so all S
streams are in the batch for the whole timed window on both systems (BatchEngine prefills requests one at a
time, so its first requests are already decoding while the last ones prefill; mlx-lm's BatchGenerator
prefills them together). Reported: the best and the median over the repeats. A small untimed batch warms each
system up first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SYSTEMS, _machine, _make_system  # noqa: E402  (this directory, run as a script)


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


def decode_ours(model, batch: list[list[int]], steps: int) -> tuple[int, float]:
    """(tokens generated, seconds) of `steps` decode steps of the full batch with mlx_gemma4.batch.BatchEngine."""
    from mlx_gemma4.batch import BatchEngine

    engine = BatchEngine(model, max_batch=len(batch))
    try:
        requests = [engine.submit(ids, max_tokens=steps + len(batch) + 2) for ids in batch]
        while not all(r.tokens for r in requests):
            engine.step()
        before, start = sum(len(r.tokens) for r in requests), time.perf_counter()
        for _ in range(steps):  # nothing left to prefill: each step is one decode step of the batch
            engine.step()
        seconds = time.perf_counter() - start
        assert not any(r.done for r in requests), "a request left the batch inside the timed window"
        return sum(len(r.tokens) for r in requests) - before, seconds
    finally:
        engine.stop()


def decode_mlx_lm(model, batch: list[list[int]], steps: int) -> tuple[int, float]:
    """The same with mlx-lm's BatchGenerator (its own batched prefill, then its decode batch)."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=steps + 2, completion_batch_size=len(batch),
                               prefill_batch_size=len(batch))
    counts = dict.fromkeys(generator.insert(batch), 0)
    try:
        while not all(counts.values()):
            for r in generator.next_generated():
                counts[r.uid] += 1
        timed, start = 0, time.perf_counter()
        for _ in range(steps):
            timed += len(generator.next_generated())
        return timed, time.perf_counter() - start
    finally:
        generator.close()


def run(names: list[str], path: Path, streams: list[int], prompt: int, tokens: int, repeat: int) -> dict:
    config = json.loads((path / "config.json").read_text())
    vocab = (config.get("text_config") or config)["vocab_size"]
    systems = {}
    for name in names:
        try:
            systems[name] = _make_system(name, path).model
        except Exception as e:  # noqa: BLE001 - a peer that cannot load is reported, not fatal
            systems[name] = e
    decoders = {name: decode_ours if name.startswith("mlx-gemma4") else decode_mlx_lm for name in names}
    for name, model in systems.items():
        if not isinstance(model, Exception):
            decoders[name](model, prompts(2, 8, vocab, seed=99), 3)  # warm-up
    rates: dict[str, dict[int, list[float]]] = {name: {s: [] for s in streams} for name in names}
    for s in streams:
        for _ in range(repeat):
            for name, model in systems.items():
                if not isinstance(model, Exception):
                    n, seconds = decoders[name](model, prompts(s, prompt, vocab, seed=s), tokens)
                    rates[name][s].append(n / seconds)
    out = {}
    for name, model in systems.items():
        if isinstance(model, Exception):
            out[name] = {"error": f"{type(model).__name__}: {model}"}
        else:
            out[name] = {"streams": {str(s): {"best_tok_s": max(r), "median_tok_s": statistics.median(r), "runs": r}
                                     for s, r in rates[name].items()}}
    return out


def markdown(results: dict, streams: list[int]) -> str:
    systems = list(results)
    lines = ["| streams | " + " | ".join(f"{s} tok/s best / median (best x 1 stream)" for s in systems) + " |",
             "|---:" + "|---:" * len(systems) + "|"]
    for s in streams:
        cells = []
        for name in systems:
            r = results[name]
            if "error" in r:
                cells.append("error: " + r["error"][:60])
                continue
            row, first = r["streams"][str(s)], r["streams"][str(streams[0])]
            cells.append(f"{row['best_tok_s']:.2f} / {row['median_tok_s']:.2f} "
                         f"({row['best_tok_s'] / first['best_tok_s']:.2f}x)")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/batch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per stream")
    p.add_argument("--tokens", type=int, default=12, help="timed decode steps (tokens per stream)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--peers", default="mlx-lm-fp32", help="comma-separated (mlx-lm, mlx-lm-fp32), or 'none'")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json")
    try:
        streams = [int(s) for s in args.streams.split(",")]
    except ValueError:
        p.error(f"--streams must be integers separated by commas, got {args.streams!r}")
    if min(streams) < 1 or args.tokens < 3 or args.prompt < 1 or args.repeat < 1:
        p.error("--streams, --prompt and --repeat must be >= 1, --tokens >= 3")
    peers = [] if args.peers == "none" else args.peers.split(",")
    for peer in peers:
        if peer not in SYSTEMS or peer.startswith("mlx-gemma4") or peer == "transformers":
            p.error(f"unknown peer {peer!r}: expected mlx-lm or mlx-lm-fp32")
    results = run(["mlx-gemma4", *peers], args.model, streams, args.prompt, args.tokens, args.repeat)
    info = _machine()
    print(f"model {args.model} | {args.prompt}-token prompts, {args.tokens} tokens per stream, greedy, "
          f"repeats {args.repeat} | "
          f"mlx {info.get('mlx')} | mlx-lm {info.get('mlx_lm')} | {info['processor']}, {info['cpus']} cpus | "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(markdown(results, streams))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"model": str(args.model),
                                                                                 "json": str(args.json)},
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving benchmark: aggregate generated tokens/s with 1, 2, 4, 8 concurrent streaming clients, mlx-gemma4's
server beside mlx-lm's (`mlx_lm server`) and mlx-vlm's (`mlx_vlm.server`) on the same checkpoint, in one run.

    python benchmarks/serve.py --model DIR [--streams 1,2,4,8] [--tokens 48] [--repeat 2]
        [--peers mlx-lm,mlx-vlm] [--json out.json]

DIR: a Hugging Face-layout checkpoint with a tokenizer and chat template (every server loads it as it is, in
its default dtype). Each system's server runs alone, as its own process on a free port of 127.0.0.1, started
with room for 8 concurrent sequences; after one untimed request, for each stream count S and each repeat, S
clients send chat completions at once (`stream: true`, temperature 0, `max_tokens` --tokens, distinct prompts
never sent before, so no prompt cache helps) and read them to the end. Aggregate tok/s = the completion tokens
of all S replies (their `usage`, else one per content chunk) / seconds from the first request sent to the last
reply finished (prefill included). Reported: the best and the median over the repeats, and the ratio to the
same system's single stream. A server that does not start is reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SYSTEMS = ("mlx-gemma4", "mlx-lm", "mlx-vlm")


def server_command(name: str, model: Path, port: int) -> list[str]:
    common = ["--model", str(model), "--port", str(port)]
    if name == "mlx-gemma4":
        return [sys.executable, "-m", "mlx_gemma4.server", *common, "--max-concurrency", "8", "--log-level", "warning"]
    if name == "mlx-lm":
        return [sys.executable, "-m", "mlx_lm", "server", *common, "--decode-concurrency", "8",
                "--log-level", "WARNING"]
    if name == "mlx-vlm":
        return [sys.executable, "-m", "mlx_vlm.server", *common, "--max-num-seqs", "8", "--log-level", "WARNING"]
    raise ValueError(f"unknown system {name!r}; expected one of {', '.join(SYSTEMS)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One system's server process, up once it answers HTTP."""

    def __init__(self, name: str, model: Path, timeout: float = 600):
        import httpx

        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-bench-{name}.log", "w")
        self.process = subprocess.Popen(server_command(name, model, self.port), stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} server exited ({self.process.returncode}); see {self.log.name}")
            try:  # any answer: listening (a server that loads its model at the first request does so in the warm-up)
                httpx.get(self.url + "/health", timeout=5)
                return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{name} server did not come up in {timeout:.0f} s; see {self.log.name}")
            time.sleep(0.5)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def one_stream(client, url: str, model: str, prompt: str, tokens: int) -> int:
    """Completion tokens of one streamed chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage = 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
    return int(usage["completion_tokens"]) if usage else chunks


async def burst(url: str, model: str, prompts: list[str], tokens: int) -> tuple[int, float]:
    """(completion tokens of all replies, seconds) for len(prompts) concurrent streams."""
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(client, url, model, p, tokens) for p in prompts))
        return sum(counts), time.perf_counter() - start


def measure(name: str, model: Path, streams: list[int], tokens: int, repeat: int) -> dict:
    server = Server(name, model)
    serial = iter(range(10**9))

    def prompts(count: int) -> list[str]:
        return [f"Request {next(serial)}: tell me a long story about the number {i} and the sea." for i in range(count)]

    try:
        asyncio.run(burst(server.url, str(model), prompts(1), tokens))  # warm-up, untimed
        runs: dict[int, list[dict]] = {s: [] for s in streams}
        for _ in range(repeat):
            for s in streams:
                n, seconds = asyncio.run(burst(server.url, str(model), prompts(s), tokens))
                runs[s].append({"tokens": n, "seconds": seconds, "tok_s": n / seconds})
                print(f"  {name:10s} streams={s}: {n} tokens in {seconds:.2f} s = {n / seconds:.1f} tok/s",
                      file=sys.stderr, flush=True)
        return {"runs": {str(s): r for s, r in runs.items()}}
    finally:
        server.close()


def table(results: dict, streams: list[int]) -> str:
    names = list(results)
    lines = ["| streams | " + " | ".join(f"{n} best (median) tok/s | {n} vs 1 stream" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for s in streams:
        cells = []
        for n in names:
            r = results[n]
            if "error" in r:
                cells += [f"failed: {r['error'][:60]}", ""]
                continue
            rates = [x["tok_s"] for x in r["runs"][str(s)]]
            one = max(x["tok_s"] for x in r["runs"][str(streams[0])])
            cells += [f"{max(rates):.1f} ({statistics.median(rates):.1f})", f"{max(rates) / one:.2f}x"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    ours = results.get("mlx-gemma4")
    peers = {n: r for n, r in results.items() if n != "mlx-gemma4" and "error" not in r}
    if ours and "error" not in ours and peers:
        lines.append("")
        for s in streams:
            best_peer = max(peers, key=lambda n: max(x["tok_s"] for x in peers[n]["runs"][str(s)]))
            ratio = max(x["tok_s"] for x in ours["runs"][str(s)]) / max(
                x["tok_s"] for x in peers[best_peer]["runs"][str(s)])
            lines.append(f"- {s} streams: mlx-gemma4 / best peer ({best_peer}) = {ratio:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens of each reply")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--peers", default="mlx-lm,mlx-vlm", help="comma-separated: mlx-lm, mlx-vlm (or none)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"error: {args.model} has no config.json")
    streams = [int(s) for s in args.streams.split(",")]
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    unknown = [p for p in peers if p not in SYSTEMS[1:]]
    if unknown:
        raise SystemExit(f"error: unknown peer(s) {unknown}; expected {', '.join(SYSTEMS[1:])}")
    results = {}
    for name in ["mlx-gemma4", *peers]:
        try:
            results[name] = measure(name, args.model, streams, args.tokens, args.repeat)
        except Exception as e:  # noqa: BLE001 - a peer that cannot serve the checkpoint is reported
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: {results[name]['error']}", file=sys.stderr)
    print(f"model {args.model}, {args.tokens} tokens per reply, best of {args.repeat}; "
          f"{platform.machine()} {os.cpu_count()} CPUs")
    print(table(results, streams))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "tokens": args.tokens, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

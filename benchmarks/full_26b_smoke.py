"""Smoke run of a big checkpoint: load time and memory, one prefill, a few decode steps.

Usage: python benchmarks/full_26b_smoke.py CHECKPOINT PROMPT_TOKENS DECODE_TOKENS
"""
import time, resource, sys
t0 = time.time()
import mlx_gemma4, mlx.core as mx
from mlx_gemma4 import load
from mlx_gemma4 import backend
model, _ = load(sys.argv[1])
t_load = time.time() - t0
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"load {t_load:.1f} s, max RSS {rss():.2f} GiB, MLX active {mx.get_active_memory()/2**30:.2f} GiB, BLAS {backend.blas_in_use}", flush=True)
cache = model.make_cache()
ids = mx.array([[2] + list(range(100, 100 + int(sys.argv[2]) - 1))])
t = time.time(); logits = model(ids, cache=cache, last_only=True); mx.eval(logits)
print(f"prefill {ids.shape[1]} tokens {time.time()-t:.1f} s ({ids.shape[1]/(time.time()-t):.2f} tok/s)", flush=True)
tok = mx.argmax(logits[0, -1]).reshape(1, 1)
t = time.time(); n = int(sys.argv[3])
for _ in range(n):
    logits = model(tok, cache=cache); tok = mx.argmax(logits[0, -1]).reshape(1, 1); mx.eval(tok)
dt = time.time() - t
print(f"decode {n} tokens {dt:.1f} s ({n/dt:.3f} tok/s), max RSS {rss():.2f} GiB, MLX peak {mx.get_peak_memory()/2**30:.2f} GiB", flush=True)

"""The msim emulator as the kernels' factory: Metal kernel bodies run on the CPU (tests and benchmarks only).

`emulated_metal(**options)` installs msim's `metal_kernel` as `mlx_gemma4.kernels`' kernel factory and forces
the Metal backend for a `with` block; it yields the `KernelRunner`, whose `compiled` names the kernels that ran.
options are msim call options; the default runs every launch forward and in reverse order (race check), with
guard pages past every buffer and poisoned outputs and threadgroup memory.

`decode_attention_traffic` and `expert_decode_traffic` measure the decode kernels' device-memory traffic on the
published models' shapes (tests/test_kernels_traffic.py asserts on them, benchmarks/kernels.py prints them);
their docstrings argue why the launches they emulate give the full step's numbers.
"""

from __future__ import annotations

import contextlib
import functools

import mlx.core as mx
import msim
import numpy as np
from msim import counters

from mlx_gemma4 import kernels
from mlx_gemma4.config import FULL, ModelConfig
from mlx_gemma4.kernels import ExpertBank
from mlx_gemma4.kernels import decode_attention as da
from mlx_gemma4.kernels import expert_decode as ed
from mlx_gemma4.memory import load_preset

RACE_CHECKED = dict(check_order=True, guard=True, poison=True)


def msim_factory(**options):
    """A kernel factory (called like `mx.fast.metal_kernel`) whose kernels run under msim with `options`."""

    def factory(**kernel_kw):
        kernel = msim.metal_kernel(**kernel_kw)
        return functools.partial(kernel, **options) if options else kernel

    return factory


@contextlib.contextmanager
def emulated_metal(**options):
    options = {**RACE_CHECKED, **options}
    with kernels.use_kernel_factory(msim_factory(**options)) as runner, kernels.use_backend("metal"):
        yield runner


# --------------------------------------------------------------------------------------- traffic measurements
COUNTED = dict(check_order=False)  # traffic runs skip the race check's second (reverse) run


def attention_shapes(variant: str) -> list[tuple]:
    """(layer kind, query heads, KV heads, head dim, window) of each attention layer type of a published model."""
    text = ModelConfig.from_dict(load_preset(variant)).text
    shapes = {}
    for layer, kind in enumerate(text.layer_types):
        window = None if kind == FULL else text.sliding_window
        shapes[kind] = (kind, text.num_attention_heads, text.layer_kv_heads[layer], text.layer_head_dims[layer],
                        window)
    return list(shapes.values())


def _one_head_step(runner, groups: int, D: int, keys: int, block_keys: int) -> tuple[int, int]:
    """(bytes read, minimum bytes) of one bfloat16 decode step of one KV head over `keys` cached keys, all
    visible; K and V are views into a longer cache buffer, as the caches hand them out."""
    rng = np.random.default_rng(keys)

    def arr(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)

    q = arr(1, groups, 1, D)
    k, v = arr(1, 1, keys + 64, D)[:, :, :keys], arr(1, 1, keys + 64, D)[:, :, :keys]
    kw = dict(q_start=keys - 1, k_start=0, window=None)
    with counters.record() as launches:
        mx.eval(da.decode_attention_metal(runner, q, k, v, scale=D**-0.5, block_keys=block_keys, **kw))
    return counters.bytes_read(launches), da.minimum_bytes(q, k, **kw)


def decode_attention_traffic(Hq: int, Hkv: int, D: int, visible: int) -> tuple[float, int]:
    """(bytes read / minimum bytes, pass-1 threadgroups) of one bfloat16 decode step with `visible` keys (for a
    sliding layer: its window), the minimum being q once and the visible K and V once per KV head.

    Emulated exactly on a smaller launch: KV heads are independent threadgroups reading disjoint K/V with the
    same pattern, so one KV head with the real query heads per KV head and the real cut (`plan` for the real KV
    heads: its block size) reads 1/Hkv of the step's bytes, and the minimum is 1/Hkv of the step's minimum.
    Along the keys every block reads the same bytes (its keys, its q rows; pass 2 its partials) except the last,
    so the reads are affine in the number of blocks: measured with 4, 5 and 6 blocks (the last one as short as in
    the real step; from 4 blocks on, pass 2's per-block arrays have the 8+ elements that put them in device
    memory, as in the real step), checked to be affine to the byte, then extended to the real count."""
    groups = Hq // Hkv
    real = da.plan(1, Hq, Hkv, 1, visible, D, mx.bfloat16, offset=visible - 1, window=None, has_blocks=False)
    with emulated_metal(**COUNTED) as runner:
        if real.blocks <= 6:
            reads, minimum = _one_head_step(runner, groups, D, visible, real.block_keys)
        else:
            last = visible - (real.blocks - 1) * real.block_keys
            (r4, _), (r5, _), (r6, _) = [_one_head_step(runner, groups, D, (n - 1) * real.block_keys + last,
                                                        real.block_keys) for n in (4, 5, 6)]
            if r6 - r5 != r5 - r4:
                raise AssertionError("per-block reads differ: the extension to the real block count is not exact")
            reads = r4 + (real.blocks - 4) * (r5 - r4)
            minimum = 2 * visible * D * 2 + groups * D * 2  # K and V once, q once (bfloat16)
    return reads / minimum, real.threadgroups(1, Hkv)


def _quantized_bank(experts, out_dim, in_dim, bits, group_size, key) -> ExpertBank:
    w = mx.random.normal((experts, out_dim, in_dim), key=key) * in_dim**-0.5
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return ExpertBank(q, s.astype(mx.bfloat16), b.astype(mx.bfloat16), bits=bits, group_size=group_size)


def expert_decode_traffic(bits: int, group_size: int, tokens: int) -> list[tuple[str, float, int]]:
    """[(launch, bytes read / minimum bytes, threadgroups)] for the gate/up and down launches of a bfloat16 decode
    step of the 26B A4B's experts (4 or 8 bits, scales in bfloat16), `tokens` tokens each routed to 8 distinct
    experts among the first 8 + tokens (at 8 tokens, each expert is shared by about half of them). The minimum
    is each selected expert's packed weights, scales and biases once.

    The real output rows (gate/up 2 x 704, down 2816) and routing, but input columns cut to 256 (gate/up) and
    128 (down): a threadgroup's reads (its rows' weights, scales and biases, plus the staged inputs of its
    tokens) and the minimum both grow in proportion to the input columns; only the few index bytes each
    threadgroup reads do not, which makes the cut ratio an upper bound of the real one."""
    experts, top_k, inter, hidden = 16, 8, 704, 2816
    keys = mx.random.split(mx.random.key(bits * 1000 + group_size), 4)
    gate_up = _quantized_bank(experts, 2 * inter, 256, bits, group_size, keys[0])
    down = _quantized_bank(experts, hidden, 128, bits, group_size, keys[1])
    rng = np.random.default_rng(group_size + tokens)
    idx = np.stack([rng.choice(8 + tokens, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    flat = mx.array(idx.reshape(-1))
    order = mx.argsort(flat).astype(mx.int32)
    sorted_experts, weights = flat[order], mx.full((tokens * top_k,), 1.0 / top_k)
    x = mx.random.normal((tokens, 256), key=keys[2]).astype(mx.bfloat16)
    h = mx.random.normal((tokens * top_k, 128), key=keys[3]).astype(mx.bfloat16)
    results = []
    for name, glu, bank, inp, out_rows in (("gate/up", True, gate_up, x, inter), ("down", False, down, h, hidden)):
        with emulated_metal(**COUNTED) as runner, counters.record() as launches:
            mx.eval(ed.launch(runner, inp, order, sorted_experts, weights, bank, out_rows, top_k, glu,
                              mx.bfloat16 if glu else mx.float32))
        (launch,) = launches
        results.append((name, launch.bytes_read / ed.minimum_bytes(mx.array(idx), bank), launch.threadgroups))
    return results

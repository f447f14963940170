"""The decode kernels read what a decode step needs, once: device-memory traffic counted by the emulator (every
load and store of the compiled kernel, `msim.counters`) against the minimum bytes, on the real Gemma 4 shapes.

Emulating whole 32K-token steps of every model would take minutes, so each test runs a smaller launch whose
traffic is provably the full launch's (argued at each test) and checks that argument where it can.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from msim import counters

from mlx_gemma4.config import FULL, ModelConfig
from mlx_gemma4.kernels import ExpertBank
from mlx_gemma4.kernels import decode_attention as da
from mlx_gemma4.kernels import expert_decode as ed
from mlx_gemma4.memory import load_preset

VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")
COUNTED = dict(check_order=False)  # the traffic runs skip the race check's second (reverse) run


def attention_shapes(variant: str):
    """(layer kind, query heads, KV heads, head dim, window) of each attention layer type of a published model."""
    text = ModelConfig.from_dict(load_preset(variant)).text
    shapes = {}
    for layer, kind in enumerate(text.layer_types):
        window = None if kind == FULL else text.sliding_window
        shapes[kind] = (kind, text.num_attention_heads, text.layer_kv_heads[layer], text.layer_head_dims[layer],
                        window)
    return list(shapes.values())


def decode_step_reads(runner, groups: int, D: int, keys: int, window, block_keys: int) -> tuple[int, int]:
    """(bytes read, minimum bytes) of one decode step of one KV head over `keys` cached keys,
    with the given keys per block; K and V are views into a longer cache buffer, as the caches hand them out."""
    rng = np.random.default_rng(keys)

    def arr(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)

    q = arr(1, groups, 1, D)
    k, v = arr(1, 1, keys + 64, D)[:, :, :keys], arr(1, 1, keys + 64, D)[:, :, :keys]
    kw = dict(q_start=keys - 1, k_start=0, window=window)
    with counters.record() as launches:
        mx.eval(da.decode_attention_metal(runner, q, k, v, scale=D**-0.5, block_keys=block_keys, **kw))
    return counters.bytes_read(launches), da.minimum_bytes(q, k, **kw)


@pytest.mark.parametrize("context", [4096, 32768])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_attention_reads_kv_once(variant, context, metal_emulator):
    """Decode attention reads <= 1.1x the minimum bytes (q once, the visible K and V once per KV head), and on the
    global layers at 32K context launches >= 160 threadgroups (a 40-core GPU). (A sliding layer sees at most its
    window, 512-1024 keys: cutting those finer would make pass 2's reads outgrow the budget above.)

    Why the small launches give the full step's traffic exactly: KV heads are independent threadgroups reading
    disjoint K/V with the same pattern, so one KV head with the real number of query heads per KV head and the
    real cut (`plan` for the real KV heads: its block size) reads 1/Hkv of the step's bytes, and the minimum is
    1/Hkv of the step's minimum. Along the keys, every block reads the same bytes (its keys, its q rows; pass 2 its
    partials) except the last, so the reads are affine in the number of blocks: measured with 4, 5 and 6 blocks
    (the last one as short as in the real step; from 4 blocks on, pass 2's per-block arrays have the 8+ elements
    that put them in device memory, as in the real step), checked to be affine to the byte, then extended to the
    real count."""
    for kind, Hq, Hkv, D, window in attention_shapes(variant):
        visible = context if window is None else min(context, window)
        real = da.plan(1, Hq, Hkv, 1, visible, D, mx.bfloat16, offset=visible - 1, window=None, has_blocks=False)
        if context == 32768 and window is None:
            assert real.threadgroups(1, Hkv) >= 160, (kind, real)
        last = visible - (real.blocks - 1) * real.block_keys
        with metal_emulator(**COUNTED) as runner:
            if real.blocks <= 6:
                reads, minimum = decode_step_reads(runner, Hq // Hkv, D, visible, None, real.block_keys)
            else:
                steps = [decode_step_reads(runner, Hq // Hkv, D, (n - 1) * real.block_keys + last, None,
                                           real.block_keys) for n in (4, 5, 6)]
                (r4, _), (r5, _), (r6, _) = steps
                assert r6 - r5 == r5 - r4, "per-block reads differ: the extension would not be exact"
                reads = r4 + (real.blocks - 4) * (r5 - r4)
                minimum = 2 * visible * D * 2 + (Hq // Hkv) * D * 2  # K and V once, q once (bfloat16)
        ratio = reads / minimum
        assert ratio <= 1.1, f"{variant} {kind} at {context}: reads {ratio:.3f}x the minimum"


def _bank(experts, out_dim, in_dim, bits, group_size, key) -> ExpertBank:
    w = mx.random.normal((experts, out_dim, in_dim), key=key) * in_dim**-0.5
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return ExpertBank(q, s.astype(mx.bfloat16), b.astype(mx.bfloat16), bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_expert_decode_reads_selected_experts_once(bits, group_size, metal_emulator):
    """Expert decode reads <= 1.05x the minimum bytes (the selected experts' packed weights, scales and biases
    once) at T = 1, 2, 4, 8 tokens, with 8 of the bank's 8 experts selected by every token at T = 8 (each expert
    shared by all tokens: its bytes must still be read once).

    The 26B A4B's real output rows (gate/up 2 x 704, down 2816) and routing (top 8), bfloat16 activations, but
    input columns cut to 256 (gate/up) and 128 (down): a threadgroup's reads (its rows' weights, scales and
    biases, plus the staged inputs of its tokens) and the minimum both grow in proportion to the input columns;
    only the few index bytes each threadgroup reads do not, which makes the cut ratio an upper bound."""
    experts, top_k, inter, hidden = 16, 8, 704, 2816
    keys = mx.random.split(mx.random.key(bits * 1000 + group_size), 4)
    gate_up = _bank(experts, 2 * inter, 256, bits, group_size, keys[0])
    down = _bank(experts, hidden, 128, bits, group_size, keys[1])
    rng = np.random.default_rng(group_size)
    for T in (1, 2, 4, 8):
        # T tokens each pick 8 distinct experts among the first 8 + T (T = 8: heavy sharing)
        idx = np.stack([rng.choice(8 + T, top_k, replace=False) for _ in range(T)]).astype(np.int32)
        flat = mx.array(idx.reshape(-1))
        order = mx.argsort(flat).astype(mx.int32)
        sorted_experts, weights = flat[order], mx.full((T * top_k,), 1.0 / top_k)
        x = mx.random.normal((T, 256), key=keys[2]).astype(mx.bfloat16)
        h = mx.random.normal((T * top_k, 128), key=keys[3]).astype(mx.bfloat16)
        for glu, bank, inp, out_rows in ((True, gate_up, x, inter), (False, down, h, hidden)):
            with metal_emulator(**COUNTED) as runner, counters.record() as launches:
                mx.eval(ed.launch(runner, inp, order, sorted_experts, weights, bank, out_rows, top_k, glu,
                                   mx.bfloat16 if glu else mx.float32))
            minimum = ed.minimum_bytes(mx.array(idx), bank)
            ratio = counters.bytes_read(launches) / minimum
            assert ratio <= 1.05, f"q{bits} g{group_size} T={T} {'gate/up' if glu else 'down'}: {ratio:.3f}x"

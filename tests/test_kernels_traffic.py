"""The decode kernels read what a decode step needs, once: device-memory traffic counted by the emulator (every
load and store of the compiled kernel, `msim.counters`) against the minimum bytes, on the real Gemma 4 shapes.

Emulating whole 32K-token steps of every model would take minutes: `kernel_emulator.decode_attention_traffic` and
`expert_decode_traffic` run smaller launches whose traffic is provably the full step's (their docstrings give the
argument; the attention one checks it to the byte).
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from kernel_emulator import attention_shapes, decode_attention_traffic, expert_decode_traffic

from mlx_gemma4.kernels import decode_attention as da

VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")


@pytest.mark.parametrize("context", [4096, 32768])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_attention_reads_kv_once(variant, context):
    """Decode attention reads <= 1.1x the minimum bytes (q once, the visible K and V once per KV head), and on the
    global layers at 32K context launches >= 160 threadgroups (a 40-core GPU). (A sliding layer sees at most its
    window, 512-1024 keys: cutting those finer would make pass 2's reads outgrow the budget above.)"""
    for kind, Hq, Hkv, D, window in attention_shapes(variant):
        visible = context if window is None else min(context, window)
        ratio, _ = decode_attention_traffic(Hq, Hkv, D, visible)
        assert ratio <= 1.1, f"{variant} {kind} at {context}: reads {ratio:.3f}x the minimum"
        if context == 32768 and window is None:
            real = da.plan(1, Hq, Hkv, 1, visible, D, mx.bfloat16, offset=visible - 1, window=None,
                           has_blocks=False)
            assert real.threadgroups(1, Hkv) >= 160, (kind, real)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_expert_decode_reads_selected_experts_once(bits, group_size):
    """Expert decode reads <= 1.05x the minimum bytes (the selected experts' packed weights, scales and biases
    once) at T = 1, 2, 4, 8 tokens, experts shared between tokens included."""
    for tokens in (1, 2, 4, 8):
        for launch, ratio, _ in expert_decode_traffic(bits, group_size, tokens):
            assert ratio <= 1.05, f"q{bits} g{group_size} T={tokens} {launch}: {ratio:.3f}x the minimum"

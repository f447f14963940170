"""Top-k expert GeGLU: the Metal decode kernel (run by the msim emulator with race checks and guards) and the MLX
path, both against a float64 numpy reference of transformers' Gemma4TextExperts semantics."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.kernels import ExpertBank, expert_glu, use_backend
from mlx_gemma4.kernels import expert_decode as ed
from mlx_gemma4.kernels import gather_experts as ge
from mlx_gemma4.kernels.verdicts import TOLERANCE


def reference(x, indices, weights, gate_up, down):
    """float64 numpy: out[t] = sum_k w[t,k] * down[e] @ (gelu_tanh(gate[e] @ x[t]) * (up[e] @ x[t]))."""
    inter = gate_up.shape[1] // 2
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = indices[t, k]
            gate, up = gate_up[e, :inter] @ x[t], gate_up[e, inter:] @ x[t]
            act = 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate**3)))
            out[t] += weights[t, k] * (down[e] @ (act * up))
    return out


def make_bank(rng, shape, dtype, bits, group_size, mode="affine"):
    """-> (ExpertBank, the float64 weights it represents)."""
    w = mx.array((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)).astype(dtype)
    if bits is None:
        return ExpertBank(w), np.array(w.astype(mx.float32), np.float64)
    q, s, *b = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    b = b[0] if b else None
    dense = mx.dequantize(q, s, b, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
    return (ExpertBank(q, s, b, bits=bits, group_size=group_size, mode=mode),
            np.array(dense.astype(mx.float32), np.float64))


def make_routing(rng, T, K, E):
    """Random top-k ids with the first and last expert present, a duplicate id inside one token, and
    experts shared between tokens; weights are softmax-like positive floats."""
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    idx[0, 0] = 0
    idx[-1, -1] = E - 1
    idx[0, 1] = idx[0, 0]  # duplicate within a token (each slot counts once, as in index_add)
    if T > 1:
        idx[1, 0] = idx[0, 2]  # shared with another token
    w = rng.random((T, K)).astype(np.float32) + 0.1
    return mx.array(idx), mx.array(w / w.sum(1, keepdims=True))


# (dtype, bits, group_size, T): decode kernel (T <= ed.MAX_TOKENS) and the MLX path (more tokens)
CASES = [
    (mx.float32, None, None, 3),
    (mx.float32, None, None, 13),
    (mx.float16, None, None, 2),
    (mx.float16, None, None, 11),
    (mx.bfloat16, None, None, 1),
    (mx.bfloat16, None, None, 12),
    (mx.bfloat16, 4, 64, 3),
    (mx.bfloat16, 4, 64, 13),
    (mx.float16, 8, 32, 4),
    (mx.float16, 8, 32, 10),
    (mx.float32, 4, 32, 2),
    (mx.float32, 8, 64, 9),
    (mx.bfloat16, 4, 128, 8),  # the largest group, at the decode kernel's token limit
    (mx.float16, 8, 128, 5),
]
# MLX's CPU quantized matmuls keep bfloat16/float16 intermediates
TOL_MLX = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 4e-2}


def _id(case):
    dtype, bits, gs, T = case
    q = f"q{bits}g{gs}" if bits else "dense"
    return f"{str(dtype).split('.')[-1]}-{q}-T{T}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_expert_glu_metal_and_mlx_match_float64(case, metal_emulator):
    dtype, bits, gs, T = case
    rng = np.random.default_rng(T * 7 + (bits or 0))
    E, H, I, K = 16, 128, max(64, gs or 0), 8  # 26B A4B: top-8 experts (of 128; 16 here), H and I shrunk
    gate_up, gu64 = make_bank(rng, (E, 2 * I, H), dtype, bits, gs)
    down, dn64 = make_bank(rng, (E, H, I), dtype, bits, gs)
    x = mx.array(rng.standard_normal((T, H)).astype(np.float32)).astype(dtype)
    idx, w = make_routing(rng, T, K, E)
    ref = reference(np.array(x.astype(mx.float32), np.float64), np.array(idx), np.array(w, np.float64), gu64, dn64)

    with use_backend("mlx"):
        out_mlx = expert_glu(x, idx, w, gate_up, down)
    with metal_emulator() as runner:
        out_metal = expert_glu(x, idx, w, gate_up, down)
    assert out_mlx.dtype == dtype and out_metal.dtype == dtype
    assert out_metal.shape == (T, H)
    # the token count picks the path: the decode kernel up to MAX_TOKENS tokens, the MLX path beyond
    assert runner.compiled == ({ed.SPEC.name} if T <= ed.MAX_TOKENS else set())
    scale = np.abs(ref).max()
    err_metal = np.abs(np.array(out_metal.astype(mx.float32), np.float64) - ref).max() / scale
    err_mlx = np.abs(np.array(out_mlx.astype(mx.float32), np.float64) - ref).max() / scale
    assert err_metal < TOLERANCE[dtype], f"Metal kernel error {err_metal:.2e}"
    assert err_mlx < TOL_MLX[dtype], f"MLX path error {err_mlx:.2e}"


def test_decode_kernel_reads_16_byte_units_and_factors_scales(metal_emulator):
    """The weight rows are read as 16-byte loads (4-bit: 32 values each) and each scale/bias once; compiled
    with traffic counters."""
    from msim import counters

    rng = np.random.default_rng(1)
    E, H, I, K, T = 8, 256, 128, 4, 2
    gate_up, _ = make_bank(rng, (E, 2 * I, H), mx.bfloat16, 4, 64)
    down, _ = make_bank(rng, (E, H, I), mx.bfloat16, 4, 64)
    x = mx.array(rng.standard_normal((T, H)).astype(np.float32)).astype(mx.bfloat16)
    idx = mx.array([[0, 3, 5, 6], [3, 1, 6, 2]], mx.int32)  # distinct per token (as routed), two shared
    w = mx.full((T, K), 0.25)
    with metal_emulator(check_order=False) as runner, counters.record() as launches:
        ed.expert_decode_metal(runner, x, idx, w, gate_up, down)
    experts = len(set(np.array(idx).reshape(-1).tolist()))
    for launch, bank in zip(launches, (gate_up, down)):
        assert launch.buffers["w"][0] == experts * bank.weight.nbytes // E  # every selected row once
        assert launch.buffers["scales"][0] == experts * bank.scales.nbytes // E
        assert launch.loads_by_width["16"] * 16 == launch.buffers["w"][0]  # only 16-byte weight loads


def test_rows_the_kernel_cannot_read_in_16_byte_units_take_the_mlx_path(metal_emulator):
    """A float32 bank whose rows are 34 * 4 bytes (not a whole number of 16-byte units) takes the MLX path even
    with the Metal backend forced; the same shapes one unit wider run the kernel."""
    rng = np.random.default_rng(6)
    E, I, K, T = 4, 16, 3, 2
    for H, kernel_runs in ((34, False), (36, True)):
        gate_up, gu64 = make_bank(rng, (E, 2 * I, H), mx.float32, None, None)
        down, dn64 = make_bank(rng, (E, H, I), mx.float32, None, None)
        assert ed.reads(gate_up) == kernel_runs and ed.reads(down)
        x = mx.array(rng.standard_normal((T, H)).astype(np.float32))
        idx, w = make_routing(rng, T, K, E)
        ref = reference(np.array(x, np.float64), np.array(idx), np.array(w, np.float64), gu64, dn64)
        with metal_emulator() as runner:
            out = expert_glu(x, idx, w, gate_up, down)
        assert runner.compiled == ({ed.SPEC.name} if kernel_runs else set())
        np.testing.assert_allclose(np.array(out), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mlx_paths_agree(bits):
    """The MLX-ops implementations (gathered matmuls unsorted and sorted by expert, per-expert segments) give the
    reference result, and the dispatcher takes the segments on the CPU from SORT_MIN_PAIRS pairs on."""
    rng = np.random.default_rng(3)
    E, H, I, K = 16, 64, 32, 8
    gate_up, gu64 = make_bank(rng, (E, 2 * I, H), mx.float32, bits, 32 if bits else None)
    down, dn64 = make_bank(rng, (E, H, I), mx.float32, bits, 32 if bits else None)
    T = ge.SORT_MIN_PAIRS // K + 3
    x = mx.array(rng.standard_normal((T, H)).astype(np.float32))
    idx, w = make_routing(rng, T, K, E)
    idx = mx.where(idx == 5, 6, idx)  # expert 5 gets no token at all
    ref = reference(np.array(x, np.float64), np.array(idx), np.array(w, np.float64), gu64, dn64)
    outs = {
        "unsorted": ge.expert_glu_gathered(x, idx, w, gate_up, down, sort=False),
        "sorted": ge.expert_glu_gathered(x, idx, w, gate_up, down, sort=True),
        "segments": ge.expert_glu_segments(x, idx, w, gate_up, down),
        "rows": mx.concatenate([ge.expert_glu_mlx(x[t:t + 1], idx[t:t + 1], w[t:t + 1], gate_up, down)
                                for t in range(T)]),
    }
    for name, out in outs.items():
        np.testing.assert_allclose(np.array(out), ref, rtol=1e-4, atol=1e-5, err_msg=name)
    with use_backend("mlx"):
        dispatched = expert_glu(x, idx, w, gate_up, down)
    assert mx.array_equal(dispatched, outs["segments"])


# Quantizations the Metal kernels do not read: the dispatcher sends them to the MLX path (gather_qmm, or per-expert
# products on the CPU) whatever the backend.
OTHER_MODES = [("affine", 3, 64), ("affine", 6, 32), ("affine", 2, 128), ("mxfp4", 4, 32), ("mxfp8", 8, 32),
               ("nvfp4", 4, 16)]


@pytest.mark.parametrize("mode,bits,gs", OTHER_MODES, ids=[f"{m}{b}g{g}" for m, b, g in OTHER_MODES])
def test_other_quant_modes_take_the_mlx_path(mode, bits, gs, metal_emulator):
    rng = np.random.default_rng(bits)
    E, H, I, K = 8, 128, 128, 4
    gate_up, gu64 = make_bank(rng, (E, 2 * I, H), mx.float32, bits, gs, mode)
    down, dn64 = make_bank(rng, (E, H, I), mx.float32, bits, gs, mode)
    assert not ed.reads(gate_up) and not ed.reads(down)
    for T in (3, ge.SORT_MIN_PAIRS // K + 2):  # gathered (decode) and per-expert segments (CPU prefill)
        x = mx.array(rng.standard_normal((T, H)).astype(np.float32))
        idx, w = make_routing(rng, T, K, E)
        ref = reference(np.array(x, np.float64), np.array(idx), np.array(w, np.float64), gu64, dn64)
        with use_backend("mlx"):
            out = expert_glu(x, idx, w, gate_up, down)
        np.testing.assert_allclose(np.array(out), ref, rtol=1e-4, atol=1e-4, err_msg=f"T={T}")
        with metal_emulator() as runner:
            assert mx.array_equal(expert_glu(x, idx, w, gate_up, down), out)
        assert not runner.compiled  # no Metal kernel ran


def test_matches_transformers_experts_module(metal_emulator):
    """Same result as transformers' Gemma4TextExperts (float32) on random weights."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    cfg = Gemma4TextConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, top_k_experts=4,
                           hidden_activation="gelu_pytorch_tanh", enable_moe_block=True)
    torch.manual_seed(0)
    experts = Gemma4TextExperts(cfg).eval()
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
        x = torch.randn(5, 32)
        idx = torch.stack([torch.randperm(8)[:4] for _ in range(5)])
        w = torch.rand(5, 4)
        want = experts(x, idx, w).numpy()
    gu = ExpertBank(mx.array(experts.gate_up_proj.detach().numpy()))
    dn = ExpertBank(mx.array(experts.down_proj.detach().numpy()))
    args = (mx.array(x.numpy()), mx.array(idx.numpy().astype(np.int32)), mx.array(w.numpy()), gu, dn)
    with use_backend("mlx"):
        np.testing.assert_allclose(np.array(expert_glu(*args)), want, rtol=1e-4, atol=1e-5)
    with metal_emulator():
        np.testing.assert_allclose(np.array(expert_glu(*args)), want, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(0)
    gate_up, _ = make_bank(rng, (4, 32, 16), mx.float32, None, None)
    down, _ = make_bank(rng, (4, 16, 16), mx.float32, None, None)
    x = mx.zeros((2, 16))
    idx = mx.zeros((2, 2), mx.int32)
    w = mx.ones((2, 2))
    with pytest.raises(ValueError, match="hidden size"):
        expert_glu(mx.zeros((2, 8)), idx, w, gate_up, down)
    with pytest.raises(ValueError, match="indices must be"):
        expert_glu(x, mx.zeros((3, 2), mx.int32), w, gate_up, down)
    with pytest.raises(ValueError, match="int32"):
        expert_glu(x, mx.zeros((2, 2), mx.float32), w, gate_up, down)
    with pytest.raises(ValueError, match="weights shape"):
        expert_glu(x, idx, mx.ones((2, 3)), gate_up, down)
    with pytest.raises(ValueError, match="down must be"):
        expert_glu(x, idx, w, gate_up, ExpertBank(mx.zeros((4, 16, 8))))
    with pytest.raises(ValueError, match="affine quantization takes bits 2 or 3 or 4 or 5 or 6 or 8, got 7"):
        q, s, b = mx.quantize(mx.zeros((4, 32, 64)), group_size=64, bits=4)
        expert_glu(mx.zeros((2, 64)), idx, w, ExpertBank(q, s, b, bits=7, group_size=64), down)
    with pytest.raises(ValueError, match="unknown quantization mode 'int4'"):
        expert_glu(mx.zeros((2, 64)), idx, w, ExpertBank(q, s, b, bits=4, group_size=64, mode="int4"), down)
    with pytest.raises(ValueError, match="needs scales and biases"):
        expert_glu(mx.zeros((2, 64)), idx, w, ExpertBank(q, bits=4, group_size=64), down)
    with pytest.raises(ValueError, match="not a float type"):
        expert_glu(x, idx, w, ExpertBank(mx.zeros((4, 32, 16), mx.int32)), down)

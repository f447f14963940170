"""mlx_gemma4.quant on tiny inputs: the fitted quantizer writes MLX's exact affine layout and never does worse than
min/max; AWQ folds leave the float model's function unchanged; calibration statistics, bits per weight and the
budgeted allocation are what they claim; recipes validate their options."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4 import load
from mlx_gemma4.quant import Recipe, affine, as_recipe, awq, budget, calibrate

RNG = np.random.RandomState(0)


def _mse(a, b, importance=None):
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    return float((d * (1 if importance is None else np.asarray(importance))).mean())


def _dequantized(packed, scales, biases, group_size, bits):
    return np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(mx.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    """Codes recovered from mx.quantize's output pack back to exactly its words, for every bit width."""
    w = mx.array(RNG.randn(6, 256).astype(np.float32))
    packed, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    deq = _dequantized(packed, scales, biases, 64, bits).reshape(6, 4, 64)
    s, b = np.array(scales)[..., None], np.array(biases)[..., None]
    q = np.rint((deq - b) / s).reshape(6, 256)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    np.testing.assert_array_equal(np.array(affine.pack(mx.array(q), bits)), np.array(packed))


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32), (4, 64), (4, 128), (6, 64), (8, 64)])
@pytest.mark.parametrize("dist", ["normal", "student-t"])
def test_fitted_quantizer_beats_minmax(bits, group_size, dist):
    w = RNG.randn(64, 512) if dist == "normal" else RNG.standard_t(3, (64, 512))
    w = mx.array((0.02 * w).astype(np.float32))
    minmax = _dequantized(*mx.quantize(w, group_size=group_size, bits=bits), group_size, bits)
    ours = _dequantized(*affine.quantize(w, group_size, bits), group_size, bits)
    # measured: 0.55-0.85 of min/max's squared error depending on bits and distribution
    assert _mse(ours, w) < 0.9 * _mse(minmax, w)
    np.testing.assert_allclose(ours, np.array(affine.fake_quantize(w, group_size, bits)), atol=1e-7)


def test_recovers_a_coarser_grid_exactly():
    """Groups on a 4-bit grid that use 15 of its 16 levels (llama.cpp's K-quant blocks often do) come back exactly,
    as do groups using all 16; min/max picks too fine a step for the first kind and misses them."""
    groups, gs = 64, 32
    step = RNG.uniform(0.001, 0.01, (groups, 1))
    low = RNG.uniform(-0.05, 0.0, (groups, 1))
    span = np.where(np.arange(groups)[:, None] % 2, 14, 15)
    q = RNG.randint(0, 100, (groups, gs)) % (span + 1)
    q[:, 0], q[:, 1] = 0, span[:, 0]  # both ends used
    w = mx.array((low + step * q).astype(np.float32).reshape(8, 256))
    ours = _dequantized(*affine.quantize(w, gs, 4), gs, 4)
    minmax = _dequantized(*mx.quantize(w, group_size=gs, bits=4), gs, 4)
    assert _mse(ours, w) < 1e-12 < _mse(minmax, w)


def test_importance_weighting_lowers_the_weighted_error():
    w = mx.array((0.02 * RNG.randn(32, 256)).astype(np.float32))
    importance = np.where(RNG.rand(256) < 0.1, 100.0, 1.0).astype(np.float32)
    plain = _dequantized(*affine.quantize(w, 64, 3), 64, 3)
    weighted = _dequantized(*affine.quantize(w, 64, 3, importance=mx.array(importance)), 64, 3)
    assert _mse(weighted, w, importance) < 0.9 * _mse(plain, w, importance)


def test_banks_constant_groups_and_stored_dtype():
    """Expert banks (E, out, in) with per-expert importance (E, 1, in); constant groups stay exact; bf16 scales."""
    w = (0.02 * RNG.randn(3, 16, 128)).astype(np.float32)
    w[1, 2, :64] = 0.25  # a constant group
    importance = mx.array(RNG.rand(3, 1, 128).astype(np.float32))
    packed, scales, biases = affine.quantize(mx.array(w), 64, 4, importance=importance, dtype=mx.bfloat16)
    assert packed.shape == (3, 16, 16) and scales.dtype == biases.dtype == mx.bfloat16 and scales.shape == (3, 16, 2)
    deq = _dequantized(packed, scales, biases, 64, 4)
    np.testing.assert_allclose(deq[1, 2, :64], 0.25, rtol=1e-2)
    assert _mse(deq, w) < _mse(_dequantized(*mx.quantize(mx.array(w), group_size=64, bits=4), 64, 4), w)


def test_pieces_of_rows_give_the_same_result(monkeypatch):
    """Large matrices are fitted a few rows (or one expert) at a time: the result is the one-piece result."""
    w = mx.array((0.02 * RNG.randn(3, 40, 128)).astype(np.float32))
    importance = mx.array(RNG.rand(3, 1, 128).astype(np.float32))
    whole = affine.quantize(w, 64, 4, importance)
    fake = affine.fake_quantize(w, 64, 4, importance)
    monkeypatch.setattr(affine, "CHUNK_ELEMENTS", 7 * 128)  # 7 rows a piece: pieces straddle no expert
    for a, b in zip(whole, affine.quantize(w, 64, 4, importance)):
        assert a.shape == b.shape and mx.array_equal(a, b).item()
    assert mx.array_equal(fake, affine.fake_quantize(w, 64, 4, importance)).item()


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of it"):
        affine.quantize(mx.zeros((4, 96)), 64, 4)
    with pytest.raises(ValueError, match="importance has 32 columns"):
        affine.quantize(mx.zeros((4, 64)), 64, 4, importance=mx.ones((32,)))


# ---- calibration statistics --------------------------------------------------------------------


def test_recorded_statistics_are_the_inputs_moments():
    layer = nn.Linear(8, 4)
    stats = {}
    record = calibrate.recorder(stats)
    x = mx.array(RNG.randn(2, 5, 8).astype(np.float32))
    with calibrate.observe({"lin": layer}, before=record):
        layer(x)
        layer(2 * x)
    assert type(layer) is nn.Linear  # restored
    flat = np.array(x).reshape(-1, 8)
    np.testing.assert_allclose(np.array(stats["lin"].mean_sq()), (flat**2).mean(0) * 2.5, rtol=1e-5)
    np.testing.assert_allclose(np.array(stats["lin"].mean_abs()), np.abs(flat).mean(0) * 1.5, rtol=1e-5)
    assert float(stats["lin"].count[0]) == 20


# ---- AWQ folds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    import checkpoints

    return checkpoints.make_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3-awq"))


@pytest.mark.parametrize("variant", ["e2b", "26b", "gemma3"])
def test_awq_folds_leave_the_float_model_unchanged(variant, text_checkpoint, gemma3_dir):
    """Every fold (norms with weight w and 1 + w, up_proj rows, v_proj rows for o_proj, expert banks) with random
    scales gives the same logits; Gemma 4's value norm rules out the o_proj fold."""
    path = gemma3_dir if variant == "gemma3" else text_checkpoint(variant)
    model = load(path, dtype="float32")[0]
    ids = mx.array(RNG.randint(3, 500, (2, 24)))
    ref = np.array(model(ids))
    paths = [p for p, m in model.named_modules() if hasattr(m, "to_quantized")]
    stats = calibrate.collect(model, ids, paths)
    kinds = set()
    for i, layer in enumerate(model.language_model.layers):
        for group in awq.scale_groups(layer, f"language_model.layers.{i}", stats):
            kinds.add(group.kind)
            s = mx.array(RNG.uniform(0.5, 2.0, group.magnitude.shape).astype(np.float32))
            awq.apply_scale(group, s, stats)
    np.testing.assert_allclose(np.array(model(ids)), ref, atol=2e-4 * np.abs(ref).max())
    expected = {"qkv", "gate_up", "down"} | {"gemma3": {"o_proj"}, "26b": {"experts.gate_up", "experts.down"}}.get(
        variant, set())
    assert kinds == expected


# ---- budget ------------------------------------------------------------------------------------


def test_bits_per_weight_and_allocation(chat_checkpoint):
    model = load(chat_checkpoint("e2b"), dtype="float32", quantize=4, recipe=Recipe(calibration=False))[0]
    specs = budget.matrices(model)
    quantized = {k: v for k, v in specs.items() if v[0] is not None}
    assert quantized and all(b == 4 and g == 64 for b, g, _ in quantized.values())
    expected = sum(n * (4.5 if b else 16) for b, _, n in specs.values()) / sum(n for *_, n in specs.values())
    assert budget.bits_per_weight(model) == pytest.approx(expected)

    float_model = load(chat_checkpoint("e2b"), dtype="float32")[0]
    from mlx_gemma4.quant.plan import quantization_plan

    plan = quantization_plan(float_model, 4, 64, "uniform")
    base = budget.plan_bits_per_weight(float_model, plan)
    assert base == pytest.approx(budget.bits_per_weight(model))
    errors = {"language_model.layers.0.mlp.down_proj": 10.0, "language_model.layers.1.mlp.down_proj": 1.0,
              "language_model.layers.0.self_attn.q_proj": 0.1}
    total = sum(n for *_, n in budget.matrices(float_model).values())
    one = sum(n for k, (*_, n) in budget.matrices(float_model).items() if k.startswith(next(iter(errors))))
    # room for 4 more bits on one down_proj: 4 -> 6 bits on the worst (error 10 -> 0.6), then 4 -> 6 on the second
    # (1 -> 0.06) gains more than 6 -> 8 on the worst (0.6 -> 0.04)
    overrides = budget.allocate(float_model, plan, errors, base + 4 * one / total * 1.01)
    assert overrides == {p: {"group_size": 64, "bits": 6} for p in list(errors)[:2]}
    overrides = budget.allocate(float_model, plan, errors, base + 6 * one / total * 1.01)
    assert overrides[next(iter(errors))]["bits"] == 8
    assert budget.allocate(float_model, plan, errors, base) == {}


# ---- recipes -----------------------------------------------------------------------------------


def test_recipe_names_and_validation():
    assert as_recipe("mixed") == Recipe("mixed") and as_recipe(Recipe("dynamic")).allocation == "dynamic"
    assert as_recipe("awq").name == "mixed+awq" and Recipe(calibration=False).name == "uniform+uncalibrated"
    with pytest.raises(ValueError, match="unknown quantization recipe 'best'"):
        as_recipe("best")
    with pytest.raises(ValueError, match="allocation must be one of"):
        Recipe("greedy")
    with pytest.raises(ValueError, match="target_bpw only applies"):
        Recipe("mixed", target_bpw=5)
    with pytest.raises(ValueError, match="need method='fit'"):
        Recipe("uniform", awq=True, method="minmax")
    with pytest.raises(ValueError, match="need a calibration text"):
        Recipe("dynamic", calibration=False)


# ---- recipes end to end on tiny models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_kls(chat_checkpoint):
    """{(variant, recipe): mean KL of the 4-bit g64 model against float32} over three fixed 300-token sequences
    (on these random tiny models the recipes' gains are a few percent: shorter sequences are noisier than that)."""
    from mlx_gemma4.perplexity import kl_divergence, log_probs

    sequences = [[2] + [int(t) for t in np.random.RandomState(seed).randint(3, 500, 300)] for seed in range(3)]
    kls = {}
    for variant in ("e2b", "26b"):
        path = chat_checkpoint(variant)
        float_model = load(path, dtype="float32")[0]
        references = [log_probs(float_model, ids) for ids in sequences]
        for recipe in ("mixed-minmax", "mixed", "awq", "dynamic"):
            model = load(path, dtype="float32", quantize=4, recipe=recipe)[0]
            kls[variant, recipe] = float(np.mean([kl_divergence(ref, log_probs(model, ids))
                                                  for ref, ids in zip(references, sequences)]))
    return kls


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_recipes_beat_min_max_rounding(recipe_kls, variant):
    """Fitted, activation-weighted scales (mixed), AWQ scaling (awq; the MoE's expert banks included) and the
    budgeted 6/8-bit allocation (dynamic) each leave the model closer to float32 than MLX's min/max rounding with
    the same allocation (mixed-minmax)."""
    minmax = recipe_kls[variant, "mixed-minmax"]
    for recipe in ("mixed", "awq", "dynamic"):
        assert 0 < recipe_kls[variant, recipe] < minmax, (recipe, recipe_kls)

"""mlx-lm and mlx-vlm checkpoints: conversions made here by those libraries' own `convert` load with `load()` and
compute what the converting library's model computes on the same files; our `convert --format mlx-vlm/mlx-lm`
writes checkpoints they load and run; broken conversions fail with one clear error."""

from __future__ import annotations

import json
import shutil
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

from checkpoints.interop import PeerModel, convert_with, converter_source, into_hub_cache
from mlx_gemma4 import load
from mlx_gemma4.convert import convert
from mlx_gemma4.loading import CheckpointError
from mlx_gemma4.moe import BankQuantization, QuantizedExperts

pytest.importorskip("mlx_vlm", reason="mlx-vlm (the test extra's peer) is not installed: pip install -e '.[test]'")

PROMPT = [2, 17, 45, 99, 3, 250, 31, 7, 88, 120, 400, 5, 6, 77, 300, 12, 19, 200, 201, 44, 8, 9, 10]
TOL = 2e-3  # max |difference| / max |logit|, float32 compute on both sides
GREEDY_STEPS = 6

# name: (library, source, convert options); source: (variant, with towers, wrapper). Several group sizes, affine
# 3/4/5/6/8 bits (mixed_3_6 gives the experts' down bank 6 bits and the gate/up bank 3), mxfp4/mxfp8/nvfp4, bf16.
CONVERSIONS = {
    # mlx-vlm quantizes embed_audio (a projector, not a tower) when its width allows
    "mlx-vlm-e2b-4bit-g32": ("mlx-vlm", ("e2b", True, "conditional"), dict(bits=4, group_size=32)),
    "mlx-vlm-e2b-bf16": ("mlx-vlm", ("e2b", True, "conditional"), dict(dtype="bfloat16")),
    "mlx-lm-e2b-8bit-g64": ("mlx-lm", ("e2b", True, "conditional"), dict(bits=8, group_size=64)),
    # the experts' down bank (input width 32) stays float
    "mlx-vlm-26b-4bit-g64": ("mlx-vlm", ("26b", True, "conditional"), dict(bits=4, group_size=64)),
    "mlx-lm-26b-8bit-g32": ("mlx-lm", ("26b", False, "conditional"), dict(bits=8, group_size=32)),
    "mlx-lm-26b-mxfp4": ("mlx-lm", ("26b", False, "conditional"), dict(mode="mxfp4")),
    "mlx-lm-26b-mixed_3_6": ("mlx-lm", ("26b", False, "conditional"), dict(recipe="mixed_3_6", group_size=32)),
    "mlx-vlm-31b-mxfp8": ("mlx-vlm", ("31b", True, "conditional"), dict(mode="mxfp8")),  # (mlx-vlm needs towers)
    "mlx-lm-31b-nvfp4": ("mlx-lm", ("31b", False, "conditional"), dict(mode="nvfp4")),
    "mlx-lm-31b-5bit-g32": ("mlx-lm", ("31b", False, "conditional"), dict(bits=5, group_size=32)),
    "mlx-lm-31b-bf16": ("mlx-lm", ("31b", False, "conditional"), dict(dtype="bfloat16")),
    # mlx-lm's gemma4_text model (a Gemma4ForCausalLM source): names and overrides `model.X`
    "mlx-lm-26b-causal-lm-4bit-g32": ("mlx-lm", ("26b", False, "causal_lm"), dict(bits=4, group_size=32)),
}


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """sources(variant, towers, wrapper="conditional") -> converter_source(...), made once per session."""
    made = {}

    def make(variant: str, towers: bool, wrapper: str = "conditional"):
        key = (variant, towers, wrapper)
        if key not in made:
            out = tmp_path_factory.mktemp(f"src-{variant}-{'towers' if towers else wrapper}")
            made[key] = converter_source(out, *key)
        return made[key]

    return make


@pytest.fixture(scope="session")
def converted(sources, tmp_path_factory):
    """converted(name) -> (library, path) of CONVERSIONS[name], made once per session."""
    made = {}

    def make(name: str):
        if name not in made:
            library, source, options = CONVERSIONS[name]
            out = tmp_path_factory.mktemp("conversions") / name
            made[name] = library, convert_with(library, sources(*source), out, **options)
        return made[name]

    return make


def image_inputs(seed: int = 0):
    """(pixel_values, position_ids) of one random 96x64 picture, as our image processor makes them."""
    from PIL import Image

    from mlx_gemma4.processing.image import ImageProcessor

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    features = ImageProcessor()([Image.fromarray(pixels)], max_soft_tokens=70)
    return mx.array(features.pixel_values), mx.array(features.position_ids)


def audio_inputs(seed: int = 0):
    """(features, mask) of one second of random sound, as our audio feature extractor makes them."""
    from mlx_gemma4.processing.audio import AudioFeatureExtractor

    clip = 0.1 * np.random.default_rng(seed).standard_normal(16000).astype(np.float32)
    features = AudioFeatureExtractor()([clip])
    return mx.array(features.features), mx.array(features.mask)


def rel_error(a, b) -> float:
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def greedy(step, make_cache, ids, n=GREEDY_STEPS) -> list[int]:
    """Greedy tokens decoded one at a time with the model's own caches after prefilling `ids`."""
    cache = make_cache()
    logits = step(mx.array([ids]), cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1])))
        logits = step(mx.array([[out[-1]]]), cache)
    return out


def assert_picks_agree(chosen, logits, slack: float):
    """Each chosen token is the top one of `logits` (positions, vocab) or within `slack` of it: random tiny
    models have near-ties (1e-6 apart) that float32 rounding differences between two correct models flip."""
    logits = np.array(logits, np.float64).reshape(-1, logits.shape[-1])
    gaps = logits.max(-1) - logits[np.arange(len(chosen)), chosen]
    assert (gaps <= slack).all(), f"chosen tokens trail the other model's top token by up to {gaps.max():.2e}"
    assert (gaps == 0).mean() > 0.75


def assert_same_as_peer(ours, peer: PeerModel):
    """Logits within TOL of the peer's; our greedy choices (teacher-forced over the prompt, then decoded with our
    caches) are the peer's (fed the same tokens through its own caches), up to near-ties."""
    ids = mx.array([PROMPT])
    a, b = ours(ids), peer.logits(ids)
    assert a.dtype == mx.float32
    err = rel_error(a, b)
    assert err < TOL, f"logits differ from the converting library's by {err:.2e} (relative)"
    slack = 2 * float(mx.abs(a - b).max())
    assert_picks_agree(np.array(a).argmax(-1)[0], b[0], slack)
    tokens = greedy(lambda x, c: ours(x, cache=c), ours.make_cache, PROMPT)
    cache = peer.make_cache()
    steps = [peer.logits(ids, cache)[:, -1]] + [peer.logits(mx.array([[t]]), cache)[:, -1] for t in tokens[:-1]]
    assert_picks_agree(np.array(tokens), mx.concatenate(steps), slack)


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_conversion_loads_and_matches_its_library(converted, name):
    library, path = converted(name)
    model, _ = load(path)
    assert_same_as_peer(model, PeerModel(library, path))
    _, (variant, towers, _), options = CONVERSIONS[name]
    has_towers = towers and library == "mlx-vlm"  # mlx-lm converts the text model only
    assert ("vision_tower" in model) == has_towers
    assert ("audio_tower" in model) == (has_towers and variant == "e2b")
    if "mode" in options:
        modes = {m.mode for _, m in model.named_modules() if hasattr(m, "mode")}
        assert options["mode"] in modes
    if name == "mlx-vlm-e2b-4bit-g32":
        assert isinstance(model.embed_audio.embedding_projection, nn.QuantizedLinear)
    if name == "mlx-vlm-26b-4bit-g64":
        banks = {m.quantization["down_proj"] for _, m in model.named_modules() if isinstance(m, QuantizedExperts)}
        assert banks == {None}


def _hf_rounded_to_bf16(source):
    """Our load of the original HF checkpoint with every float tensor rounded to bf16 (then float32 again)."""
    model, _ = load(source, dtype="float32")
    model.update(tree_map(lambda x: x.astype(mx.bfloat16).astype(mx.float32), model.parameters()))
    return model


@pytest.mark.parametrize("name,variant,towers", [("mlx-vlm-e2b-bf16", "e2b", True),
                                                 ("mlx-lm-31b-bf16", "31b", False)])
def test_bf16_conversion_equals_the_original_within_bf16_rounding(converted, sources, name, variant, towers):
    _, path = converted(name)
    ours, _ = load(path, dtype="float32")
    original, _ = load(sources(variant, towers), dtype="float32")
    rounded = _hf_rounded_to_bf16(sources(variant, towers))
    ids = mx.array([PROMPT])
    assert rel_error(ours(ids), rounded(ids)) < 1e-5  # the only difference is the rounding of stored values
    assert rel_error(ours(ids), original(ids)) > 1e-4  # and that rounding is there
    if towers:  # the towers too (the audio convolutions are channels-last on disk): the same image and sound
        pixels, positions = image_inputs()
        np.testing.assert_allclose(np.array(ours.image_features(pixels, positions)),
                                   np.array(rounded.image_features(pixels, positions)), rtol=1e-4, atol=1e-5)
        features, mask = audio_inputs()
        assert rel_error(ours.audio_features(features, mask), rounded.audio_features(features, mask)) < 1e-5


def test_text_only_conversion_is_a_text_model(converted, text_checkpoint):
    """mlx-lm keeps audio_config (and mlx-vlm's text-only loads keep vision_config) without tower weights: the
    model has no towers, and an image or a sound gets the same error as from a text-only Hugging Face checkpoint."""
    from PIL import Image

    from mlx_gemma4.generate import generate

    _, path = converted("mlx-lm-e2b-8bit-g64")
    assert json.loads((path / "config.json").read_text()).get("audio_config")
    model, processor = load(path)
    assert "vision_tower" not in model and "audio_tower" not in model and model.config.audio is None
    hf_text = shutil.copytree(text_checkpoint("e2b", wrapper="conditional"), path.parent / "hf-text")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(path / name, hf_text / name)
    media = {"images": [Image.new("RGB", (64, 64))], "audio": [np.zeros(16000, np.float32)]}
    for kind, tower in (("images", "no vision tower"), ("audio", "no audio tower")):
        errors = []
        for m, p in (load(path), load(hf_text)):
            with pytest.raises(ValueError) as e:
                generate(m, p, "What is this?", max_tokens=2, **{kind: media[kind]})
            errors.append(str(e.value))
        assert errors[0] == errors[1] and tower in errors[0], errors


def test_our_mlx_vlm_format_loads_in_mlx_vlm(sources, converted, tmp_path):
    """convert --format mlx-vlm (E2B-like with both towers, 4-bit): mlx-vlm loads it and computes our logits,
    its vision tower gives our soft tokens for the same image, and its audio tower computes on our file what it
    computes on its own conversion of the same source (mlx-vlm's audio tower itself differs from transformers'
    and ours by ~2.5% on these random weights, so it is compared with itself)."""
    out = convert(sources("e2b", True), tmp_path / "ours-vlm", bits=4, group_size=32, dtype="float32")
    ours, _ = load(out)
    peer = PeerModel("mlx-vlm", out)
    assert_same_as_peer(ours, peer)
    pixels, positions = image_inputs(1)
    theirs = peer.model.embed_vision(peer.model.vision_tower(pixels, positions))
    assert rel_error(ours.image_features(pixels, positions), theirs.reshape(-1, theirs.shape[-1])) < 1e-4
    features, mask = audio_inputs(1)
    own_conversion = PeerModel("mlx-vlm", converted("mlx-vlm-e2b-4bit-g32")[1])
    on_ours, on_theirs = (p.model.audio_tower(features, ~mask)[0] for p in (peer, own_conversion))
    assert rel_error(on_ours, on_theirs) < 1e-6


def test_our_mlx_lm_format_loads_in_mlx_lm(sources, tmp_path):
    """convert --format mlx-lm (26B-like MoE, 4-bit mixed recipe): text only, mlx-lm (and mlx-vlm) load it."""
    out = convert(sources("26b", True), tmp_path / "ours-lm", bits=4, group_size=32, recipe="mixed",
                  dtype="float32", fmt="mlx-lm")
    config = json.loads((out / "config.json").read_text())
    assert "vision_config" not in config and config["quantization"] == config["quantization_config"]
    names = mx.load(str(out / "model.safetensors"))
    assert not any(n.startswith("vision_tower") for n in names)
    assert "language_model.model.layers.0.experts.switch_glu.gate_proj.scales" in names
    ours, _ = load(out)
    for library in ("mlx-lm", "mlx-vlm"):
        assert_same_as_peer(ours, PeerModel(library, out))
    # a Gemma4ForCausalLM source (model_type gemma4_text) is written as the gemma4 checkpoint mlx-lm expects
    out = convert(sources("31b", False, "causal_lm"), tmp_path / "ours-lm-causal", bits=8, dtype="float32",
                  fmt="mlx-lm")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4"
    assert_same_as_peer(load(out)[0], PeerModel("mlx-lm", out))


# Our convert in every MLX mode (affine 4 and 8 bits: above and tests/test_convert.py): (source, format, options).
OUR_MODES = {
    "mxfp4-mixed": (("26b", False), "mlx-lm", dict(mode="mxfp4", recipe="mixed")),
    "nvfp4": (("26b", False), "mlx-lm", dict(mode="nvfp4")),
    "mxfp8": (("31b", False), "mlx-lm", dict(mode="mxfp8")),
    "affine-2bit-g32": (("26b", False), "mlx-lm", dict(bits=2, group_size=32)),
    "affine-3bit-g64": (("31b", False), "mlx-lm", dict(bits=3, group_size=64)),
    "affine-6bit-g32": (("26b", False), "mlx-lm", dict(bits=6, group_size=32)),
    "mxfp4-towers": (("e2b", True), "mlx-vlm", dict(mode="mxfp4")),
}


@pytest.mark.parametrize("name", list(OUR_MODES))
def test_our_convert_in_every_mode_loads_in_the_peers(sources, tmp_path, name):
    """convert(mode=..., bits=...) writes what the peer library loads and runs with our logits; the config's
    global setting is the mode asked for; converting equals quantizing at load time."""
    source, fmt, options = OUR_MODES[name]
    out = convert(sources(*source), tmp_path / name, dtype="float32", fmt=fmt, **options)
    entry = json.loads((out / "config.json").read_text())["quantization"]
    mode = options.get("mode", "affine")
    assert entry["mode"] == mode and entry["bits"] == options.get("bits", entry["bits"])
    ours, _ = load(out)
    modes = {m.mode for _, m in ours.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert mode in modes
    experts = [m for _, m in ours.named_modules() if isinstance(m, QuantizedExperts)]
    assert all(m.quantization["gate_up_proj"].mode == mode for m in experts)
    if options.get("recipe") == "mixed":  # the sensitive tensors at affine 8 bits
        router = ours.language_model.layers[0].router.proj
        assert (router.mode, router.bits) == ("affine", 8)
    assert_same_as_peer(ours, PeerModel(fmt, out))
    bits, group_size = options.get("bits"), options.get("group_size", 64)
    if mode != "affine":
        bits, group_size = entry["bits"], entry["group_size"]
    on_load, _ = load(sources(*source), dtype="float32", quantize=bits, group_size=group_size,
                      recipe=options.get("recipe", "uniform"), quantize_mode=mode)
    ids = mx.array([PROMPT])
    assert mx.array_equal(on_load(ids), ours(ids))


def test_converting_a_conversion_keeps_its_quantization(converted, tmp_path):
    """An mlx-lm conversion (mixed 3/6-bit, the experts' banks quantized differently) written again in the
    mlx-vlm layout: same modules, same quantization, same logits, loadable by mlx-vlm."""
    _, path = converted("mlx-lm-26b-mixed_3_6")
    out = convert(path, tmp_path / "again")
    first, _ = load(path)
    again, _ = load(out)
    banks = {m.quantization["down_proj"] for _, m in again.named_modules() if isinstance(m, QuantizedExperts)}
    assert banks == {BankQuantization(32, 3), BankQuantization(32, 6)}
    per_module = lambda plan: {k: v for k, v in plan.items() if k.startswith("language_model.")}  # noqa: E731
    assert per_module(first.config.quantization) == per_module(again.config.quantization)
    ids = mx.array([PROMPT])
    assert mx.array_equal(first(ids), again(ids))
    assert_same_as_peer(again, PeerModel("mlx-vlm", out))


@pytest.mark.parametrize("name", ["mlx-vlm-26b-4bit-g64", "mlx-lm-e2b-8bit-g64"])
def test_conversion_loads_by_repo_id_through_the_hub(converted, tmp_path, monkeypatch, name):
    """A repo id goes through huggingface_hub (`snapshot_download`, here offline from its cache, laid out as a
    download leaves it: blobs and snapshot symlinks) and loads what the local directory loads, processor
    included; every file the converter wrote that a checkpoint needs is one the download asks for."""
    import fnmatch

    import huggingface_hub.constants as hub

    from mlx_gemma4.loading import HUB_PATTERNS, resolve_path

    _, path = converted(name)
    needed = [f.name for f in path.iterdir() if f.name != "README.md"]
    assert [f for f in needed if not any(fnmatch.fnmatch(f, p) for p in HUB_PATTERNS)] == []
    cache = tmp_path / "hub"
    repo_id = f"mlx-community/{name}"
    snapshot = into_hub_cache(cache, repo_id, path)
    for key, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setattr(hub, key, value)
        monkeypatch.setenv(key, str(value if value is not True else 1))
    model, processor = load(repo_id)
    local, local_processor = load(path)
    ids = mx.array([PROMPT])
    assert mx.array_equal(model(ids), local(ids))
    assert processor.chat_template == local_processor.chat_template
    assert processor.tokenizer.encode("hello world") == local_processor.tokenizer.encode("hello world")
    assert resolve_path(repo_id) == snapshot  # the cache was read, not the directory


# ---- broken conversions: one error that lists the problem ------------------------------------------------

def _copy(converted, name, tmp_path):
    return shutil.copytree(converted(name)[1], tmp_path / name)


def _edit_quantization(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config[key].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_shard(converted, tmp_path):
    path = _copy(converted, "mlx-lm-26b-8bit-g32", tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing weight shards .*model-00002-of-00002.safetensors"):
        load(path)


def test_unknown_quantization_mode(converted, tmp_path):
    path = _copy(converted, "mlx-lm-26b-mxfp4", tmp_path)
    _edit_quantization(path, mode="int3")
    with pytest.raises(CheckpointError, match="unknown quantization mode 'int3'") as e:
        load(path)
    assert str(e.value).count("\n") <= 3  # the setting, not every module that inherits it


def test_mismatched_group_size(converted, tmp_path):
    path = _copy(converted, "mlx-lm-26b-8bit-g32", tmp_path)
    _edit_quantization(path, group_size=64)
    with pytest.raises(CheckpointError) as e:
        load(path)
    message = str(e.value)
    assert "language_model.layers.0.self_attn.q_proj: the config says affine 8-bit, group size 64, its tensors " \
           "are affine 8-bit, group size 32" in message
    assert "language_model.layers.0.experts.gate_up_proj: the config says" in message
    assert "router.proj" not in message  # its own override (64) matches its tensors


def test_quantized_tensors_without_a_quantization_entry(converted, tmp_path):
    path = _copy(converted, "mlx-lm-31b-5bit-g32", tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["quantization"], config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"stores quantized tensors \(.*\.scales and \d+ more\) but its "
                                              "config.json has no `quantization` entry"):
        load(path)


def test_gate_and_up_banks_stored_differently(converted, tmp_path):
    path = _copy(converted, "mlx-lm-26b-8bit-g32", tmp_path)
    weights = mx.load(str(path / "model.safetensors"))
    key = "language_model.model.layers.2.experts.switch_glu.up_proj.weight"
    weights[key] = weights[key][..., :-1]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match="layers.2.experts.switch_glu: gate_proj and up_proj weight must be"):
        load(path)


@pytest.mark.parametrize("tensor,message", [
    ("layers.1.self_attn.q_proj.scales", r"layers.1.self_attn.q_proj: packed uint32 weight \(64, 16\) stored without "
                                         "its scales"),
    ("layers.1.experts.switch_glu.down_proj.scales", r"layers.1.experts.down_proj: packed uint32 weight \(16, 64, 8\) stored "
                                                     "without its scales"),
    ("layers.1.self_attn.q_proj.weight", "layers.1.self_attn.q_proj: scales .* stored with a packed weight that is "
                                         "missing"),
])
def test_a_missing_quantization_tensor(converted, tmp_path, tensor, message):
    path = _copy(converted, "mlx-lm-26b-8bit-g32", tmp_path)
    weights = mx.load(str(path / "model.safetensors"))
    del weights[f"language_model.model.{tensor}"]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_missing_processor_files_fall_back_to_the_published_ones(converted, tmp_path):
    """A conversion without chat template and processor settings: the packaged Gemma 4 ones, with a warning."""
    from mlx_gemma4.processing.chat import BUILTIN_TEMPLATE

    path = _copy(converted, "mlx-vlm-e2b-4bit-g32", tmp_path)
    (path / "chat_template.jinja").unlink()
    (path / "processor_config.json").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="chat_template.jinja, processor_config.json") as record:
        _, processor = load(path)
    assert len(record) == 1
    assert processor.chat_template == BUILTIN_TEMPLATE.read_text()
    assert processor.processor_config["image_processor"]["patch_size"] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(converted("mlx-vlm-e2b-4bit-g32")[1])  # nothing missing: no warning

"""MTP drafters (gemma4_assistant, gemma4_unified_assistant) against transformers' Gemma4AssistantForCausalLM on
tiny checkpoints (tests/checkpoints/family.py), each paired with the tiny target it drafts for: E2B-like (PLE,
KV sharing, centroid-masked LM head), 26B-like (MoE), 31B-like (dense, k=v) and the 12B-like unified model."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

import checkpoints
from checkpoints import family
from mlx_gemma4 import load
from mlx_gemma4.config import ConfigError
from mlx_gemma4.drafter import load_drafter, target_kv

RTOL = 1e-4
TARGETS = list(family.ASSISTANT_TARGETS)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def target_path(text_checkpoint, tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            if kind == "12b":
                made[kind] = family.make_unified_checkpoint(tmp_path_factory.mktemp("target-12b"), wrapper="causal_lm")
            else:
                made[kind] = text_checkpoint(kind)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def drafter_path(tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = family.make_assistant_checkpoint(tmp_path_factory.mktemp(f"drafter-{kind}"), kind)
        return made[kind]

    return get


def load_hf_target(path):
    config = json.loads((path / "config.json").read_text())
    return family.load_hf_unified(path) if config["model_type"].startswith("gemma4_unified") else \
        checkpoints.load_hf(path)


def hf_target_states(target, ids):
    """transformers' target after the prompt: its next token t_P, final-normed hidden state at P - 1 and the
    shared_kv_states {layer type: (keys, values)} that generate() hands to the assistant."""
    with torch.no_grad():
        out = target(torch.tensor(ids), output_hidden_states=True, return_shared_kv_states=True)
    return out.logits[:, -1:].argmax(-1), out.hidden_states[-1][:, -1:], out.shared_kv_states


def hf_draft(target, drafter, ids, steps):
    """transformers' SinglePositionMultiTokenCandidateGenerator, first round after the prefill: `steps` drafter
    calls at position P, from t_P and the target's hidden state, then each call's argmax and hidden state."""
    token, hidden, shared_kv = hf_target_states(target, ids)
    position, logits = torch.tensor([[ids.shape[1]]]), []
    with torch.no_grad():
        for _ in range(steps):
            embeds = torch.cat([target.get_input_embeddings()(token), hidden], dim=-1)
            step = drafter(inputs_embeds=embeds, position_ids=position, shared_kv_states=shared_kv)
            logits.append(step.logits.numpy())
            token, hidden = step.logits.argmax(-1), step.last_hidden_state
    return logits


def our_draft(target, drafter, token, hidden, kv, position, steps):
    logits = []
    for _ in range(steps):
        embeds = mx.concatenate([target.language_model.embed(token), hidden], axis=-1)
        step_logits, hidden = drafter(embeds, kv, position)
        logits.append(np.array(step_logits))
        token = mx.argmax(step_logits, axis=-1)
    return logits


@pytest.mark.parametrize("kind", TARGETS)
def test_drafter_logits_equal_transformers_given_the_targets_states(target_path, drafter_path, kind):
    """The same target states (transformers' hidden state and shared KV) into both drafters, three draft steps."""
    target, _ = load(target_path(kind), dtype="float32")
    drafter = load_drafter(drafter_path(kind), target)
    hf_target, hf_drafter = load_hf_target(target_path(kind)), family.load_hf_assistant(drafter_path(kind))
    ids = np.random.RandomState(0).randint(3, 480, (1, 29))  # longer than every window: sliding keys are cut
    theirs = hf_draft(hf_target, hf_drafter, ids, 3)
    token, hidden, shared_kv = hf_target_states(hf_target, ids)
    kv = {kind: (mx.array(k.numpy()), mx.array(v.numpy())) for kind, (k, v) in shared_kv.items()}
    ours = our_draft(target, drafter, mx.array(token.numpy()), mx.array(hidden.numpy()), kv, ids.shape[1], 3)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (1, 1, checkpoints.VOCAB)
        assert rel_err(a, b) < RTOL
        assert a.argmax() == b.argmax()


def test_centroid_head_masks_all_but_the_top_clusters(target_path, drafter_path):
    target, _ = load(target_path("e2b"), dtype="float32")
    drafter = load_drafter(drafter_path("e2b"), target)
    head = drafter.masked_embedding
    h = mx.random.normal((1, 2, drafter.config.text.hidden_size), key=mx.random.key(0))
    logits = np.array(drafter.logits(h))
    per_cluster = checkpoints.VOCAB // drafter.config.num_centroids
    for row in range(2):
        top = np.argsort(-np.array(head.centroids(h))[0, row])[: head.top_k]
        kept = np.array(head.token_ordering).reshape(-1, per_cluster)[top].reshape(-1)
        full = np.array(drafter.model.embed_tokens.as_linear(h))[0, row]
        np.testing.assert_allclose(logits[0, row, kept], full[kept], rtol=1e-5, atol=1e-6)
        rest = np.setdiff1d(np.arange(checkpoints.VOCAB), kept)
        assert len(rest) == checkpoints.VOCAB - head.top_k * per_cluster
        assert (logits[0, row, rest] == logits[0, :, :].min()).all()  # one fill value: the call's minimum - 1
        assert logits[0, row, rest][0] < logits[0, row, kept].min()


# ---- bad input ---------------------------------------------------------------------------------------------

def test_a_drafter_for_another_target_is_a_clear_error(target_path, drafter_path, tmp_path):
    e2b_target = load(target_path("e2b"))[0]
    with pytest.raises(ConfigError, match="KV heads"):
        load_drafter(drafter_path("31b"), e2b_target)  # same widths, other attention geometry
    with pytest.raises(ConfigError, match="gemma4_unified_assistant drafter drafts for gemma4_unified"):
        load_drafter(drafter_path("12b"), load(target_path("31b"))[0])
    narrow = family.make_assistant_checkpoint(tmp_path / "narrow", "e2b", backbone_hidden_size=48)
    with pytest.raises(ConfigError, match="backbone_hidden_size.*hidden size is 64"):
        load_drafter(narrow, e2b_target)
    small_vocab = family.make_assistant_checkpoint(tmp_path / "vocab", "e2b", text_overrides={"vocab_size": 256})
    with pytest.raises(ConfigError, match=r"drafter vocabulary \(256\) != target vocabulary \(512\)"):
        load_drafter(small_vocab, e2b_target)
    with pytest.raises(ConfigError, match="MTP drafter"):
        load(drafter_path("e2b"))
    with pytest.raises(ConfigError, match="not an MTP drafter"):
        load_drafter(target_path("e2b"))


def test_a_drafter_without_its_targets_layer_types_is_a_clear_error(tmp_path, drafter_path):
    all_full = checkpoints.make_text_checkpoint(tmp_path / "target", "31b",
                                                extra={"layer_types": ["full_attention"] * 6})
    with pytest.raises(ConfigError, match="attends over the target's sliding_attention keys, but the target has no "
                                          "sliding_attention layers"):
        load_drafter(drafter_path("31b"), load(all_full)[0])


def test_a_broken_drafter_checkpoint_is_a_clear_error(drafter_path, tmp_path):
    from mlx_gemma4.loading import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(drafter_path("e2b"), bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["num_kv_shared_layers"] = 2
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_kv_shared_layers must equal num_hidden_layers"):
        load_drafter(bad)
    config["text_config"]["num_kv_shared_layers"] = 4
    config["num_centroids"] = 7
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_centroids dividing vocab_size"):
        load_drafter(bad)
    config["num_centroids"] = 16
    (bad / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(bad / "model.safetensors"))
    weights["masked_embedding.token_ordering"] = np.zeros_like(weights["masked_embedding.token_ordering"])
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a permutation"):
        load_drafter(bad)


# ---- synthetic checkpoints at the published dimensions (mlx_gemma4.synth) -----------------------------------

@pytest.mark.parametrize("variant", ["e2b", "e4b", "26b-a4b", "31b", "12b"])
def test_synth_drafter_tensors_are_transformers_own(variant):
    """Every tensor synth writes for a published drafter (and no other) is in transformers' model of it (built on
    the meta device: nothing allocated), and the drafter pairs with its target's preset."""
    from transformers import (Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantConfig,
                              Gemma4UnifiedAssistantForCausalLM)

    from mlx_gemma4 import memory, synth
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.drafter import Drafter, DrafterConfig, check_pair

    preset = memory.load_preset(f"{variant}-assistant")
    unified = preset["model_type"] == "gemma4_unified_assistant"
    config_class = Gemma4UnifiedAssistantConfig if unified else Gemma4AssistantConfig
    model_class = Gemma4UnifiedAssistantForCausalLM if unified else Gemma4AssistantForCausalLM
    fields = {k: v for k, v in preset.items() if k not in ("architectures", "model_type", "dtype")}
    with torch.device("meta"):
        model = model_class(config_class(**fields))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert dict(synth.drafter_param_specs(preset)) == theirs
    target = ModelConfig.from_dict(memory.load_preset(variant))
    check_pair(Drafter(DrafterConfig.from_dict(preset)), type("Target", (), {"config": target,
                                                                           "text_config": target.text})())


def test_synth_12b_tensors_are_transformers_own(tmp_path):
    """The 12B preset's decoder tensors are transformers' Gemma4UnifiedTextModel's; a tiny 12B-like config with its
    front ends, written in the Hugging Face layout, loads in transformers with nothing missing or unexpected."""
    from transformers import Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedTextConfig
    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedTextModel

    from mlx_gemma4 import memory, synth

    text = memory.load_preset("12b")["text_config"]
    with torch.device("meta"):
        decoder = Gemma4UnifiedTextModel(Gemma4UnifiedTextConfig(**{k: v for k, v in text.items() if k != "dtype"}))
    assert dict(memory.text_param_specs(text)) == {"language_model." + k: tuple(v.shape)
                                                  for k, v in decoder.state_dict().items()}
    config = family.make_unified_model().config.to_dict()
    out = synth.write_checkpoint(config, tmp_path / "hf", fmt="hf", towers=True)
    _, info = Gemma4UnifiedForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model = load(out)[0]  # and in ours
    assert "vision_embedder" in model and "embed_audio" in model


def test_synth_drafter_checkpoint_loads_and_drafts(tmp_path, target_path, capsys):
    from mlx_gemma4 import synth

    config = family.make_assistant_model("e2b").config.to_dict()
    out = synth.write_checkpoint(config, tmp_path / "drafter", seed=3)
    target = load(target_path("e2b"))[0]
    drafter = load_drafter(out, target)
    order = np.array(drafter.masked_embedding.token_ordering)
    assert sorted(order.tolist()) == list(range(checkpoints.VOCAB))  # a permutation, as the loader checks
    cache = target.make_cache()
    hidden = target.language_model(mx.array([[2, 9, 11, 13]]), cache)[:, -1:]
    logits, hidden = drafter(mx.concatenate([target.language_model.embed(mx.array([[5]])), hidden], axis=-1),
                             target_kv(target, cache), 4)
    assert logits.shape == (1, 1, checkpoints.VOCAB) and hidden.shape == (1, 1, 64)
    assert np.isfinite(np.array(logits)).all()
    from mlx_gemma4 import cli

    assert cli.synth_main(["--variant", "e2b-assistant", "--out", str(tmp_path / "x"), "--layers", "2"]) == 1
    assert "error: --layers does not apply to drafters" in capsys.readouterr().err

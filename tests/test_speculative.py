"""Speculative decoding with the MTP drafters (mlx_gemma4.speculative): greedy output token for token equal to
decoding without a drafter (E2B-like with KV-shared layers, 26B-like MoE, 31B-like, the 12B-like unified model;
windows of 8-16 tokens, so rollbacks cross the sliding caches' wrap and compactions), the acceptance rule's output
distribution equal to the target's (chi-square), drafts read from our caches equal to transformers', bad input.

Random drafters agree with nothing, so most tests use the real drafter wrapped in a test drafter that knows the
answer (checkpoints.family.ScriptedDrafter / OracleDrafter) to get a mix of accepted and rejected proposals."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoints
from checkpoints import family
from mlx_gemma4 import load, load_drafter
from mlx_gemma4.config import ConfigError
from mlx_gemma4.engine import generate_step, prefill
from mlx_gemma4.generate import generate, stream_generate
from mlx_gemma4.prompt_cache import PromptCache
from mlx_gemma4.sample import Sampler, make_sampler
from mlx_gemma4.speculative import DraftStats, accept, draft, speculative_generate_step

import mlx.core as mx

N = 64
PROMPT = [int(i) for i in np.random.RandomState(0).randint(3, 480, 20)]


@pytest.fixture(scope="module")
def paths(text_checkpoint, tmp_path_factory):
    """paths(kind) -> (target checkpoint, drafter checkpoint), made once per module."""
    made = {}

    def get(kind):
        if kind not in made:
            target = (family.make_unified_checkpoint(tmp_path_factory.mktemp("target-12b"), wrapper="causal_lm")
                      if kind == "12b" else text_checkpoint(kind))
            made[kind] = target, family.make_assistant_checkpoint(tmp_path_factory.mktemp(f"drafter-{kind}"), kind)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def pair(paths, text_model):
    """pair(kind) -> (float32 target, its tiny drafter)."""
    made = {}

    def get(kind):
        if kind not in made:
            target = load(paths(kind)[0], dtype="float32")[0] if kind == "12b" else text_model(kind)
            made[kind] = (target, load_drafter(paths(kind)[1], target))
        return made[kind]

    return get


@pytest.fixture(scope="module")
def plain(pair):
    """plain(kind) -> the target's greedy tokens after PROMPT without a drafter (N of them)."""
    made = {}

    def get(kind):
        if kind not in made:
            target = pair(kind)[0]
            made[kind] = list(generate_step(target, PROMPT, PromptCache.fresh(target), make_sampler(), max_tokens=N))
        return made[kind]

    return get


def speculative(target, drafter, k, ids=PROMPT, cache=None, **kwargs):
    cache = cache or PromptCache.fresh(target)
    before, stats = len(cache.tokens), DraftStats()
    tokens = list(speculative_generate_step(target, drafter, ids, cache, kwargs.pop("sampler", make_sampler()),
                                            num_draft_tokens=k, max_tokens=kwargs.pop("max_tokens", N),
                                            stats=stats, **kwargs))
    assert cache.offset == len(cache.tokens) == before + len(ids) + len(tokens) - 1  # the last one is not fed
    return tokens, stats


@pytest.mark.parametrize("kind, ks", [("e2b", (1, 6)), ("26b", (2, 5)), ("31b", (4,)), ("12b", (3,))])
def test_greedy_equals_decoding_without_a_drafter(pair, plain, kind, ks):
    """64 tokens, token for token, with proposals accepted up to a random miss (rollbacks of every length)."""
    target, drafter = pair(kind)
    for k in ks:
        scripted = family.ScriptedDrafter(drafter, PROMPT + plain(kind), miss=0.25, seed=k)
        tokens, stats = speculative(target, scripted, k)
        assert tokens == plain(kind), k
        assert 0.3 < stats.acceptance_rate < 0.95 and stats.proposed >= 2 * k  # both outcomes, many rounds
        assert stats.tokens_per_step == pytest.approx((stats.accepted + stats.target_steps) / stats.target_steps)


def test_greedy_with_the_real_drafter_rejecting_everything(pair, plain):
    """A random drafter: nearly every proposal is rolled back (k of them each round), output unchanged."""
    target, drafter = pair("26b")
    tokens, stats = speculative(target, drafter, 7, max_tokens=N // 2)
    assert tokens == plain("26b")[: N // 2]
    assert stats.acceptance_rate < 0.1 and stats.target_steps >= N // 4


def test_prompt_cache_and_repetition_penalty(pair):
    """After a prompt cache, with a logits processor that sees each verified position's own history."""
    target, drafter = pair("e2b")
    cache = PromptCache.fresh(target)
    prefill(target, PROMPT[:12], cache)
    kwargs = dict(max_tokens=40, logits_processors=[_penalty()])
    expected = list(generate_step(target, PROMPT[12:], cache, make_sampler(), **kwargs))
    cache = PromptCache.fresh(target)
    prefill(target, PROMPT[:12], cache)
    scripted = family.ScriptedDrafter(drafter, PROMPT + expected, miss=0.3)
    tokens, stats = speculative(target, scripted, 4, ids=PROMPT[12:], cache=cache, **kwargs)
    assert tokens == expected and stats.accepted > 0


def _penalty():
    from mlx_gemma4.sample import repetition_penalty_processor

    return repetition_penalty_processor(1.5, 16)


def test_the_context_limit_bounds_the_drafts(pair, plain):
    """max_tokens smaller than a round: never more tokens than asked, each round's drafts cut to fit."""
    target, drafter = pair("31b")
    scripted = family.ScriptedDrafter(drafter, PROMPT + plain("31b"), miss=0.0)
    for max_tokens in (1, 2, 5):
        tokens, stats = speculative(target, scripted, 6, max_tokens=max_tokens)
        assert tokens == plain("31b")[:max_tokens]
        # one token from the prompt's forward, then one round: k - 1 proposals and the target's own token
        assert stats.target_steps == min(1, max_tokens - 1) and stats.proposed == max(0, max_tokens - 2)
        assert stats.accepted == stats.proposed


def test_drafts_from_our_caches_equal_transformers(pair, paths):
    """The drafter reading OUR target's caches (sliding ones wrapped: the prompt is longer than every window)
    proposes transformers' tokens (SinglePositionMultiTokenCandidateGenerator's first round)."""
    from test_drafter import hf_draft, load_hf_target

    ids = np.array([PROMPT + PROMPT[:9]])
    for kind in ("e2b", "26b"):
        target, drafter = pair(kind)
        theirs = hf_draft(load_hf_target(paths(kind)[0]), family.load_hf_assistant(paths(kind)[1]), ids, 4)
        cache = PromptCache.fresh(target)
        logits, hidden = prefill(target, ids[0].tolist(), cache, return_hidden=True)
        drafts, _ = draft(target, drafter, cache, mx.argmax(logits, axis=-1), hidden, 4,
                          lambda logits, seen: (logits, mx.argmax(logits, axis=-1)))
        assert [int(d.item()) for d in drafts] == [int(np.argmax(x)) for x in theirs], kind


def test_greedy_equals_transformers_assisted_generate(pair, paths):
    """transformers' generate(assistant_model=...) with the same drafter (its MTP candidate generator, 4 tokens a
    round) on the E2B-like pair (KV-shared target layers, centroid head): the same 24 tokens as ours."""
    import torch
    from test_drafter import load_hf_target

    target, drafter = pair("e2b")
    hf_drafter = family.load_hf_assistant(paths("e2b")[1])
    hf_drafter.generation_config.num_assistant_tokens = 4
    hf_drafter.generation_config.num_assistant_tokens_schedule = "constant"
    out = load_hf_target(paths("e2b")[0]).generate(torch.tensor([PROMPT]), assistant_model=hf_drafter,
                                                   max_new_tokens=24, do_sample=False)
    assert speculative(target, drafter, 4, max_tokens=24)[0] == out[0, len(PROMPT):].tolist()


# ---- sampling ----------------------------------------------------------------------------------------------

def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square test of counts against probabilities: the p-value (0 for a count where the
    probability is 0)."""
    import torch

    keep = probs > 0
    if counts[~keep].sum():
        return 0.0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    statistic = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def bigram_speculation(T: np.ndarray, Q: np.ndarray, k: int, rows: int, n_out: int, sampler, rule=accept):
    """Speculative sampling of a bigram chain: target next-token logits T[prev], drafter logits Q[prev]; `rows`
    independent sequences from token 0, k drafts per round, decided by `rule`. The first n_out tokens of each."""
    T_, Q_ = mx.array(T, dtype=mx.float32), mx.array(Q, dtype=mx.float32)
    emitted = [[] for _ in range(rows)]
    last = mx.zeros((rows,), mx.int32)
    while min(len(e) for e in emitted) < n_out:
        drafts, prev = [], last
        for _ in range(k):
            prev = sampler(Q_[prev])
            drafts.append(prev)
        drafts = mx.stack(drafts, axis=1)  # (rows, k)
        context = mx.concatenate([last[:, None], drafts], axis=1)  # the tokens whose next token is verified
        accepted, last = rule(T_[context], drafts, Q_[context[:, :k]], sampler)
        for row, a, d, t in zip(emitted, np.array(accepted), np.array(drafts), np.array(last)):
            row += [*d[:a], t]
    return np.array([row[:n_out] for row in emitted])


def bigram_probs(T: np.ndarray, sampler: Sampler, n_out: int) -> np.ndarray:
    """Exact probability of each sequence of n_out tokens from token 0 (the target's chain, sampler's filters)."""
    P = np.array(mx.softmax(sampler.filtered_logits(mx.array(T)), axis=-1), np.float64)
    V = len(T)
    probs = P[0]
    for _ in range(n_out - 1):
        probs = (probs.reshape(-1, 1) * P[np.arange(probs.size) % V]).reshape(-1)
    return probs


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)])
def test_speculative_sampling_keeps_the_targets_distribution(settings):
    """Chi-square over 3-token sequences of a 6-token bigram chain: speculative sampling (k=2) is distributed as
    the target; accepting every draft (a wrong rule, the same test) is detected."""
    rng = np.random.RandomState(1)
    V = 6
    T, Q = rng.randn(V, V) * 1.5, rng.randn(V, V) * 1.5
    sampler = make_sampler(seed=7, **settings)
    probs = bigram_probs(T, sampler, 3)
    index = np.array([36, 6, 1])

    def counts(out):
        return np.bincount(out @ index, minlength=V**3)

    good = bigram_speculation(T, Q, 2, 20000, 3, sampler)
    assert chi_square_p(counts(good), probs) > 1e-3

    def accept_all(target_logits, drafts, draft_logits, sampler):
        return mx.full((drafts.shape[0],), drafts.shape[1], mx.int32), sampler(target_logits[:, -1])

    bad = bigram_speculation(T, Q, 2, 20000, 3, sampler, rule=accept_all)
    assert chi_square_p(counts(bad), probs) < 1e-6


def test_speculative_sampling_end_to_end(pair):
    """The tiny target through the whole loop: a drafter close to the target (its logits plus noise) has most
    proposals accepted and some rejected; the first three tokens follow the target's exact joint distribution
    (top-k 2: 8 sequences, chi-square); a seed makes a run reproducible."""
    target, drafter = pair("31b")
    ids = PROMPT[:5]
    settings = dict(temperature=0.05, top_k=2)
    reference = make_sampler(**settings)

    def next_probs(context):
        logits = target(mx.array(context, dtype=mx.int32)[None])[:, -1]
        p = np.array(mx.softmax(reference.filtered_logits(logits), axis=-1)[0], np.float64)
        return p

    first = next_probs(ids)
    top = np.flatnonzero(first)
    exact = {}
    for a in top:
        second = next_probs(ids + [int(a)])
        for b in np.flatnonzero(second):
            third = next_probs(ids + [int(a), int(b)])
            for c in np.flatnonzero(third):
                exact[(int(a), int(b), int(c))] = first[a] * second[b] * third[c]
    stats, seen = DraftStats(), {}
    runs = 120
    for seed in range(runs):
        cache = PromptCache.fresh(target)
        oracle = family.OracleDrafter(drafter, target, cache.tokens, noise=0.3, seed=seed)
        tokens = tuple(speculative_generate_step(target, oracle, ids, cache, make_sampler(seed=seed, **settings),
                                                 num_draft_tokens=2, max_tokens=3, stats=stats))
        seen[tokens] = seen.get(tokens, 0) + 1
    assert set(seen) <= set(exact)
    cells = sorted(exact)
    assert chi_square_p(np.array([seen.get(c, 0) for c in cells]), np.array([exact[c] for c in cells])) > 1e-3
    assert 0.2 < stats.acceptance_rate < 0.95
    again = [list(speculative_generate_step(target, drafter, ids, PromptCache.fresh(target),
                                            make_sampler(seed=3, temperature=1.0), max_tokens=12)) for _ in range(2)]
    assert again[0] == again[1]


# ---- through the text API, the CLI, bad input ----------------------------------------------------------------

def test_stream_generate_with_a_draft_model(chat_checkpoint, tmp_path):
    """generate(draft_model=...) = generate(); stats.draft counts; a reply cut by a stop token leaves exactly the
    tokens it was given in the prompt cache (as without a drafter), so the next turn continues from it."""
    path = chat_checkpoint("26b")
    target, processor = load(path, dtype="float32")
    drafter = load_drafter(family.make_assistant_checkpoint(tmp_path / "d", "26b"), target)
    expected = generate(target, processor, "hello world", max_tokens=24)
    chunks = list(stream_generate(target, processor, "hello world", max_tokens=24, draft_model=drafter,
                                  num_draft_tokens=3))
    assert "".join(c.text for c in chunks) == expected
    stats = chunks[-1].stats
    assert stats.draft.target_steps > 0 and stats.draft.proposed > 0 and "tokens/target step" in stats.summary()

    ids = processor.prompt_inputs("hello world")[0]
    tokens = list(generate_step(target, ids, PromptCache.fresh(target), make_sampler(), max_tokens=24))
    # all proposals accepted, k = 6: rounds yield tokens 1-7, 8-14, ...; stop on an accepted proposal of a round
    stop_at = next(i for i in range(8, 14) if tokens[i] not in tokens[:i])
    for draft_model in (None, family.ScriptedDrafter(drafter, ids + tokens, miss=0.0)):
        cache = PromptCache.fresh(target)
        list(stream_generate(target, processor, ids, max_tokens=24, stop_token_ids=[tokens[stop_at]],
                             prompt_cache=cache, draft_model=draft_model, num_draft_tokens=6))
        assert cache.tokens == ids + tokens[: stop_at + 1] and cache.offset == len(cache.tokens)


def test_image_and_audio_prompt_with_a_draft_model(unified_chat_checkpoint, paths):
    """The 12B-like model with an image and an audio clip in the prompt (its soft tokens in the caches the drafter
    reads): the reply equals the one without a drafter."""
    from test_unified import picture, tone

    target, processor = load(unified_chat_checkpoint, dtype="float32")
    drafter = load_drafter(paths("12b")[1], target)
    media = dict(images=[picture(80, 120, 9)], audio=[tone(0.3, 10)], max_soft_tokens=70)
    ids, _ = processor.prompt_inputs("what do you see and hear?", images=media["images"], audio=media["audio"],
                                     max_soft_tokens=70)
    expected = list(stream_generate(target, processor, "what do you see and hear?", max_tokens=24,
                                    stop_token_ids=[], **media))
    tokens = [c.token for c in expected if c.token is not None]
    scripted = family.ScriptedDrafter(drafter, ids + tokens, miss=0.3)
    chunks = list(stream_generate(target, processor, "what do you see and hear?", max_tokens=24, stop_token_ids=[],
                                  draft_model=scripted, num_draft_tokens=3, **media))
    assert [c.token for c in chunks if c.token is not None] == tokens
    assert 0 < chunks[-1].stats.draft.acceptance_rate < 1


def test_cli_draft_model(chat_checkpoint, tmp_path, capsys):
    from mlx_gemma4 import cli

    path = chat_checkpoint("26b")
    drafter = family.make_assistant_checkpoint(tmp_path / "d", "26b")
    assert cli.main(["--model", str(path), "--prompt", "hi", "--max-tokens", "8", "--draft-model", str(drafter),
                     "--num-draft-tokens", "3"]) == 0
    assert "drafts: " in capsys.readouterr().err
    assert cli.main(["--model", str(path), "--prompt", "hi", "--draft-model", str(path)]) == 1
    assert "not an MTP drafter" in capsys.readouterr().err


def test_bad_input(pair):
    target, drafter = pair("e2b")
    for k in (0, -1, 17, 2.5, True):
        with pytest.raises(ValueError, match="num_draft_tokens must be an integer from 1 to 16"):
            speculative(target, drafter, k)
    with pytest.raises(ValueError, match="needs the sampling distribution"):
        speculative(target, drafter, 2, sampler=lambda logits: mx.argmax(logits, axis=-1))
    with pytest.raises(ConfigError, match="gemma4_unified_assistant drafter drafts for gemma4_unified"):
        speculative(target, pair("12b")[1], 2)
    with pytest.raises(ConfigError, match="KV heads"):
        speculative(target, pair("31b")[1], 2)


def test_readme_drafter_example_runs_as_written(chat_checkpoint, paths, monkeypatch, capsys):
    """The README Python block's drafter paragraph, with the Hub ids pointed at the tiny E2B-like pair."""
    import re
    from pathlib import Path

    import mlx_gemma4

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "load_drafter" in b)
    paragraph = next(p for p in block.split("\n\n") if "load_drafter" in p)
    real_load_drafter = mlx_gemma4.load_drafter
    monkeypatch.setattr(mlx_gemma4, "load_drafter", lambda repo, target, **kw: real_load_drafter(paths("e2b")[1],
                                                                                                  target, **kw))
    model, processor = load(chat_checkpoint("e2b"))
    exec(compile(paragraph, "README.md", "exec"), {"model": model, "processor": processor, "generate": generate})
    assert capsys.readouterr().out.strip() == generate(model, processor, "Hi!", max_tokens=100)


def test_app_draft_model(chat_checkpoint, paths):
    """apps/gemma4_app.py --draft-model: replies to the model the drafter pairs with are speculative (the same
    reply); another model gets no drafter."""
    pytest.importorskip("gradio", reason="the app needs gradio (pip install '.[app]')")
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gemma4_app",
                                                  Path(__file__).resolve().parent.parent / "apps" / "gemma4_app.py")
    app = importlib.util.module_from_spec(spec)
    sys.modules["gemma4_app"] = app  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(app)
    host = app.ModelHost(draft_model=str(paths("26b")[1]))
    assert "speculative decoding" in host.load(str(chat_checkpoint("26b"))) and host.drafter is not None
    conv, turn = app.Conversation(), app.Turn("hello world, tell me a story")
    conv.turns.append(turn)
    list(app.respond(host, conv, turn, app.Settings(max_tokens=12)))
    assert turn.error is None and turn.raw_reply == generate(host.model, host.processor, turn.text, max_tokens=12)
    assert "drafts:" in turn.stats
    host.load(str(chat_checkpoint("e2b")))
    assert host.drafter is None and "speculative" not in host.describe()

"""Property-based fuzzing of everything a user or a file can hand mlx_gemma4 (run by tests/test_fuzz.py, one
target per subprocess under an address-space limit; also runnable by hand:
`python tests/fuzz_inputs.py <target> [...]`, with MLX_GEMMA4_FUZZ=long for the long profile).

The property, for random mutations of valid inputs: the call works, or raises one of the documented error types
(mlx_gemma4.errors: ConfigError, CheckpointError, MediaError, PromptCacheError; ValueError / TypeError /
FileNotFoundError for bad arguments) with a message of its own; never another exception (KeyError,
ZeroDivisionError, OverflowError, JSONDecodeError, an MLX or numpy internal error, ...), within the per-example
deadline and the process's memory limit.

Targets: config (config.json dicts), checkpoint (a tiny checkpoint whose config.json is mutated, loaded),
safetensors (its safetensors header mutated, loaded), gguf (a tiny GGUF's header bytes mutated, loaded),
prompt_cache (a saved prompt cache's metadata and arrays mutated, loaded), messages (chat messages with random
roles, content parts and media through the processor), sampling (sampling arguments, sampled).
Fixture files come from the parent test through environment variables (FUZZ_CHECKPOINT, FUZZ_GGUF,
FUZZ_PROMPT_CACHE, FUZZ_MM_TOKENIZER).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import resource
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

import mlx_gemma4  # noqa: E402,F401
from mlx_gemma4 import errors  # noqa: E402

# -- the property ---------------------------------------------------------------------------------------------
DOCUMENTED = (errors.ConfigError, errors.CheckpointError, errors.MediaError, errors.PromptCacheError, ValueError,
              TypeError, FileNotFoundError)


def documented_or_works(call, *args, **kwargs):
    """Run call; a documented error with a message of its own is fine, anything else fails the property."""
    try:
        return call(*args, **kwargs)
    except DOCUMENTED as e:
        allowed = type(e) in DOCUMENTED or isinstance(e, errors.InputError)
        message = str(e)
        if not allowed:  # e.g. json.JSONDecodeError or UnicodeDecodeError (ValueError subclasses, no file named)
            raise AssertionError(f"undocumented error type {type(e).__module__}.{type(e).__name__}: {message}") from e
        if not message.strip() or PYTHON_INTERNAL.match(message):
            raise AssertionError(f"{type(e).__name__} without a message of its own: {message!r}") from e
        return None


# Messages Python, numpy and MLX write for errors deep inside them: a bug of ours when they reach the caller.
PYTHON_INTERNAL = re.compile(
    r"^(\[\w+\]|can only concatenate|unsupported operand|'\w+' object|unhashable type|object of type|"
    r".* takes \d+ positional|.* got an unexpected keyword|invalid literal for int|could not convert string|"
    r"list index out of range|string indices must be|expected str, bytes or os\.PathLike|operands could not be|"
    r"cannot reshape|'<' not supported|Expecting value|Extra data|Unterminated string|embedded null)")


PROFILE = os.environ.get("MLX_GEMMA4_FUZZ", "ci")
settings.register_profile("ci", max_examples=int(os.environ.get("MLX_GEMMA4_FUZZ_EXAMPLES", 25)), deadline=10000,
                          derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=10000, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(PROFILE)

# -- random JSON and mutations ----------------------------------------------------------------------------------
NUMBERS = st.one_of(st.integers(-3, 3), st.sampled_from([2**31, 2**32 + 1, 2**63, 10**12, -(10**9), 10**100]),
                    st.floats(allow_nan=True, allow_infinity=True), st.integers())
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def paths_of(node, prefix=()):
    """Every key path into a JSON value (dict keys and list indices), the root included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:8]):
            yield from paths_of(v, (*prefix, i))


@st.composite
def mutated(draw, base, max_mutations: int = 3):
    """base with 1..max_mutations random edits: replace a value (random JSON, or a number near the old one),
    delete a key, or add a key."""
    value = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        path = draw(st.sampled_from(list(paths_of(value))))
        if not path:
            if draw(st.integers(0, 9)) == 0:
                value = draw(JSON)
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        action = draw(st.sampled_from(["replace", "near", "delete", "add"]))
        if action == "near" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = draw(st.sampled_from([old + draw(st.integers(-2, 2)), -old, old * 1000, 0,
                                                old * draw(st.floats(0, 4, allow_nan=False))]))
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(JSON)
        else:
            parent[key] = draw(JSON)
    return value


def write_new(path: Path, data: bytes) -> None:
    """Replace path's content through a new file (a new inode): arrays still memory-mapped from the previous
    example keep reading the old bytes instead of changing (or faulting) under them."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fixture(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set (tests/test_fuzz.py sets it)")
    return Path(value)


# -- targets --------------------------------------------------------------------------------------------------
def fuzz_config():
    from mlx_gemma4 import memory
    from mlx_gemma4.audio import AudioConfig
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.vision import VisionConfig

    bases = [memory.load_preset(v) for v in ("e2b", "26b-a4b", "31b")]

    def parse(config):
        parsed = ModelConfig.from_dict(config)
        if parsed.vision is not None:
            VisionConfig.from_dict(parsed.vision)
        if parsed.audio is not None:
            AudioConfig.from_dict(parsed.audio)

    @given(st.sampled_from(range(len(bases))).flatmap(lambda i: mutated(bases[i], 4)))
    def check(config):
        documented_or_works(parse, config)

    check()


def fuzz_checkpoint():
    """A tiny checkpoint whose config.json is mutated: load() works or says what is wrong, before building
    anything huge."""
    from mlx_gemma4.loading import load

    source = _fixture("FUZZ_CHECKPOINT")
    base = json.loads((source / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="fuzz-checkpoint-"))
    for f in source.iterdir():
        if f.name != "config.json":
            (work / f.name).symlink_to(f)

    @given(mutated(base, 3))
    def check(config):
        write_new(work / "config.json", json.dumps(config).encode())
        documented_or_works(load, work, lazy=True)

    check()


def _safetensors_parts(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def fuzz_safetensors():
    """The tiny checkpoint's safetensors header mutated (shapes, dtypes, offsets, the header's own type, its
    length field), then loaded."""
    from mlx_gemma4.loading import load

    source = _fixture("FUZZ_CHECKPOINT")
    header, data = _safetensors_parts(source / "model.safetensors")
    work = Path(tempfile.mkdtemp(prefix="fuzz-safetensors-"))
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (work / f.name).symlink_to(f)

    @given(mutated(header, 3), st.integers(-16, 16), st.booleans())
    def check(new_header, length_delta, keep_length):
        blob = json.dumps(new_header).encode()
        length = len(blob) if keep_length else max(0, len(blob) + length_delta)
        write_new(work / "model.safetensors", struct.pack("<Q", length) + blob + data)
        documented_or_works(load, work, lazy=True)

    check()


def fuzz_gguf():
    """A tiny GGUF with random bytes of its header (counts, types, lengths, metadata values, tensor table,
    alignment) overwritten, then loaded."""
    from mlx_gemma4.loading import load

    source = _fixture("FUZZ_GGUF")
    raw = bytearray(source.read_bytes())
    from mlx_gemma4.gguf import open_gguf

    gf = open_gguf(source)
    header_end = min(t.offset for t in gf.tensors.values())
    del gf
    work = Path(tempfile.mkdtemp(prefix="fuzz-gguf-")) / "model.gguf"
    edits = st.lists(st.tuples(st.integers(4, header_end - 1),
                               st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x01", b"\x00" * 8, b"\xff" * 8,
                                                b"\x09\x00\x00\x00", b"\x0c\x00\x00\x00"])
                               | st.binary(min_size=1, max_size=8)),
                     min_size=1, max_size=4)

    @given(edits)
    def check(changes):
        data = bytearray(raw)
        for pos, blob in changes:
            data[pos:pos + len(blob)] = blob
        write_new(work, bytes(data[:len(raw)]))
        documented_or_works(load, work, lazy=True)

    check()


def fuzz_prompt_cache():
    """A saved prompt cache with its metadata values mutated and arrays dropped / reshaped / retyped."""
    from mlx_gemma4.loading import load
    from mlx_gemma4.prompt_cache import load_prompt_cache

    source = _fixture("FUZZ_PROMPT_CACHE")
    model, _ = load(_fixture("FUZZ_CHECKPOINT"))
    arrays, meta = mx.load(str(source), return_metadata=True)
    raw_keys = ("format", "model_fingerprint", "tokenizer_fingerprint")  # plain strings, not JSON
    decoded = {k: v if k in raw_keys else json.loads(v) for k, v in meta.items()}
    work = Path(tempfile.mkdtemp(prefix="fuzz-cache-")) / "cache.safetensors"
    names = sorted(arrays)

    array_edit = st.tuples(st.sampled_from(names), st.sampled_from(["drop", "shape", "dtype", "nan", "rename"]))

    @given(mutated(decoded, 3), st.lists(array_edit, max_size=2))
    def check(new_meta, array_changes):
        out = dict(arrays)
        for name, action in array_changes:
            if name not in out:
                continue
            a = out.pop(name)
            if action == "shape":
                out[name] = a.reshape(-1)[: max(1, a.size // 2)]
            elif action == "dtype":
                out[name] = a.astype(mx.int32)
            elif action == "nan":
                out[name] = mx.full(a.shape, math.nan, dtype=a.dtype)
            elif action == "rename":
                out[name + ".x"] = a
        if not isinstance(new_meta, dict):
            new_meta = {"format": str(new_meta)}
        meta_out = {str(k): v if isinstance(v, str) and k in raw_keys else json.dumps(v)
                    for k, v in new_meta.items()}
        tmp = work.with_name("new.safetensors")
        mx.save_safetensors(str(tmp), out, metadata=meta_out)
        os.replace(tmp, work)
        documented_or_works(load_prompt_cache, work, model)

    check()


def fuzz_messages():
    """Chat messages with random roles, content parts and media sources through processor.prompt_inputs."""
    from mlx_gemma4.processing import Processor

    processor = Processor.from_pretrained(_fixture("FUZZ_MM_TOKENIZER"))
    work = Path(tempfile.mkdtemp(prefix="fuzz-messages-"))
    png = work / "ok.png"
    from PIL import Image

    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(png)
    (work / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (work / "text.mp3").write_text("just some text, not audio")
    control = st.sampled_from(["<turn|>", "<|turn>", "<|image|>", "<|audio|>", "<bos>", "<eos>", "<|tool_call>",
                               "<|channel>", "\U000f0000", "\U000f0001", "<|\"|>", "\n"])
    text = st.lists(st.one_of(st.text(max_size=6), control), max_size=5).map("".join)
    sources = st.one_of(st.just(str(png)), st.just(str(work / "junk.png")), st.just(str(work / "text.mp3")),
                        st.just(str(work / "missing.png")), st.just(png.read_bytes()), st.just(b""), st.just(b"\0" * 7),
                        st.just("file:///etc/passwd"), st.just("data:image/png;base64,@@"), st.just(""),
                        st.just(np.zeros((20, 20, 3), np.uint8)), st.just(np.zeros(100, np.float32)),
                        st.just(np.full(3200, np.nan, np.float32)), st.integers(), st.none(), LEAVES)
    media_item = st.builds(lambda kind, key, src: {"type": kind, key: src},
                           st.sampled_from(["image", "audio", "video"]),
                           st.sampled_from(["image", "audio", "video", "url", "path", "base64"]), sources)
    item = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, text), media_item,
                     st.sampled_from([{"type": "image"}, {"type": "audio"}, {"type": "text"}, {"type": 3}, {}]),
                     st.dictionaries(st.sampled_from(["type", "text", "image"]), LEAVES, max_size=2), LEAVES)
    content = st.one_of(text, st.lists(item, max_size=4), st.lists(media_item | item, min_size=1, max_size=3),
                        LEAVES)
    role = st.one_of(st.sampled_from(["user", "assistant", "system", "user", "assistant"]),
                     st.sampled_from(["tool", "model", "developer"]), text, LEAVES)
    message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}),
                        st.fixed_dictionaries({"role": st.just("user"),
                                               "content": st.lists(media_item, min_size=1, max_size=2)}),
                        st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "reasoning"]), JSON,
                                        max_size=3))
    conversation = st.one_of(st.lists(message, min_size=1, max_size=3), st.lists(message, max_size=4), text,
                             LEAVES)

    @given(conversation, st.sampled_from([None, 70, 99]), st.booleans(),
           st.one_of(st.none(), st.lists(st.just(str(png)), max_size=2)))
    def check(messages, budget, sanitize, images):
        documented_or_works(processor.prompt_inputs, messages, max_soft_tokens=budget,
                            sanitize_control_tokens=sanitize, images=images)

    check()


def fuzz_sampling():
    from mlx_gemma4.sample import make_logits_processors, make_sampler

    numbers = st.one_of(NUMBERS, st.floats(-2, 2), st.none(), st.text(max_size=3), st.booleans())
    logits = mx.array(np.random.RandomState(0).randn(2, 50).astype(np.float32))

    def run(temperature, top_p, top_k, min_p, seed, penalty):
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
        processors = make_logits_processors(penalty)
        scores = logits
        for process in processors:
            scores = process(mx.array([[1, 2, 3], [4, 5, 6]]), scores)
        tokens = np.array(sampler(scores))
        assert tokens.shape == (2,) and ((0 <= tokens) & (tokens < 50)).all(), tokens

    @given(numbers, numbers, numbers, numbers, numbers, numbers)
    def check(temperature, top_p, top_k, min_p, seed, penalty):
        documented_or_works(run, temperature, top_p, top_k, min_p, seed, penalty)

    check()


TARGETS = {name[len("fuzz_"):]: fn for name, fn in list(globals().items()) if name.startswith("fuzz_")}


def limit_memory() -> None:
    """Cap the address space at what the process uses now plus MLX_GEMMA4_FUZZ_MEMORY_GB (if set)."""
    gb = os.environ.get("MLX_GEMMA4_FUZZ_MEMORY_GB")
    if gb:
        now = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (now + int(float(gb) * 2**30), hard))


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(TARGETS)
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
    import PIL.Image  # noqa: F401  (imports before the limit: they map shared libraries)
    import tokenizers  # noqa: F401

    from mlx_gemma4 import loading  # noqa: F401
    from mlx_gemma4.processing import processor  # noqa: F401

    limit_memory()
    for target in chosen:
        TARGETS[target]()
        print(f"{target}: ok ({PROFILE} profile)", flush=True)

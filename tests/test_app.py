"""The Gradio app (apps/gemma4_app.py): its chat logic in-process, then the running app (one launch, serving a
tiny E2B with vision and audio and, with --allow-model-switch, a tiny MoE) driven over HTTP as the browser does,
through gradio_client, and through a real browser (Debian's chromium via Playwright)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the app needs gradio (pip install '.[app]')")
pytest.importorskip("mlx_gemma4.generate", reason="the app streams through mlx_gemma4.generate")

import checkpoints  # noqa: E402

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
def media_chat(multimodal_checkpoint, tmp_path_factory):
    """Tiny E2B with vision and audio towers plus a tokenizer that has the image/audio tokens."""
    out = tmp_path_factory.mktemp("app-media-e2b")
    shutil.copytree(multimodal_checkpoint("e2b", audio=True), out, dirs_exist_ok=True)
    return checkpoints.make_tokenizer(out, checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)


@pytest.fixture(scope="module")
def host(app, moe_chat):
    host = app.ModelHost()
    host.load(str(moe_chat))
    return host


@pytest.fixture(scope="module")
def media_host(app, media_chat):
    host = app.ModelHost()
    host.load(str(media_chat))
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
    # changing the system prompt (or thinking) re-renders the conversation from scratch under it
    fourth, _ = run_turn(app, host, conv, "bye", system="Be brief.")
    assert fourth.generation_stats.cached_tokens == 0
    assert conv.session.messages[0] == {"role": "system", "content": "Be brief."}


def test_stop_keeps_the_partial_reply_and_the_cache(app, host):
    from mlx_gemma4.generate import generate

    conv = app.Conversation()
    turn = app.Turn(text=PROMPT)
    conv.turns.append(turn)
    stream = app.respond(host, conv, turn, app.Settings(max_tokens=24))
    next(stream)
    conv.stop.set()
    rest = list(stream)
    assert turn.stats.startswith("stopped by the user")
    assert len(rest) == 1 and turn.generation_stats.generation_tokens == 1
    session = conv.session
    assert session is not None and session.messages[-1] == {"role": "assistant", "content": turn.raw_reply}
    nxt, _ = run_turn(app, host, conv, "go on")
    stats = nxt.generation_stats
    assert conv.session is session and stats.cached_tokens > 0 and stats.generation_tokens > 0
    ids = session.cache.tokens[:stats.cached_tokens + stats.prompt_tokens]
    assert generate(host.model, host.processor, ids, max_tokens=24) == nxt.raw_reply  # = a fresh prefill


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


def test_image_and_audio_turns_generate_and_stay_in_context(app, media_host, media):
    from mlx_gemma4.generate import generate

    conv = app.Conversation()
    turn = app.Turn("what do you see and hear?", images=[media["image"]], audios=[media["audio"]])
    conv.turns.append(turn)
    list(app.respond(media_host, conv, turn, app.Settings(max_tokens=12)))  # image budget 280, the default
    expected = generate(media_host.model, media_host.processor, turn.text, images=[media["image"]],
                        audio=[media["audio"]], max_tokens=12)
    assert turn.error is None and turn.raw_reply == expected

    # a smaller budget gives the image fewer soft tokens; a later text turn still carries the image and clip
    small = app.Conversation()
    first = app.Turn("what do you see and hear?", images=[media["image"]], audios=[media["audio"]])
    small.turns.append(first)
    list(app.respond(media_host, small, first, app.Settings(max_tokens=12, image_budget=70)))
    assert first.generation_stats.prompt_tokens < turn.generation_stats.prompt_tokens
    follow = app.Turn("and then? <|image|>")  # a typed marker token stays text, not an image slot
    small.turns.append(follow)
    list(app.respond(media_host, small, follow, app.Settings(max_tokens=12, image_budget=70)))
    assert follow.error is None and follow.generation_stats.generation_tokens > 0
    # the first turn (its image and audio soft tokens included) is reused from the cache
    assert follow.generation_stats.cached_tokens > first.generation_stats.prompt_tokens
    ids = small.session.cache.tokens[:follow.generation_stats.cached_tokens + follow.generation_stats.prompt_tokens]
    _, media = media_host.processor.prompt_inputs("", images=[media["image"]], audio=[media["audio"]],
                                                  max_soft_tokens=70)
    reply = generate(media_host.model, media_host.processor, ids, media=media, max_tokens=12)
    assert reply == follow.raw_reply  # = one fresh prefill of the conversation with both attachments


def test_quantization_choice_loads_a_quantized_model(app, moe_chat):
    import mlx.nn as nn

    quantized = app.ModelHost()
    assert "4-bit" in quantized.load(str(moe_chat), "4")
    layer = quantized.model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    conv = app.Conversation()
    turn, _ = run_turn(app, quantized, conv, PROMPT, max_tokens=4)
    assert turn.generation_stats.generation_tokens >= 1
    with pytest.raises(app.UserError, match="quantization must be one of"):
        quantized.load(str(moe_chat), "3")


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
    # an allocation failure mid-reply is a message too (MLX raises RuntimeError from its allocator)
    class Exhausted:
        def send(self, *args, **kwargs):
            raise RuntimeError("[metal::malloc] Attempting to allocate 90000000000 bytes which is greater than "
                               "the maximum allowed buffer size")
            yield

    oom = app.Conversation()
    oom.session, oom.session_key = Exhausted(), (host.generation, "", False)
    turn = app.Turn("hi")
    oom.turns.append(turn)
    with pytest.raises(app.UserError, match="out of memory during generation"):
        list(app.respond(host, oom, turn, app.Settings()))
    assert oom.session is None  # the next turn starts from a clean cache

    name = host.name
    with pytest.raises(app.UserError, match="could not load model: ") as failed:
        host.load("/nonexistent/model")
    assert "/nonexistent" not in str(failed.value)  # no server path in a message
    assert host.name == name and host.model is not None  # the loaded model stays


def test_model_switching_is_off_by_default_and_only_among_the_command_line_models(app, moe_chat, media_chat,
                                                                                   tmp_path):
    fixed = app.ModelHost([str(media_chat)])
    with pytest.raises(app.UserError, match="model switching is disabled"):
        fixed.switch(app.model_label(str(media_chat)), "none")
    api = {fn.api_name for fn in app.build_app(fixed).fns.values()}
    assert "chat" in api and "load_model" not in api  # no such endpoint at all, not a hidden one

    host = app.ModelHost([str(media_chat), str(moe_chat)], allow_switch=True)
    host.load(str(media_chat))
    labels = {label: name for label, name in host.choices.items()}
    assert labels == {media_chat.name: str(media_chat), moe_chat.name: str(moe_chat)}  # no paths shown
    before = (host.name, host.generation)
    link = tmp_path / "elsewhere"
    link.symlink_to(moe_chat)
    for asked in [str(moe_chat), str(link), "/etc", "../" + moe_chat.name, "", None, [moe_chat.name]]:
        with pytest.raises(app.UserError, match="this server offers only these models") as refused:
            host.switch(asked, "none")
        assert str(tmp_path) not in str(refused.value) and str(moe_chat.parent) not in str(refused.value)
    assert (host.name, host.generation) == before  # nothing was loaded
    assert "MoE: top-8" in host.switch(moe_chat.name, "none") and host.name == str(moe_chat)

    assert app.model_labels(["/a/x", "/b/x", "google/gemma-4-E2B-it"]) == {
        "x": "/a/x", "x (2)": "/b/x", "google/gemma-4-E2B-it": "google/gemma-4-E2B-it"}


def test_attachments_only_from_the_upload_folder_and_messages_without_paths(app, tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    inside, outside = uploads / "abc" / "cat.png", tmp_path / "secret.png"
    inside.write_bytes(b"x")
    outside.write_bytes(b"x")
    (uploads / "link.png").symlink_to(outside)
    assert app.uploaded_media([str(inside), str(uploads / "abc" / "clip.wav")], uploads.resolve()) == (
        [str(inside)], [str(uploads / "abc" / "clip.wav")])
    for path in [str(outside), str(uploads / "abc" / ".." / ".." / "secret.png"), str(uploads / "link.png"), 7]:
        with pytest.raises(app.UserError, match="attachments must be uploaded through the app") as refused:
            app.uploaded_media([path], uploads.resolve())
        assert str(tmp_path) not in str(refused.value)

    assert app.without_paths("no config.json in /etc") == "no config.json in etc"
    assert app.without_paths("cannot identify image file '/tmp/gradio/ab/x.png'") == (
        "cannot identify image file 'x.png'")
    assert app.without_paths("see https://example.org/a/b, ~/models/m/ and a/b") == "see https://example.org/a/b, m and a/b"
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(app.UserError, match="could not load empty-dir") as failed:
        app.ModelHost().load(str(empty))
    assert str(tmp_path) not in str(failed.value)


# -- the running app ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(media_chat, moe_chat, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(APP), "--model", str(media_chat), "--model", str(moe_chat),
                                 "--allow-model-switch", "--port", str(port), "--max-tokens", "24"],
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
        page.wait_for_function("n => document.querySelectorAll('#message .thumbnail-item').length >= n",
                               arg=len(files), timeout=20000)
    page.press("#message textarea", "Enter")


def _wait_idle(page, timeout=60000):
    """Until the reply has finished (the textbox is interactive again)."""
    page.wait_for_function("() => { const t = document.querySelector('#message textarea');"
                           " return t && !t.disabled; }", timeout=timeout)


def test_gradio_client_streams_replies_and_reports_errors(server, media):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, download_files=False)
    settings = [24, 0.0, 1.0, False, 280, ""]  # max tokens, temperature, top-p, thinking, image budget, system
    job = client.submit(PROMPT, [], *settings, api_name="/chat")
    pieces = [p for p in job if p]
    assert len(pieces) >= 2 and pieces[-1] == job.result()
    assert not job.result().startswith("⚠️")

    both = client.predict("what do you see and hear?", [handle_file(media["image"]), handle_file(media["audio"])],
                          *settings, api_name="/chat")
    assert both and not both.startswith("⚠️")
    broken = client.predict("and this?", [handle_file(media["broken"])], *settings, api_name="/chat")
    assert "broken.png is not a readable image" in broken
    after = client.predict(PROMPT, [], *settings, api_name="/chat")
    assert after == job.result()  # still serving, same greedy reply


class Browser:
    """The HTTP calls the browser's gradio client makes: queued events through /queue/join + /queue/data,
    the others through /run/predict; events named by their index (what hiding an endpoint doesn't stop)."""

    def __init__(self, url: str):
        import httpx

        self.url, self.http, self.session = url, httpx.Client(timeout=120), uuid.uuid4().hex[:11]
        config = self.http.get(url + "config").json()
        states = {c["id"] for c in config["components"] if c["type"] == "state"}
        self.events = {d["api_name"]: (d["id"], d["queue"] is not False, [i in states for i in d["inputs"]])
                       for d in config["dependencies"]}

    def call(self, api_name: str, *values) -> tuple[bool, object]:
        """(success, output data or error) of one event; `values` of its inputs but the session state (the
        browser sends null there: the server keeps the state)."""
        fn, queued, is_state = self.events[api_name]
        values = iter(values)
        data = [None if state else next(values) for state in is_state]
        assert next(values, None) is None, f"too many values for {api_name}"
        body = {"data": data, "fn_index": fn, "session_hash": self.session, "event_data": None,
                "trigger_id": None}
        if not queued:
            r = self.http.post(self.url + "gradio_api/run/predict", json=body)
            return r.status_code == 200, r.json().get("data", r.json().get("error"))
        assert self.http.post(self.url + "gradio_api/queue/join", json=body).status_code == 200
        with self.http.stream("GET", self.url + f"gradio_api/queue/data?session_hash={self.session}") as events:
            for line in events.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    output = message["output"]
                    return message["success"], output.get("data", output.get("error"))
        raise AssertionError(f"{api_name}: the event stream ended without a result")


def test_endpoints_refuse_client_paths_and_keep_answering(server, media, moe_chat, monkeypatch):
    import gradio_client.client
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    settings = [24, 0.0, 1.0, False, 280, ""]
    client = Client(server, verbose=False, download_files=False)
    expected = client.predict(PROMPT, [], *settings, api_name="/chat")
    assert expected and not expected.startswith("⚠️")
    never_uploaded = {"path": media["image"], "meta": {"_type": "gradio.FileData"}}  # a file on the server
    refused = "this server offers only these models"

    # as the browser would: the files and the model are only what the client posts
    browser = Browser(server)
    assert browser.call("chat", "look", [never_uploaded], *settings) == (False, None)  # no message with a path
    with open(media["image"], "rb") as f:  # the same file uploaded is fine
        uploaded, = browser.http.post(server + "gradio_api/upload", files=[("files", ("cat.png", f))]).json()
    ok, (reply,) = browser.call("chat", "look", [dict(never_uploaded, path=uploaded)], *settings)
    assert ok and reply and not reply.startswith("⚠️")
    assert browser.call("add_user_turn", {"text": "look", "files": [never_uploaded]}, None)[0] is False
    for path in [str(moe_chat), "/etc"]:
        ok, (status, *_) = browser.call("load_model", path, "none")
        assert ok and refused in status and str(moe_chat.parent) not in status
        assert "vision encoder · audio encoder" in status  # the served model stays

    # through gradio_client, as a client that posts a path instead of uploading the file
    monkeypatch.setattr(gradio_client.client.Endpoint, "_upload_file", lambda self, f, data_index: f)
    with pytest.raises(AppError):
        client.predict("look", [never_uploaded], *settings, api_name="/chat")
    with pytest.raises(AppError):
        client.predict({"text": "look", "files": [never_uploaded]}, None, api_name="/add_user_turn")
    for path in [str(moe_chat), "/etc"]:
        status, *_ = client.predict(path, "none", api_name="/load_model")
        assert refused in status and str(moe_chat.parent) not in status
    monkeypatch.undo()

    # a normal request answers as before, through /chat and through the stateful chat endpoints
    assert client.predict(PROMPT, [], *settings, api_name="/chat") == expected
    client.predict({"text": PROMPT, "files": []}, None, api_name="/add_user_turn")
    history, stats, _ = client.predict(*settings, api_name="/bot_turn")
    assert history[-1]["role"] == "assistant" and history[-1]["content"][0]["text"] == expected
    assert "generation: " in stats
    ok, (history, _, _) = browser.call("add_user_turn", {"text": PROMPT, "files": []}, None)
    ok, (history, stats, _) = browser.call("bot_turn", *settings)
    assert ok and history[-1]["content"][0]["text"] == expected


def _last_bot_text(page) -> str:
    return page.evaluate("() => { const b = document.querySelectorAll('#chat .bot, #chat [data-testid=\"bot\"]');"
                         " return b.length ? b[b.length - 1].innerText : ''; }")


def _reply_done(page, stats_before: str, timeout=60000):
    """Until the reply has finished: new stats with token counts, and the textbox usable again."""
    page.wait_for_function("before => { const s = document.querySelector('#stats').innerText;"
                           " return s !== before && s.includes('generation:'); }", arg=stats_before, timeout=timeout)
    _wait_idle(page, timeout)


def test_browser_chat_streams_and_handles_attachments(server, browser, media, moe_chat, artifacts_dir):
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    page.goto(server)
    page.wait_for_selector("#message textarea", timeout=30000)
    assert "vision encoder · audio encoder" in page.inner_text("#model-status")
    assert not page.is_visible("#experts")  # a dense model has no expert plot

    # a text message: the reply arrives in pieces
    page.evaluate(_WATCH_REPLY)
    before = page.inner_text("#stats")
    _send(page, PROMPT)
    _reply_done(page, before)
    stats = page.inner_text("#stats")
    assert "tok/s" in stats and "peak memory" in stats
    replies = [r for r in page.evaluate("window.__replies") if r.strip()]
    assert len(set(replies)) >= 2, f"the reply did not stream: {replies}"

    # an image and an audio clip in the same message
    page.evaluate(_WATCH_REPLY)
    before = page.inner_text("#stats")
    _send(page, "what do you see and hear?", [media["image"], media["audio"]])
    _reply_done(page, before)
    assert not _last_bot_text(page).startswith("⚠"), _last_bot_text(page)
    assert page.locator("#chat img").count() >= 1 and page.locator("#chat audio").count() >= 1
    page.screenshot(path=str(artifacts_dir / "app-chat.png"), full_page=True)

    # an invalid upload is an error message, and the app keeps serving
    _send(page, "and this?", [media["broken"]])
    page.wait_for_selector("text=broken.png is not a readable image", timeout=60000)
    _wait_idle(page)
    before = page.inner_text("#stats")
    _send(page, "still there?")
    _reply_done(page, before)
    assert _last_bot_text(page).strip() and not _last_bot_text(page).startswith("⚠")

    # the stop button interrupts a reply (here about 80 tokens) right after its first chunk
    page.click("text=Settings")
    page.fill("#max-tokens input[type=number]", "4000")
    page.press("#max-tokens input[type=number]", "Enter")
    before = page.inner_text("#stats")
    _send(page, PROMPT)
    page.wait_for_function("before => { const s = document.querySelector('#stats').innerText;"
                           " return s !== before && s.includes('generation:'); }", arg=before, timeout=60000)
    page.click("#stop", force=True)  # while the chat streams, the page reflows and the button is never "stable"
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('stopped by the user')",
                           timeout=30000)
    _wait_idle(page)
    stopped_at = int(page.inner_text("#stats").split("generation: ")[1].split(" tokens")[0])
    assert 1 <= stopped_at < 4000 and _last_bot_text(page).strip()

    # a path typed into the picker is refused; the loaded model stays
    page.fill("#model-picker input", str(moe_chat))
    page.press("#model-picker input", "Enter")
    page.click("#load-model")
    page.wait_for_selector("text=this server offers only these models", timeout=30000)
    assert "vision encoder · audio encoder" in page.inner_text("#model-status")

    # switch to the MoE model with the picker; its reply comes with the expert plot
    page.fill("#model-picker input", moe_chat.name)
    page.press("#model-picker input", "Enter")
    page.click("#load-model")
    page.wait_for_function("() => document.querySelector('#model-status').innerText.includes('MoE: top-8')",
                           timeout=60000)
    page.click("#clear")
    before = page.inner_text("#stats")
    _send(page, PROMPT)
    _reply_done(page, before)
    page.wait_for_selector("#experts img, #experts canvas, #experts svg", timeout=30000)
    page.screenshot(path=str(artifacts_dir / "app-moe.png"), full_page=True)
    page.close()

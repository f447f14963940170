"""Gemma 4 chat app: a local Gradio UI over mlx-gemma4.

    python apps/gemma4_app.py --model google/gemma-4-E2B-it [--port 7860] [--quantize 4]
    python apps/gemma4_app.py --model google/gemma-4-E2B-it --model ./my-checkpoint --allow-model-switch
    python apps/gemma4_app.py --model google/gemma-4-E2B-it --draft-model google/gemma-4-E2B-it-assistant

Opens on http://127.0.0.1:PORT. Streaming chat with multi-turn history that keeps the KV cache between turns
(`session.ChatSession`), image / audio attachments (upload, webcam, paste, microphone), sampling controls,
a stop button, stats after every reply and, for the mixture-of-experts model (26B A4B), a plot of the experts
each layer used for the reply. With `--allow-model-switch`, a picker switches among the `--model`s given on the
command line (with load-time quantization); no client can make the app load anything else. With `--draft-model`,
replies to the model that drafter pairs with use speculative decoding (the same replies, faster).

One model is loaded at a time and shared by every browser tab; requests are queued and run one at a time.
Every failure (unreadable file, audio on a model without an audio encoder, out of memory, ...) is reported in the
chat, without server paths, and the app keeps serving. Attachments are read only from gradio's upload folder.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import mlx_gemma4  # noqa: E402,F401  (preloads the BLAS before mlx.core)
import gradio as gr  # noqa: E402

from mlx_gemma4.engine import ContextError  # noqa: E402
from mlx_gemma4.expert_trace import moe_layers, record_expert_choices  # noqa: E402

DEFAULT_MODEL = "google/gemma-4-E2B-it"
QUANTIZATION_CHOICES = ["none", "8", "4"]
IMAGE_BUDGETS = [70, 140, 280, 560, 1120]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".webm", ".aac", ".opus"}
# an absolute path (not the //host/... of a URL): every message a client sees shows only its last component
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])~?(?:/[^/\s'\"`,;:()\[\]<>]+)+/?")


class UserError(Exception):
    """A problem to show the user in the chat (bad file, unsupported input, no model ...)."""


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its last component (`/srv/models/x/config.json` -> `config.json`)."""
    return ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def is_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def model_label(name: str) -> str:
    """What users see for a model: a Hub id as is, a local checkpoint by its directory's name only."""
    return Path(name).expanduser().resolve().name or name if is_local_path(name) else name


def model_labels(names: list[str]) -> dict[str, str]:
    """label -> model (Hub id or local path) for the models the app was started with; labels are unique."""
    labels: dict[str, str] = {}
    for name in dict.fromkeys(names):
        label = base = model_label(name)
        n = 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels[label] = name
    return labels


# -- the shared model ----------------------------------------------------------------------------------------
class ModelHost:
    """The one loaded model, shared by every browser session. `lock` serializes all use of the model.

    `load` is the operator's (any Hub id or local path, from the command line); `switch` is a client's request,
    honoured only with `allow_switch` and only for a label of `models` (never a path from the client)."""

    def __init__(self, models: list[str] = (), allow_switch: bool = False, draft_model: str | None = None):
        self.lock = threading.RLock()
        self.model = None
        self.processor = None
        self.draft_model = draft_model  # the operator's MTP drafter checkpoint (for the model it pairs with)
        self.drafter = None
        self.name = ""
        self.label = ""  # how users see `name` (no server path)
        self.quantize: int | None = None
        self.generation = 0  # bumped on every load: conversations built on an older model drop their caches
        self.choices = model_labels(list(models))
        self.allow_switch = allow_switch

    def load(self, name: str, quantization: str = "none") -> str:
        from mlx_gemma4 import load

        name = (name or "").strip()
        if not name:
            raise UserError("enter a model id (e.g. google/gemma-4-E2B-it) or a local checkpoint directory")
        if quantization not in QUANTIZATION_CHOICES:
            raise UserError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {quantization!r}")
        bits = None if quantization == "none" else int(quantization)
        label = next((k for k, v in self.choices.items() if v == name), None) or model_label(name)
        with self.lock:
            try:
                model, processor = load(name, quantize=bits)
            except MemoryError as e:
                raise UserError(f"out of memory loading {label}; try 4-bit quantization or a smaller model") from e
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"could not load {label}: {without_paths(str(e))}") from e
            if processor is None:
                raise UserError(f"{label} has no tokenizer.json, so it cannot be chatted with")
            self.model, self.processor, self.quantize = model, processor, bits
            self.name, self.label = name, label
            self.drafter = self._load_drafter(model)
            self.generation += 1
        return self.describe()

    def _load_drafter(self, model):
        """The operator's drafter if it drafts for `model` (speculative decoding), else None."""
        if not self.draft_model:
            return None
        from mlx_gemma4 import load_drafter
        from mlx_gemma4.config import ConfigError

        try:
            return load_drafter(self.draft_model, model)
        except ConfigError:  # a drafter for another of the --models
            return None
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"could not load the draft model: {without_paths(str(e))}") from e

    def switch(self, label, quantization) -> str:
        """A client's request to load another model: only a label of the models the app was started with."""
        if not self.allow_switch:
            raise UserError("model switching is disabled on this server")
        if not isinstance(label, str) or label not in self.choices:
            raise UserError(f"this server offers only these models: {', '.join(self.choices)}")
        return self.load(self.choices[label], quantization)

    @property
    def is_moe(self) -> bool:
        return self.model is not None and bool(moe_layers(self.model))

    def describe(self) -> str:
        if self.model is None:
            return "No model loaded."
        cfg = self.model.config
        bits = f"{self.quantize}-bit" if self.quantize else "unquantized"
        parts = [f"**{self.label}**", bits, f"{cfg.text.num_hidden_layers} layers"]
        if self.is_moe:
            parts.append(f"MoE: top-{cfg.text.top_k_experts} of {cfg.text.num_experts} experts")
        parts.append("vision encoder" if cfg.vision else "no vision encoder")
        parts.append("audio encoder" if cfg.audio else "no audio encoder")
        if self.drafter is not None:
            parts.append("speculative decoding (MTP drafter)")
        return " · ".join(parts)


# -- inputs ---------------------------------------------------------------------------------------------------
def media_kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    raise UserError(f"{Path(path).name}: unsupported file type {suffix or '(none)'}; attach an image "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}) or audio ({', '.join(sorted(AUDIO_SUFFIXES))})")


def uploaded_media(paths: list[str], upload_dir: Path) -> tuple[list[str], list[str]]:
    """(images, audio) among the files a client attached; each must lie in gradio's upload folder."""
    images, audios = [], []
    for path in paths:
        if not isinstance(path, str) or not Path(path).resolve().is_relative_to(upload_dir):
            raise UserError("attachments must be uploaded through the app")
        (images if media_kind(path) == "image" else audios).append(path)
    return images, audios


def check_image(path: str) -> None:
    from mlx_gemma4.processing.image import load_image

    try:
        load_image(path)
    except (ValueError, OSError, TypeError) as e:
        raise UserError(f"{Path(path).name} is not a readable image: {e}") from e


def check_audio(path: str) -> None:
    from mlx_gemma4.processing.audio import check_clip_length, load_audio

    try:
        check_clip_length(len(load_audio(path)))
    except (ValueError, OSError) as e:  # AudioError is a ValueError
        raise UserError(f"{Path(path).name} is not usable audio: {e}") from e


def unsupported_media(host: ModelHost, images: list[str], audios: list[str]) -> str | None:
    """Why this model + build can't take these attachments (None when it can)."""
    cfg = host.model.config
    if images and not cfg.vision:
        return f"{host.label} has no vision encoder, so it cannot look at images."
    if audios and not cfg.audio:
        return (f"{host.label} has no audio encoder, so it cannot listen to audio (in the Gemma 4 family only "
                "E2B and E4B take audio).")
    return None


# -- conversations --------------------------------------------------------------------------------------------
@dataclass
class Settings:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    thinking: bool = False
    image_budget: int = 280
    system: str = ""

    def __post_init__(self):
        self.system = (self.system or "").strip()  # an untouched textbox sends None

    def validate(self) -> None:
        if int(self.max_tokens) < 1:
            raise UserError(f"max tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise UserError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if int(self.image_budget) not in IMAGE_BUDGETS:
            raise UserError(f"image token budget must be one of {IMAGE_BUDGETS}, got {self.image_budget}")


@dataclass
class Turn:
    text: str
    images: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    raw_reply: str = ""  # as generated (with any thought channel): what the KV cache holds
    thinking: str = ""
    answer: str = ""
    error: str | None = None
    stats: str = ""
    generation_stats: object = None  # generate.GenerationStats of the reply


class Conversation:
    """One browser session's chat. Its `ChatSession` keeps the KV cache, images and audio included, between
    turns while the model, the system prompt and the thinking switch stay the same; otherwise (or after a
    failed turn) the next turn rebuilds it from the finished turns, attachments included (one full prefill)."""

    def __init__(self):
        self.turns: list[Turn] = []
        self.session = None
        self.session_key: tuple | None = None
        self.stop = threading.Event()

    def session_for(self, host: ModelHost, settings: Settings):
        from mlx_gemma4.session import ChatSession, user_message

        key = (host.generation, settings.system, bool(settings.thinking))
        if self.session is None or self.session_key != key:
            session = ChatSession(host.model, host.processor, system=settings.system or None,
                                  enable_thinking=bool(settings.thinking))
            for turn in self.turns:
                if turn.error is None and turn.raw_reply:
                    session.messages += [user_message(turn.text, turn.images, turn.audios),
                                         {"role": "assistant", "content": turn.raw_reply}]
            self.session, self.session_key = session, key
        return self.session

    def drop_cache(self) -> None:
        self.session = None

    def chatbot(self) -> list[dict]:
        out: list[dict] = []
        for turn in self.turns:
            if turn.text:
                out.append({"role": "user", "content": turn.text})
            for path in turn.images + turn.audios:
                out.append({"role": "user", "content": {"path": path}})
            if turn.thinking:
                out.append({"role": "assistant", "content": turn.thinking,
                            "metadata": {"title": "Thinking", "status": "done"}})
            if turn.answer:
                out.append({"role": "assistant", "content": turn.answer})
            if turn.error:
                out.append({"role": "assistant", "content": f"⚠️ {turn.error}"})
        return out


class Conversations:
    """Every browser tab's (and API client's) Conversation, by a session id. gr.State holds only the id: a
    State value must be deep-copyable (gradio copies it for API clients), and a Conversation holds a lock and
    a KV cache. The least recently used conversations beyond `limit` are forgotten."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.lock = threading.Lock()
        self.by_id: OrderedDict[str, Conversation] = OrderedDict()

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def get(self, session_id: str) -> Conversation:
        with self.lock:
            conv = self.by_id.pop(session_id, None) or Conversation()
            self.by_id[session_id] = conv
            while len(self.by_id) > self.limit:
                self.by_id.popitem(last=False)
            return conv

    def reset(self, session_id: str) -> None:
        with self.lock:
            old = self.by_id.pop(session_id, None)
        if old is not None:
            old.stop.set()

    def drop(self, session_id: str) -> None:
        with self.lock:
            self.by_id.pop(session_id, None)


def expert_figure(trace, start: int, model_name: str):
    """Heatmap: MoE layer x expert, how many reply tokens each expert served."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = trace.usage(start)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(trace.layers) + 1.2)))
    im = ax.imshow(usage, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, len(trace.layers) // 12)
    ax.set_yticks(range(0, len(trace.layers), step), [str(trace.layers[i]) for i in range(0, len(trace.layers), step)])
    ax.set_title(f"{model_name}: experts used by the reply ({usage[0].sum() // trace.top_k} tokens, "
                 f"top-{trace.top_k})", fontsize=10)
    fig.colorbar(im, ax=ax, label="tokens routed")
    fig.tight_layout()
    plt.close(fig)
    return fig


def _is_out_of_memory(error: Exception) -> bool:
    """MLX reports a failed allocation as a RuntimeError (e.g. Metal's "[metal::malloc] ... buffer size")."""
    text = str(error).lower()
    return any(word in text for word in ("malloc", "out of memory", "allocat"))


def respond(host: ModelHost, conv: Conversation, turn: Turn, settings: Settings) -> Iterator[tuple[str, object]]:
    """Generate the reply to `turn` (already appended to conv.turns), updating it in place; yields
    (stats markdown, expert figure or None) after every chunk."""
    if host.model is None:
        raise UserError("no model is loaded" + (": pick one above and press Load" if host.allow_switch else ""))
    settings.validate()
    if not turn.text.strip() and not (turn.images or turn.audios):
        raise UserError("empty message")
    for path in turn.images:
        check_image(path)
    for path in turn.audios:
        check_audio(path)
    reason = unsupported_media(host, turn.images, turn.audios)
    if reason:
        raise UserError(reason)

    gen_kwargs = dict(max_tokens=int(settings.max_tokens), temperature=float(settings.temperature),
                      top_p=float(settings.top_p), draft_model=host.drafter)
    conv.stop.clear()
    failed = True
    with host.lock:
        stream = conv.session_for(host, settings).send(turn.text, images=turn.images, audio=turn.audios,
                                                       max_soft_tokens=int(settings.image_budget), **gen_kwargs)
    trace_ctx = record_expert_choices(host.model) if host.is_moe else None
    trace = trace_ctx.__enter__() if trace_ctx is not None else None
    last = None
    try:
        while True:
            if conv.stop.is_set():
                turn.stats = "stopped by the user" + (f" · {last.stats.summary()}" if last else "")
                break
            with host.lock:
                chunk = next(stream, None)
            if chunk is None:
                break
            last = chunk
            turn.raw_reply += chunk.text
            turn.thinking, turn.answer = host.processor.split_thinking(turn.raw_reply)
            if not settings.thinking:
                turn.thinking, turn.answer = "", turn.raw_reply.strip()
            turn.stats, turn.generation_stats = chunk.stats.summary(), chunk.stats
            yield turn.stats, None
        failed = False
    except ContextError as e:
        raise UserError(f"{e}; press Clear to start a new conversation") from e
    except (ValueError, OSError) as e:  # e.g. a tokenizer without image/audio tokens
        raise UserError(str(e)) from e
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_out_of_memory(e):
            raise
        raise UserError(f"out of memory during generation ({e}); try a shorter conversation (Clear), fewer max "
                        "tokens, 4-bit quantization or a smaller model") from e
    finally:
        stream.close()  # a reply stopped by the user stays in the session, as far as it got
        if trace_ctx is not None:
            trace_ctx.__exit__(None, None, None)
        if failed:
            conv.drop_cache()  # the next turn rebuilds the session from the finished turns
    figure = None
    if trace is not None and last is not None:
        figure = expert_figure(trace, last.stats.prompt_tokens, host.label)
    yield turn.stats, figure


# -- the UI ---------------------------------------------------------------------------------------------------
def build_app(host: ModelHost, initial_status: str = "", max_tokens_default: int = 512,
              upload_dir: str | Path | None = None) -> gr.Blocks:
    """The UI and its endpoints. Attachments are accepted only from `upload_dir` (default: gradio's upload
    folder); the model picker and its /load_model endpoint exist only when `host.allow_switch`."""
    from gradio.utils import get_upload_folder

    upload_dir = Path(upload_dir or get_upload_folder()).resolve()
    conversations = Conversations()
    with gr.Blocks(title="Gemma 4 on MLX") as demo:
        gr.Markdown("## Gemma 4 on MLX")
        if host.allow_switch:
            with gr.Row():
                model_box = gr.Dropdown(choices=list(host.choices), value=host.label or None,
                                        allow_custom_value=True,  # what a client sends is checked by host.switch
                                        scale=4, label="Model", elem_id="model-picker")
                quant_box = gr.Radio(QUANTIZATION_CHOICES, value=str(host.quantize or "none"),
                                     label="Quantization", scale=2, elem_id="quantization")
                load_btn = gr.Button("Load", scale=1, elem_id="load-model")
        model_status = gr.Markdown(initial_status or host.describe(), elem_id="model-status")

        # the browser tab's session id (a Conversation in `conversations`); forgotten when the tab closes
        session_id = gr.State(Conversations.new_id, delete_callback=conversations.drop)
        chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat")
        with gr.Row():
            message = gr.MultimodalTextbox(placeholder="Type a message, attach images or audio, or record…",
                                           file_types=["image", "audio"], file_count="multiple",
                                           sources=["upload", "microphone"], show_label=False, scale=8,
                                           elem_id="message")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Accordion("Camera / paste an image", open=False):
            camera = gr.Image(sources=["webcam", "clipboard", "upload"], type="filepath",
                              label="Sent with your next message", elem_id="camera")
        stats_box = gr.Markdown("", elem_id="stats")
        with gr.Accordion("Experts used by the last reply", open=True, visible=host.is_moe) as experts_box:
            expert_plot = gr.Plot(label="Tokens per expert and layer for the last reply", elem_id="experts")
        with gr.Accordion("Settings", open=False):
            system_box = gr.Textbox(label="System prompt", lines=2, elem_id="system")
            with gr.Row():
                max_tokens = gr.Slider(1, 8192, value=max_tokens_default, step=1, label="Max tokens",
                                       elem_id="max-tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            with gr.Row():
                thinking = gr.Checkbox(False, label="Thinking", elem_id="thinking")
                budget = gr.Dropdown(IMAGE_BUDGETS, value=280, label="Image token budget")

        settings_inputs = [max_tokens, temperature, top_p, thinking, budget, system_box]

        def add_user_turn(msg, cam, sid):
            conv = conversations.get(sid)
            msg = msg if isinstance(msg, dict) else {}
            files = [f if isinstance(f, str) else (f or {}).get("path") for f in (msg.get("files") or [])]
            if cam:
                files.append(cam)
            images, audios, error = [], [], None
            try:
                images, audios = uploaded_media(files, upload_dir)
            except UserError as e:
                error = str(e)
            turn = Turn(text=str(msg.get("text") or "").strip(), images=images, audios=audios, error=error)
            conv.turns.append(turn)
            return conv.chatbot(), gr.MultimodalTextbox(value=None, interactive=False), None

        def bot_turn(sid, *values):
            conv = conversations.get(sid)
            if not conv.turns:
                yield conv.chatbot(), "⚠️ send a message first", None
                return
            turn = conv.turns[-1]
            if turn.error or turn.generation_stats is not None:  # rejected at upload, or answered already
                yield conv.chatbot(), f"⚠️ {turn.error or 'send a message first'}", None
                return
            try:
                for stats, figure in respond(host, conv, turn, Settings(*values)):
                    yield conv.chatbot(), stats, figure
            except UserError as e:
                turn.error = without_paths(str(e))
                yield conv.chatbot(), f"⚠️ {turn.error}", None
            except Exception as e:  # keep serving whatever happens; show it
                turn.error = f"generation failed: {type(e).__name__}: {without_paths(str(e))}"
                yield conv.chatbot(), f"⚠️ {turn.error}", None

        submitted = message.submit(add_user_turn, [message, camera, session_id], [chatbot, message, camera],
                                   queue=False)
        submitted.then(bot_turn, [session_id, *settings_inputs], [chatbot, stats_box, expert_plot],
                       concurrency_id="model").then(lambda: gr.MultimodalTextbox(interactive=True), None, [message])

        def stop(sid):
            conversations.get(sid).stop.set()

        stop_btn.click(stop, [session_id], None, queue=False)

        def clear(sid):
            conversations.reset(sid)
            return [], "", None

        clear_btn.click(clear, [session_id], [chatbot, stats_box, expert_plot], queue=False)

        if host.allow_switch:
            def load_model(label, quantization):
                try:
                    status = host.switch(label, quantization)
                except UserError as e:
                    status = f"⚠️ {e}\n\n{host.describe()}"
                return status, gr.Accordion(visible=host.is_moe), None

            load_btn.click(load_model, [model_box, quant_box], [model_status, experts_box, expert_plot],
                           concurrency_id="model")

        # API endpoint for scripts (gradio_client): one message with attachments in, the streamed reply out.
        with gr.Row(visible=False):
            api_text = gr.Textbox(label="text")
            api_files = gr.File(file_count="multiple", type="filepath", label="files")
            api_reply = gr.Textbox(label="reply")
            api_trigger = gr.Button("chat")

        def api_chat(text, files, *values):
            conv = Conversation()
            try:
                images, audios = uploaded_media(list(files or []), upload_dir)
                turn = Turn(text=str(text or "").strip(), images=images, audios=audios)
                conv.turns.append(turn)
                for _ in respond(host, conv, turn, Settings(*values)):
                    yield turn.answer
            except UserError as e:
                yield f"⚠️ {without_paths(str(e))}"
            except Exception as e:  # keep serving; report it
                yield f"⚠️ generation failed: {type(e).__name__}: {without_paths(str(e))}"

        api_trigger.click(api_chat, [api_text, api_files, *settings_inputs], [api_reply], api_name="chat",
                          concurrency_id="model")
    return demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python apps/gemma4_app.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="Hub repo id or local checkpoint directory; repeat it to "
                   f"offer several with --allow-model-switch (the first is loaded at start; default {DEFAULT_MODEL})")
    p.add_argument("--allow-model-switch", action="store_true",
                   help="let users switch among the --model checkpoints (off: the app serves the first one only)")
    p.add_argument("--quantize", choices=QUANTIZATION_CHOICES, default="none", help="quantize at load time")
    p.add_argument("--draft-model", help="an MTP drafter (e.g. google/gemma-4-E2B-it-assistant): speculative "
                   "decoding for the --model it pairs with")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-tokens", type=int, default=512, help="initial value of the max-tokens control")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: localhost only)")
    args = p.parse_args(argv)
    models = args.model or [DEFAULT_MODEL]
    if len(set(models)) > 1 and not args.allow_model_switch:
        p.error("several --model need --allow-model-switch (otherwise only the first would ever be served)")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

    host = ModelHost(models, allow_switch=args.allow_model_switch, draft_model=args.draft_model)
    try:
        status = host.load(models[0], args.quantize)
    except UserError as e:  # start anyway: another model can be picked in the UI
        status = f"⚠️ {e}"
        print(f"warning: {e}", file=sys.stderr)
        host.name, host.label = models[0], next(iter(host.choices))
    demo = build_app(host, status, args.max_tokens)
    demo.queue(default_concurrency_limit=1)
    # show_error=False: clients see only the app's own messages (gr.Error), never an exception text of gradio's
    # with server paths in it; every expected failure is already a chat message
    demo.launch(server_name=args.host, server_port=args.port, show_error=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

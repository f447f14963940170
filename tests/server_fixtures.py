"""A live mlx-gemma4 server for the tests: uvicorn in a thread of the test process, on a free port of 127.0.0.1,
serving a checkpoint loaded once (float32), so the tests compare its answers with `generate()` on the same model
object."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from mlx_gemma4.loading import load
from mlx_gemma4.server import Generator, create_app

API_KEY = "test-key"


@dataclass
class LiveServer:
    model: object
    processor: object
    generator: Generator
    url: str
    _server: object
    _thread: threading.Thread

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def async_openai(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def anthropic(self, **kwargs):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def start_server(path, drafter_path=None, **generator_options) -> LiveServer:
    import uvicorn

    model, processor = load(path, dtype="float32")
    if drafter_path is not None:  # --draft-model
        from mlx_gemma4 import load_drafter

        generator_options["draft_model"] = load_drafter(drafter_path, model)
    generator = Generator(model, processor, model_id="tiny-gemma4", **generator_options)
    app = create_app(generator, api_key=API_KEY, max_body_bytes=8 << 20)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return LiveServer(model, processor, generator, f"http://127.0.0.1:{port}", server, thread)

"""The HTTP app: routes, API keys, body limits, errors, streaming and client disconnects.

    GET  /health, /v1/models[/{id}]
    POST /v1/chat/completions, /v1/completions, /v1/responses     (OpenAI)
    POST /v1/messages, /v1/messages/count_tokens                  (Anthropic)

Each request: key check, then the body (refused past `max_body_bytes` before it is read), its fields checked
(400 naming the field), the prompt built in a worker thread (media decoding, remote fetches), its length
checked against the context, and only then prefill. A streamed reply starts once the first token is there, so
every failure up to that point is a proper HTTP error; a client that goes away cancels its generation.

mlx-lm's server (`mlx_lm.server`) is not the base: its prompts come from the tokenizer's chat template without
our processor (no audio, no image expansion or bidirectional image prefill), and its Gemma 4 tool parser fails
on valid calls ours reads (whitespace around a key, `call:f{ a:<|"|>x<|"|> , b:2 }`, is a JSONDecodeError
there). What fits is used: its BatchGenerator (through mlx_gemma4.batch), LRUPromptCache (generation.py) and
additive penalties (sample_utils).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .anthropic_api import MessagesRequest
from .errors import APIError, bad_request
from .generation import Finished, Generator, Step, in_thread
from .openai_api import ChatRequest, CompletionRequest
from .responses_api import ResponsesRequest

log = logging.getLogger("mlx_gemma4.server")


class ClientGone(Exception):
    """The client disconnected before the reply was ready."""


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def create_app(generator: Generator, *, api_key: str | None = None, max_body_bytes: int = 32 << 20,
               manage_engine: bool = True):
    """The FastAPI app serving `generator`. manage_engine: start the engine's loop at startup, stop it at
    shutdown (tests that share one generator between apps pass False)."""

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            generator.start()
        try:
            yield
        finally:
            if manage_engine:
                generator.stop()

    app = FastAPI(title="mlx-gemma4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(path: str, error: APIError):
        body = error.anthropic_body() if is_anthropic(path) else error.openai_body()
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(body, status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(request.url.path, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return error_response(request.url.path, APIError(error.status_code, str(message)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        # the client learns the kind of failure, not the server's internals (paths, values): those go to the log
        return error_response(request.url.path, APIError(500, f"internal error ({type(error).__name__}); the "
                                                              "server's log has the details"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid API key" if given else "an API key is required (Authorization: Bearer KEY "
                           "or x-api-key: KEY)", code="invalid_api_key")

    async def json_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body is {int(declared)} bytes, more than this server's limit of "
                           f"{max_body_bytes}", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body_bytes:
                raise APIError(413, f"the request body is more than this server's limit of {max_body_bytes} bytes",
                               code="request_too_large")
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from e
        except RecursionError as e:
            raise bad_request("the request body is nested too deeply", code="invalid_json") from e
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}",
                              code="invalid_json")
        return body

    async def until_disconnect(request: Request, awaitable):
        """Await `awaitable`, cancelling it (ClientGone) if the client disconnects first."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGone()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def serve(request: Request, make, stream):
        """Run one generation request: `make(body, generator)` parses it, `stream(req, steps)` turns the
        generation into (event, data) pairs for a streamed reply."""
        from sse_starlette import EventSourceResponse
        from starlette.responses import Response

        authorize(request)
        req = make(await json_body(request), generator)
        prompt = await in_thread(req.prompt, generator)
        steps = generator.generate(prompt, req.settings)
        try:
            if not req.stream:
                return JSONResponse(await until_disconnect(request, req.body(steps)))
            first = await until_disconnect(request, anext(steps))  # errors before any byte is sent
        except ClientGone:
            await steps.aclose()
            return Response(status_code=499)

        async def rest() -> AsyncIterator[Step | Finished]:
            yield first
            async for step in steps:
                yield step

        async def events():
            try:
                async for event, data in stream(req, rest(), prompt):
                    yield {"event": event, "data": json.dumps(data, ensure_ascii=False)} if event else \
                        {"data": json.dumps(data, ensure_ascii=False)}
                if not is_anthropic(request.url.path) and isinstance(req, (ChatRequest, CompletionRequest)):
                    yield {"data": "[DONE]"}
            except APIError as e:  # after the stream started: an error event, then the end
                body = e.anthropic_body() if is_anthropic(request.url.path) else e.openai_body()
                yield {"event": "error", "data": json.dumps(body)} if is_anthropic(request.url.path) or \
                    isinstance(req, ResponsesRequest) else {"data": json.dumps(body)}
            finally:
                await steps.aclose()

        return EventSourceResponse(events(), ping=15)

    async def plain(req, steps, prompt):
        async for chunk in req.chunks(steps):
            yield None, chunk

    async def named(req, steps, prompt):
        async for pair in req.events(steps):
            yield pair

    async def anthropic_events(req, steps, prompt):
        async for pair in req.events(steps, len(prompt.ids)):
            yield pair

    # ---- routes ----------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": generator.model_id, "object": "model", "created": generator.created, "owned_by": "mlx-gemma4",
                "context_length": generator.context_length}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": generator.model_id}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        authorize(request)
        if model_id != generator.model_id:
            raise APIError(404, f"no model {model_id!r} (this server serves {generator.model_id!r})",
                           "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, ChatRequest, plain)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, CompletionRequest, plain)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await serve(request, ResponsesRequest, named)

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await serve(request, MessagesRequest, anthropic_events)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        authorize(request)
        body = await json_body(request)
        req = MessagesRequest({"max_tokens": 1, **body}, generator)
        prompt = await in_thread(req.prompt, generator)
        return {"input_tokens": len(prompt.ids)}

    return app


def serve(model, processor, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_body_bytes: int = 32 << 20, log_level: str = "info", **generator_options) -> None:
    """Run the server until interrupted (the command line is `mlx-gemma4-server`, in cli.py)."""
    import uvicorn

    generator = Generator(model, processor, **generator_options)
    app = create_app(generator, api_key=api_key, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

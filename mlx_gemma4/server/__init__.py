"""An OpenAI- and Anthropic-compatible HTTP server for Gemma 4: `mlx-gemma4-server --model ID`
(= `python -m mlx_gemma4.server`; the command line is in cli.py). One model per process, 127.0.0.1 by default.

    app.py            routes, API keys, body limits, errors, streaming, disconnects; serve()
    openai_api.py     /v1/chat/completions and /v1/completions (and the sampling fields every API shares)
    responses_api.py  /v1/responses (stateless: what the OpenAI Agents SDK and Codex-style tools send)
    anthropic_api.py  /v1/messages
    messages.py       request bodies -> Hugging Face messages + tools (what transformers' template renders)
    generation.py     prompts, continuous batching (mlx_gemma4.batch), prefix reuse, output as steps
    draft.py          --draft-model: speculative decoding, requests one at a time (BatchEngine's interface)
    output.py         the model's output -> reasoning / content / tool calls, as it streams
    errors.py         the error bodies each API's clients expect
"""

from .app import create_app, serve
from .generation import Generator

__all__ = ["Generator", "create_app", "serve"]

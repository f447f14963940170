"""An OpenAI- and Anthropic-compatible HTTP server for Gemma 4 (`python -m mlx_gemma4.server`).

    errors.py     the error bodies each API's clients expect
    messages.py   request bodies (chat completions, Responses, Anthropic Messages) -> Hugging Face messages + tools
    output.py     the model's output -> reasoning / content / tool calls, streamed
"""

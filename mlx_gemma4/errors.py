"""The errors mlx_gemma4 raises for input it cannot use.

Every one is a `ValueError` subclass whose message names the problem and where it is (the file, the config
field and its allowed range, the message and content item, ...):

    InputError          base class: catch this (plus OSError for missing/unreadable files) to report bad
                        input as one line
      ConfigError       a config.json / GGUF metadata value that is missing, out of range or unsupported
      CheckpointError   weights, tokenizer or template files that are missing, malformed or do not match
                        the config
      MediaError        an image, audio clip or video that cannot be read or used (AudioError: audio)
      PromptCacheError  a prompt-cache file that is malformed or was made with another model or tokenizer

Arguments of the wrong type raise TypeError; files that do not exist raise FileNotFoundError.
"""

from __future__ import annotations

import json
from pathlib import Path


class InputError(ValueError):
    """Input this package cannot use; the message says what is wrong and where."""


class ConfigError(InputError):
    """A checkpoint config this package cannot run faithfully (missing, out of range or unsupported)."""


class CheckpointError(InputError):
    """A checkpoint that can't be loaded as it is; the message lists what is wrong."""


class MediaError(InputError):
    """An image, audio clip or video that cannot be read or used."""


class PromptCacheError(InputError):
    """A prompt-cache file that is malformed or does not belong to the model/tokenizer it is used with."""


def read_json(file, error: type[InputError] | None = None, max_bytes: int = 64 << 20) -> dict:
    """A checkpoint's JSON object file (config.json, tokenizer_config.json, ...): `error` (CheckpointError by
    default) naming the file when it is too large, not UTF-8, not JSON, nested too deeply or not an object."""
    error = error or CheckpointError
    file = Path(file)
    size = file.stat().st_size
    if size > max_bytes:
        raise error(f"{file} is {size} bytes, more than the {max_bytes} a JSON settings file may have")
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{file} is not a text (UTF-8) file: {e}") from e
    except json.JSONDecodeError as e:
        raise error(f"{file} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise error(f"{file} is nested too deeply") from e
    if not isinstance(value, dict):
        raise error(f"{file} must hold a JSON object, not a {type(value).__name__}")
    return value

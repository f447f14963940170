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


# What a caller that reports bad input as one line catches (the CLI and the app do).
EXPECTED_ERRORS = (InputError, OSError, TypeError)

"""Where media come from: local paths, in-memory objects (PIL images, numpy arrays, lists of frames), encoded
file bytes, `data:` URLs, base64 text (an image item's "base64" key) and http(s) URLs.

Remote URLs are fetched (as transformers' processors do), with limits: only `http://` and `https://`, at
most `MAX_FETCH_BYTES` bytes (the declared Content-Length is checked before reading, the body is read in
chunks and cut off past the limit) and `FETCH_TIMEOUT_S` seconds for the whole download. Anything else that
looks like a URL (`file://`, `ftp://`, ...) is refused: local files are given as paths. The
`MLX_GEMMA4_FETCH_URLS=0` environment variable turns fetching off (a URL is then a MediaError); servers that
take media from clients should read only the files their clients uploaded and never pass client-given URLs.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import time
from pathlib import Path

from ..errors import MediaError

MAX_FETCH_BYTES = 200 * 2**20
FETCH_TIMEOUT_S = 30.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:([^,;]*)(;[^,]*)?,", re.DOTALL)


def is_url(source) -> bool:
    return isinstance(source, str) and bool(_URL.match(source) or source.startswith("data:"))


def fetching_enabled() -> bool:
    return os.environ.get("MLX_GEMMA4_FETCH_URLS", "1").strip().lower() not in ("0", "off", "false", "no")


def decode_base64(text: str, what: str = "base64 media") -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{what} is not valid base64 ({e})") from e


def data_url_bytes(url: str) -> bytes:
    """The payload of a `data:[mime][;base64],payload` URL."""
    m = _DATA_URL.match(url)
    if m is None:
        raise MediaError(f"malformed data URL {url[:40]!r}...: expected data:[type][;base64],payload")
    payload = url[m.end():]
    if m.group(2) and "base64" in m.group(2):
        return decode_base64(payload, "data URL payload")
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(payload)


def fetch_url(url: str, *, max_bytes: int = MAX_FETCH_BYTES, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """The body of an http(s) URL, within max_bytes and timeout seconds (MediaError otherwise)."""
    import urllib.error
    import urllib.request

    if not url.lower().startswith(("http://", "https://")):
        scheme = url.split(":", 1)[0]
        raise MediaError(f"cannot read media from a {scheme}: URL ({url!r}); give a local path, an http(s) URL "
                         "or the data itself")
    if not fetching_enabled():
        raise MediaError(f"fetching media from URLs is turned off (MLX_GEMMA4_FETCH_URLS=0): {url}")
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "mlx-gemma4"}),
                                    timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise MediaError(f"{url} is {int(declared)} bytes, more than the {max_bytes}-byte limit for media")
            chunks, size = [], 0
            while chunk := response.read1(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise MediaError(f"{url} is larger than the {max_bytes}-byte limit for media")
                if time.monotonic() > deadline:
                    raise MediaError(f"downloading {url} took longer than {timeout:g} s")
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise MediaError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MediaError(f"cannot fetch {url}: {reason}") from e
    return b"".join(chunks)


def url_bytes(url: str) -> bytes:
    """Bytes behind a data: or http(s) URL."""
    return data_url_bytes(url) if url.startswith("data:") else fetch_url(url)


def resolve_source(item):
    """A media item's source (processing.messages.MediaItem) as the image/audio/video processors read it:
    URLs and base64 text become bytes; paths, bytes and in-memory objects (PIL images, arrays, frame lists)
    pass through."""
    source = item.source
    if item.base64:
        if not isinstance(source, str):
            raise MediaError(f"{item.where}: 'base64' must be a string of base64 text")
        return decode_base64(source, f"{item.where}: the base64 {item.kind}")
    if isinstance(source, str) and is_url(source):
        try:
            return url_bytes(source)
        except MediaError as e:
            raise MediaError(f"{item.where}: {e}") from e
    if isinstance(source, str) and not source.strip():
        raise MediaError(f"{item.where}: the {item.kind} path is empty")
    return source


def file_or_bytes(source, kind: str):
    """(description for messages, what to open) for a media file path or encoded bytes: FileNotFoundError for a
    missing path, MediaError for a directory or empty bytes."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise MediaError(f"{kind} bytes are empty")
        return f"{kind} ({len(source)} bytes)", io.BytesIO(bytes(source))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{kind.capitalize()} file not found: {path}")
    if not path.is_file():
        raise MediaError(f"{kind.capitalize()} path is not a file: {path}")
    return f"{kind} {path}", path

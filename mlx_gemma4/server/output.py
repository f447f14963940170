"""What the model writes, split the way the APIs report it: the thought channel (OpenAI `reasoning_content`,
Anthropic `thinking` blocks), the answer (`content`) and tool calls, as the text streams in.

Gemma 4 writes `<|channel>thought\\n...<channel|>` for its thinking and `<|tool_call>call:name{...}<tool_call|>`
for each tool call (processing.chat.parse_tool_calls reads the argument syntax). Each marker is one control
token, but the detokenizer may hand text over in any pieces, so text that could be the start of a marker (or of
a stop string) is held back until the next piece tells. No marker ever reaches `content`; a tool call that is
malformed or cut off (max_tokens) is reported as content verbatim rather than dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..processing.chat import ToolCall, parse_tool_calls

OPEN_CHANNEL, CLOSE_CHANNEL = "<|channel>", "<channel|>"
OPEN_CALL, CLOSE_CALL = "<|tool_call>", "<tool_call|>"
THOUGHT = "thought\n"  # the channel name Gemma 4 writes after <|channel>


@dataclass
class Delta:
    kind: str  # "content", "reasoning" or "tool_call"
    text: str = ""
    call: ToolCall | None = None


def _partial_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class OutputParser:
    """feed(text) -> [Delta], then finish() -> [Delta]. `stop`: strings that end the answer (OpenAI `stop`,
    Anthropic `stop_sequences`), matched in the content; once one is seen, `stopped_by` holds it and further
    text is ignored (the caller cancels the generation). markup=False: all text is content (raw completions)."""

    def __init__(self, stop: Sequence[str] = (), markup: bool = True):
        self.stop = [s for s in stop if s]
        self.markup = markup
        self.stopped_by: str | None = None
        self._mode = "content"  # "content", "reasoning", "channel_name" or "call"
        self._buffer = ""  # text not yet classified
        self._pending = ""  # content held back while it could be the start of a stop string

    def feed(self, text: str) -> list[Delta]:
        if self.stopped_by is not None:
            return []
        self._buffer += text
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """Everything still held back (an unclosed thought is reasoning; an unclosed call is content)."""
        if self.stopped_by is not None:
            return []
        out: list[Delta] = []
        rest, self._buffer = self._buffer, ""
        if self._mode in ("reasoning", "channel_name"):
            if rest and not THOUGHT.startswith(rest):
                out.append(Delta("reasoning", rest))
        elif self._mode == "call":
            self._content(OPEN_CALL + rest, out)
        else:
            self._content(rest, out)
        if self._pending and self.stopped_by is None:
            out.append(Delta("content", self._pending))
        self._pending = ""
        return [d for d in out if d.text or d.call]

    # ---- the state machine -----------------------------------------------------------------------
    def _step(self, out: list[Delta]) -> bool:
        """Consume what can be classified now; True if the mode changed (call again)."""
        buf = self._buffer
        if not self.markup:
            self._content(buf, out)
            self._buffer = ""
            return False
        if self._mode == "content":
            at = min((i for i in (buf.find(OPEN_CHANNEL), buf.find(OPEN_CALL)) if i >= 0), default=-1)
            if at < 0:
                keep = _partial_suffix(buf, (OPEN_CHANNEL, OPEN_CALL))
                self._content(buf[: len(buf) - keep], out)
                self._buffer = buf[len(buf) - keep:]
                return False
            self._content(buf[:at], out)
            if self.stopped_by is not None:
                return False
            if buf.startswith(OPEN_CHANNEL, at):
                self._mode, self._buffer = "channel_name", buf[at + len(OPEN_CHANNEL):]
            else:
                self._mode, self._buffer = "call", buf[at + len(OPEN_CALL):]
            return True
        if self._mode == "channel_name":
            if THOUGHT.startswith(buf) and len(buf) < len(THOUGHT):
                return False  # may still become the channel name
            self._mode, self._buffer = "reasoning", buf[len(THOUGHT):] if buf.startswith(THOUGHT) else buf
            return True
        if self._mode == "reasoning":
            at = buf.find(CLOSE_CHANNEL)
            if at < 0:
                keep = _partial_suffix(buf, (CLOSE_CHANNEL,))
                if len(buf) > keep:
                    out.append(Delta("reasoning", buf[: len(buf) - keep]))
                self._buffer = buf[len(buf) - keep:]
                return False
            if at:
                out.append(Delta("reasoning", buf[:at]))
            self._mode, self._buffer = "content", buf[at + len(CLOSE_CHANNEL):]
            return True
        # a tool call: wait for its end, then parse it whole
        at = buf.find(CLOSE_CALL)
        if at < 0:
            return False
        block = OPEN_CALL + buf[: at + len(CLOSE_CALL)]
        try:
            out.extend(Delta("tool_call", call=call) for call in parse_tool_calls(block))
        except ValueError:
            self._content(block, out)
        self._mode, self._buffer = "content", buf[at + len(CLOSE_CALL):]
        return True

    def _content(self, text: str, out: list[Delta]) -> None:
        """Emit answer text, holding back what may start a stop string and cutting at one."""
        if not text or self.stopped_by is not None:
            return
        if not self.stop:
            out.append(Delta("content", text))
            return
        pending = self._pending + text
        hits = [(pending.find(s), s) for s in self.stop if s in pending]
        if hits:
            at, stop = min(hits)
            if at:
                out.append(Delta("content", pending[:at]))
            self._pending, self.stopped_by = "", stop
            return
        keep = _partial_suffix(pending, self.stop)
        if len(pending) > keep:
            out.append(Delta("content", pending[: len(pending) - keep]))
        self._pending = pending[len(pending) - keep:]


@dataclass
class ParsedOutput:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    stopped_by: str | None = None


def parse_output(text: str, stop: Sequence[str] = ()) -> ParsedOutput:
    """The whole reply at once (what streaming the same text piece by piece adds up to)."""
    parser = OutputParser(stop)
    return collect([*parser.feed(text), *parser.finish()], parser.stopped_by)


def collect(deltas: Sequence[Delta], stopped_by: str | None = None) -> ParsedOutput:
    return ParsedOutput(content="".join(d.text for d in deltas if d.kind == "content"),
                        reasoning="".join(d.text for d in deltas if d.kind == "reasoning"),
                        tool_calls=[d.call for d in deltas if d.kind == "tool_call"], stopped_by=stopped_by)

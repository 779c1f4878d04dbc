"""The one error type a user sees.

Anything the user can fix (bad input, bad config, missing files) raises `MemshardError` with a
one-line message naming the problem and the fix. The CLI prints it as `error: ...` and exits 2,
without a traceback. Everything else is a bug and keeps its traceback.

The message is made safe where it is made: control characters and line breaks (a file name with a
newline, an escape sequence) are shown escaped, and a message longer than `MAX_MESSAGE_CHARS` keeps
its start and its end (the fix). Code that echoes a user's value uses `shown(value)`, so a huge value
is never formatted in full.
"""

from __future__ import annotations

import reprlib
import unicodedata

MAX_MESSAGE_CHARS = 1000
MAX_SHOWN_CHARS = 80

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_SHOWN_CHARS
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


class MemshardError(Exception):
    """A user-fixable problem; its message is one line that names the problem and the fix."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


def shown(value: object) -> str:
    """`repr(value)` for an error message, at most about MAX_SHOWN_CHARS long, whatever the value."""
    try:
        text = _repr.repr(value)
    except Exception:  # an int past Python's digit limit, a broken __repr__: say what it is instead
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_SHOWN_CHARS + 10 else text[:MAX_SHOWN_CHARS] + "..."


def one_line(text: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one line: line breaks and control characters escaped, the middle cut past `limit`."""
    text = str(text)
    if len(text) > 4 * limit:  # escaping can only lengthen it: cut before, so the work stays bounded
        text = text[:2 * limit] + text[-limit:]
    text = "".join(_escape(c) if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
    if len(text) > limit:
        head = (2 * limit) // 3
        text = f"{text[:head]} ... {text[-(limit - head - 5):]}"
    return text


def _escape(char: str) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": " "}.get(char) or char.encode("unicode_escape").decode("ascii")

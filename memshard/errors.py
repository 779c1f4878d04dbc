"""The one error type a user sees.

Anything the user can fix (bad input, bad config, missing files) raises `MemshardError` with a
one-line message naming the problem and the fix. The CLI prints it as `error: ...` and exits 2,
without a traceback. Everything else is a bug and keeps its traceback.
"""


class MemshardError(Exception):
    """A user-fixable problem; its message is one line that names the problem and the fix."""

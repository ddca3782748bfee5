"""One exception type for bad input: the CLI prints its message as one line and exits non-zero."""


class QtoolError(Exception):
    """A user-facing error. The message names the problem and the fix, in one line."""

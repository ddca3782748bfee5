"""One exception type for bad input: the CLI prints its message as one line and exits non-zero;
an unexpected exception is one line too, its traceback saved by `save_trace`."""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from qtool.core.paths import cache_dir


class QtoolError(Exception):
    """A user-facing error. The message names the problem and the fix, in one line."""


def save_trace(header: str) -> str:
    """Write `header` and the current exception's traceback under the cache's errors/ folder (else the
    temporary directory); returns the file's path."""
    text = f"{header}\n{traceback.format_exc()}"
    for folder in (cache_dir() / "errors", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"qtool-trace-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return "nowhere (no writable cache or temporary directory)"

"""Where qtool keeps converted models and other caches (override with QTOOL_CACHE)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $QTOOL_CACHE, else ~/.cache/qtool."""
    root = os.environ.get("QTOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qtool")
    return Path(root)


def repo_data_dir() -> Path:
    """The bundled data folder: <repo>/data in a checkout, the package's copy when installed."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "data", here.parent / "data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("qtool's bundled data folder is missing; reinstall qtool from a full checkout")

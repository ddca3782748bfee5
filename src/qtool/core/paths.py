"""Where qtool finds its bundled files and keeps its caches.

The bundled files (WikiText-2 and the zero-shot task sets, model configurations, CUDA sources) live
at the top of a checkout (`data/`, `configs/`, `kernels/cuda/`); a wheel carries the same folders
inside the package (`qtool/_data`, `qtool/_configs`, `qtool/kernels/cuda`, mapped in pyproject.toml).
"""

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # .../qtool
_CHECKOUT = _PACKAGE.parents[1]  # <repo> when running from src/qtool
_BUNDLED = {  # name -> (folder inside the installed package, folder in a checkout)
    "data": ("_data", "data"),
    "configs": ("_configs", "configs"),
    "cuda": ("kernels/cuda", "kernels/cuda"),
}


def cache_dir() -> Path:
    """The cache root: $QTOOL_CACHE, else ~/.cache/qtool."""
    root = os.environ.get("QTOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qtool")
    return Path(root)


def bundled_dir(name: str) -> Path:
    """A bundled folder (data, configs or cuda): the installed package's copy, else the checkout's."""
    inside, top = _BUNDLED[name]
    for candidate in (_PACKAGE / inside, _CHECKOUT / top):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"qtool's bundled '{top}' folder is missing; reinstall qtool from a full checkout")

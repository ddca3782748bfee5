"""Text sources, evaluation windows and calibration samples.

The literature protocol for WikiText-2: rows joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of `seqlen` tokens, tail dropped. Calibration draws `n` random windows
with a fixed seed from any text: the bundled valid split (disjoint from test), a .txt file, or a
.jsonl file with a text field.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from qtool.core.errors import QtoolError
from qtool.core.paths import bundled_dir, cache_dir

BUNDLED = {
    "wikitext2-test": "wikitext-2-raw/wiki.test.raw",
    "wikitext2-valid": "wikitext-2-raw/wiki.valid.raw",
}


def _wikitext_rows(path: Path) -> str:
    """A raw WikiText file as the literature reads it: empty lines become empty rows."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "\n\n".join("" if line.strip() == "" else line for line in lines)


def _jsonl_text(path: Path, field: str) -> str:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise QtoolError(f"{path}:{number} is not valid JSON; give one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise QtoolError(
                    f"{path}:{number} has no string field '{field}'; set --text-field to the field holding the text"
                )
            texts.append(record[field])
    return "\n\n".join(texts)


def read_text(source: str, text_field: str = "text") -> str:
    """Text of a bundled split name, a .txt file or a .jsonl file."""
    path = data_path(source)
    if source in BUNDLED:
        text = _wikitext_rows(path)
    else:
        if path.suffix == ".jsonl":
            text = _jsonl_text(path, text_field)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise QtoolError(f"{path} is not UTF-8 text; give a UTF-8 .txt or .jsonl file") from None
    if not text.strip():
        raise QtoolError(f"data '{source}' holds no text; give a file with some text in it")
    return text


def data_path(source: str) -> Path:
    """The file behind a `--data` value: the bundled file of a split name, else the path itself."""
    if source in BUNDLED:
        return bundled_dir("data") / BUNDLED[source]
    path = Path(source).expanduser()
    if not path.is_file():
        known = ", ".join(BUNDLED)
        raise QtoolError(f"data '{source}' not found: give a .txt or .jsonl file, or one of {known}")
    return path


def data_fingerprint(source: str) -> str:
    """sha256 of the bytes of the file behind a `--data` value (bundled splits too), so a stage
    made from other text at the same path is not taken as complete. Data files are small (a few
    MB: milliseconds), so they are hashed on every run."""
    h = hashlib.sha256()
    with data_path(source).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_params(params: dict) -> dict:
    """Fingerprint parameters with the content of their `data` file added as `data_sha` (left out
    when the file is missing: the stage's own read of it then fails with its one-line error)."""
    if not isinstance(params.get("data"), str):
        return params
    try:
        return {**params, "data_sha": data_fingerprint(params["data"])}
    except (QtoolError, OSError):
        return params


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}:{identity}".encode()).hexdigest()[:16]


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, as the literature does (special tokens as the tokenizer adds
    them). Results are cached on disk by tokenizer and text, since a split takes seconds to encode."""
    key = f"{_tokenizer_digest(tokenizer)}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)).long()
        except (OSError, ValueError):
            pass  # a damaged cache entry is simply rebuilt
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, ids.numpy().astype(np.int32 if ids.max() < 2**31 else np.int64))
    os.replace(tmp, path)
    return ids


def _need(ids: torch.Tensor, seqlen: int, source: str) -> None:
    if seqlen < 2:
        raise QtoolError(f"seqlen must be at least 2, got {seqlen}")
    if ids.numel() < seqlen:
        raise QtoolError(
            f"data '{source}' has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            "use a shorter --seqlen or more text"
        )


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None, source: str = "text") -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the start of the text, tail dropped; the first
    `windows` of them when given."""
    _need(ids, seqlen, source)
    total = ids.numel() // seqlen
    n = total if windows is None else min(windows, total)
    if n < 1:
        raise QtoolError(f"--windows must be at least 1, got {windows}")
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, source: str = "text") -> torch.Tensor:
    """`n` windows [n, seqlen] starting at random offsets drawn with `seed` (reproducible)."""
    _need(ids, seqlen, source)
    if n < 1:
        raise QtoolError(f"the number of calibration samples must be at least 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])

"""Read task files (gzip or plain JSONL, label lists) and reject records missing a field.

Every failure is a QtoolError naming the task, the file, the line and what to fix, because
user-supplied task files (`--task-data TASK=PATH`) are the usual source of bad input.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from qtool.core.errors import QtoolError


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _lines(task: str, path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise QtoolError(
            f"{task}: task file {path} does not exist; give an existing JSONL file with --task-data {task}=PATH"
        )
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_no, line
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise QtoolError(
            f"{task}: cannot read {path} ({type(exc).__name__}); give a UTF-8 JSONL file, plain or gzip"
        ) from None


def read_records(task: str, path: Path, fields: tuple[str, ...]) -> list[dict]:
    """Parse one JSON object per line; each must hold `fields` (dotted names reach into nested objects)."""
    records = []
    for line_no, line in _lines(task, path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QtoolError(
                f"{task}: {path} line {line_no} is not valid JSON ({exc.msg}); fix or remove that line"
            ) from None
        if not isinstance(record, dict):
            raise QtoolError(f"{task}: {path} line {line_no} is not a JSON object; each line must be one object")
        for field in fields:
            if not has_field(record, field):
                raise QtoolError(
                    f"{task}: {path} line {line_no} is missing field '{field}'; each line needs {', '.join(fields)}"
                )
        record["_line"] = line_no
        records.append(record)
    if not records:
        raise QtoolError(f"{task}: {path} holds no records; give a non-empty JSONL file")
    return records


def read_labels(task: str, path: Path) -> list[str]:
    """One label per non-empty line (the PIQA/WinoGrande `*-labels.lst` format)."""
    return [line.strip() for _, line in _lines(task, path)]


def has_field(record: dict, dotted: str) -> bool:
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def record_error(task: str, path: Path, record: dict, problem: str) -> QtoolError:
    """An error for a record whose fields are present but unusable."""
    return QtoolError(f"{task}: {path} line {record['_line']} {problem}")

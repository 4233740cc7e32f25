"""Small file helpers: every write is atomic (temp file + rename) so an interrupted run never leaves half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


# ---------------------------------------------------------------------- append-only JSONL (every stage's records)

def resume_jsonl(path: str | os.PathLike) -> list[dict]:
    """The whole records already in a JSONL output, for a stage that resumes. A torn last line (a writer
    killed mid-record) is cut off the file so appends continue after the last whole record; a malformed
    line anywhere else raises CheckpointError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1          # everything after the last newline is a torn record
    records, lines = [], data[:end].split(b"\n")[:-1]
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}:{lineno}: invalid JSON record ({e.msg}); expected one object per line") from None
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return records


def append_jsonl(file, record: dict) -> None:
    """Append one whole record to a file opened for binary append: one write, then flush and fsync, so a
    kill leaves at most a torn last line (which `resume_jsonl` drops)."""
    file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    file.flush()
    os.fsync(file.fileno())

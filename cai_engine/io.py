"""Small file helpers: every write is atomic (temp file + fsync + rename) so an interrupted run never leaves half
a file, and JSONL logs are appended one whole, fsynced record at a time."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() would give: mkstemp's 0600 would hide outputs from the group


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Name the file in a failed write: a full disk (ENOSPC), a size limit (EFBIG) or a read-only folder
    otherwise surfaces as an error without a path, and the user cannot tell what to free or fix."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        reason = e.strerror or errno.errorcode.get(e.errno or 0, "write failed")
        raise OSError(e.errno, f"cannot write {path}: {reason}") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with writing(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
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


# ---------------------------------------------------------------- append-only JSONL (stage outputs, metrics)

def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one whole record as a line and fsync it: a kill leaves at most a torn last line."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, keep=None) -> list[Any]:
    """The whole records of an append-only JSONL file ([] when it does not exist yet), repairing it in place:
    bytes after the last newline (the torn tail of an interrupted append) are cut off, and so is every record
    `keep(record)` rejects (a resumed run drops what came after its checkpoint). A malformed line elsewhere is
    an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1  # bytes up to and including the last newline are whole lines
    records, kept = [], []
    # split on "\n" only: str.splitlines would also split inside records at U+2028 and friends
    for lineno, line in enumerate(raw[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}:{lineno}: invalid JSON record: {e}") from None
        if keep is not None and not keep(record):
            continue
        records.append(record)
        kept.append(line)
    if keep is not None:
        repaired = b"".join(line + b"\n" for line in kept)
        if repaired != raw:
            atomic_write_bytes(path, repaired)
    elif end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return records

"""File helpers shared by the training code: the one reader for user text files (and the error it raises), and
atomic writes, so a crash never leaves a truncated file."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """A problem with the user's data (a split file, an image, the class list or the text corpus), raised with one
    line that names the file and line, the class or the image at fault, before any training starts."""


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of a user file; a missing or non-UTF-8 file is a one-line `DataError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {what}.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start}).") from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` on a temporary file beside `path`, then renames it over `path` (atomic on POSIX).
    If `write` raises, `path` keeps its old content and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, _write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_npz(path: str | os.PathLike, arrays: dict) -> None:
    """`numpy.savez` of `arrays` to `path`, atomically (through a file object: `savez` would add ".npz" to a name)."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, _write)

"""Small file helpers shared by the training scripts: atomic writes, so a crash never leaves a truncated file."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


# ----------------------------------------------------------------------------------------------------------------------
# Reading user text files
# ----------------------------------------------------------------------------------------------------------------------

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_user_text(path: str | os.PathLike, what: str = "file", error: type[Exception] = ValueError) -> str:
    """The text of a file a user wrote (a split list, class names, a corpus, a JSON argument file, a `desc_<i>.txt`
    page), as editors and spreadsheets save it: UTF-8 with or without a byte-order mark, LF, CRLF or CR line ends
    (returned as LF). A missing, unreadable or non-UTF-8 file raises `error` with one line naming the file (and the
    line of the first undecodable byte)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found.") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}.") from None
    except PermissionError:
        raise error(f"{path}: cannot read the {what} (permission denied).") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e}).") from None
    if raw.startswith(_UTF16_BOMS):
        raise error(f"{path}: the {what} is UTF-16 text; save it as UTF-8.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig drops the BOM first
        line = raw.count(b"\n", 0, offset) + 1
        column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
        raise error(
            f"{path}:{line}: not valid UTF-8 text (byte 0x{raw[offset]:02x} at column {column}); save the {what} "
            f"as UTF-8."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def normalize_class_name(name: str) -> str:
    """The form two class names are compared in: case, underscores and runs of white space do not count."""
    return " ".join(name.replace("_", " ").split()).casefold()


def check_class_names(
    names: list[str], source: str | os.PathLike, error: type[Exception] = ValueError, first_line: int | None = 1
) -> None:
    """Refuses a class list that gives no name, an empty name, or the same class twice (compared after
    `normalize_class_name`): one line naming `source` and the line (label `i` is on line `first_line + i`; with
    `first_line=None`, the label is named instead)."""

    def where(i: int) -> str:
        return f"{source}:{first_line + i}" if first_line is not None else f"{source}: label {i}"

    if not names:
        raise error(f"{source}: no class names.")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = normalize_class_name(str(name))
        if not key:
            raise error(f"{where(i)}: empty class name.")
        if key in seen:
            j = seen[key]
            also = "" if names[j] == name else f" (as {names[j]!r}; case, underscores and spacing do not count)"
            raise error(
                f"{where(i)}: class name {name!r} repeats the name of label {j}{also}; every class needs its own "
                f"name: rename one (e.g. add a qualifier, 'crane (bird)')."
            )
        seen[key] = i


def match_corpus_keys(
    corpus: dict, class_names: list[str], source: str | os.PathLike, error: type[Exception] = ValueError
) -> dict:
    """`corpus` with each key that names a class up to case, underscores and spacing rewritten to that class name.
    Two keys that name the same class this way are refused (one line naming both); other keys are left alone."""
    exact = {normalize_class_name(str(n)): n for n in class_names}
    renamed: dict = {}
    origin: dict = {}
    for key, value in corpus.items():
        name = exact.get(normalize_class_name(str(key)), key)
        if name in renamed:
            raise error(
                f"{source}: the keys {origin[name]!r} and {key!r} both name class {name!r} (case, underscores and "
                f"spacing do not count); merge their sentences under one key."
            )
        renamed[name], origin[name] = value, key
    return renamed

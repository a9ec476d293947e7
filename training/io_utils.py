"""File helpers shared by the training code: the one reader for user text files (and the error it raises), and
atomic writes, so a crash never leaves a truncated file."""

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """A problem with the user's data (a split file, an image, the class list or the text corpus), raised with one
    line that names the file and line, the class or the image at fault, before any training starts."""


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a user file (UTF-8, BOM and CRLF tolerated: `read_user_text`); a missing or non-UTF-8 file is a
    one-line `DataError` naming it (and the line)."""
    return read_user_text(path, what, DataError)


# ----------------------------------------------------------------------------------------------------------------------
# Writing: one error for every failed write, whatever the writer raised
# ----------------------------------------------------------------------------------------------------------------------


class WriteError(OSError):
    """Writing `filename` failed. Writers report a full disk (or a file-size limit) in their own ways: `OSError`
    from Python's files and NumPy, `RuntimeError: ... unexpected pos` from `torch.save`'s zip writer, `SafetensorError:
    ... (os error 28)` from safetensors; `writing` turns each into this one error, whose `strerror` says the cause."""


# torch.save's zip writer checks the file position after each record; a short write shows up as this mismatch.
_SHORT_WRITE = re.compile(r"unexpected pos|PytorchStreamWriter failed|file write failed")
_OS_ERROR_CODE = re.compile(r"os error (\d+)|\[Errno (\d+)\]|code: (\d+)")


def describe_write_failure(error: BaseException, path: str | os.PathLike | None = None) -> str:
    """The cause of a failed write in a few words: the system's reason where the writer kept it, else the writer's
    own first line; with a note when the disk that holds `path` is (nearly) full."""
    if isinstance(error, OSError) and error.strerror:
        cause = error.strerror
    else:
        text = str(error).strip()
        code = _OS_ERROR_CODE.search(text)
        number = next((int(g) for g in code.groups() if g), None) if code else None
        if number is not None:
            cause = os.strerror(number)
        elif _SHORT_WRITE.search(text):
            cause = "the file was cut short while writing (a full disk or a file-size limit)"
        else:
            cause = f"{type(error).__name__}: {text.splitlines()[0] if text else 'no message'}"
    if path is not None and "space" not in cause:
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < 64 * 2**20:
            cause += f"; the disk holding it has {free / 2**20:.1f} MB free"
    return cause


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Runs a write of `path` (a file or the folder a `save_pretrained` fills); any exception the writer raises
    becomes a `WriteError` naming `path` and the cause, which the scripts print as one line."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        number = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
        raise WriteError(number, describe_write_failure(e, path), str(path)) from e


def save_pretrained_to(obj, folder: str | os.PathLike) -> None:
    """`obj.save_pretrained(folder)` (a model, tokenizer or image processor), a failed write named by `writing`."""
    with writing(folder):
        obj.save_pretrained(str(folder))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` on a temporary file beside `path`, then renames it over `path` (atomic on POSIX).
    If `write` raises, `path` keeps its old content and the temporary file is removed; a failed write is a
    `WriteError` naming `path`."""
    path = Path(path)
    tmp = None
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
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


def unique_keys(source: str | os.PathLike, error: type[Exception] = ValueError) -> Callable[[list], dict]:
    """A `json.loads` `object_pairs_hook` that refuses an object naming the same key twice (JSON keeps the last one
    silently, which would drop the first one's content): one line naming `source` and the key."""

    def hook(pairs: list) -> dict:
        result = {}
        for key, value in pairs:
            if key in result:
                raise error(f"{source}: the key {key!r} appears twice in one JSON object; keep one (merge them).")
            result[key] = value
        return result

    return hook


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


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------

# The JSON files of a saved model, tokenizer or image processor; a damaged one is named before anything is loaded.
_CHECKPOINT_JSON = (
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "preprocessor_config.json",
    "processor_config.json",
)
_DAMAGED = "the copy or download was interrupted or the file was damaged: copy or download it again"


def safetensors_fault(path: str | os.PathLike) -> str | None:
    """What is wrong with a `.safetensors` file (cut short, damaged header), or None. Reads only its header: the
    8-byte header length, the JSON header, and the file size its tensors' `data_offsets` imply."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes, not even a header)"
        header_length = int.from_bytes(head, "little")
        if header_length > size - 8:
            return f"is cut short ({size:,} bytes; its header alone needs {header_length + 8:,})"
        try:
            header = json.loads(f.read(header_length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "has a damaged header"
    if size < 8 + header_length + end:
        return f"is cut short ({size:,} of {8 + header_length + end:,} bytes)"
    return None


def _looks_local(path: str) -> bool:
    """A path no Hub model id can be: absolute, relative to `.` / `..` / `~`, with a backslash, or with more than
    one `/` (an id is `name` or `org/name`)."""
    return (
        os.path.isabs(path)
        or path.startswith(("./", "../", "~", ".\\", "..\\"))
        or path in (".", "..")
        or "\\" in path
        or path.count("/") > 1
    )


# Any one of these makes a tokenizer: the fast tokenizer's file, a BPE / WordPiece vocabulary, a SentencePiece model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


def is_trainer_checkpoint(folder: str | os.PathLike) -> bool:
    """A `checkpoint-N` folder the Trainer writes during a run (weights, optimizer state, trainer_state.json)."""
    folder = Path(folder)
    return folder.name.startswith("checkpoint-") and (folder / "trainer_state.json").is_file()


def _check_label_map(file: Path, config: dict, error: type[Exception]) -> None:
    """A hand-edited `id2label` must number the classes 0..N-1, one name each (from_pretrained keeps any keys, and
    every use of the classes indexes them from 0)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return
    try:
        ids = sorted(int(k) for k in id2label)
    except (TypeError, ValueError):
        bad = next(k for k in id2label if not str(k).lstrip("-").isdigit())
        raise error(f"{file}: id2label key {bad!r} is not a class id; number the classes 0..N-1.") from None
    if ids != list(range(len(ids))):
        missing = sorted(set(range(len(ids))) - set(ids))
        raise error(
            f"{file}: id2label numbers its {len(ids)} classes {ids[0]}..{ids[-1]}"
            f"{f' (no id {missing[0]})' if missing else ''}; the ids must be exactly 0..{len(ids) - 1}, one per "
            f"class, in label order (label2id likewise)."
        )


def check_checkpoint_folder(
    path: str | os.PathLike,
    what: str = "checkpoint",
    error: type[Exception] = ValueError,
    weights: bool = True,
    tokenizer: bool = False,
) -> None:
    """Refuses a local checkpoint folder whose config, weights (with `weights`) or tokenizer / image-processor files
    are missing, cut short or not valid JSON, whose `id2label` is not numbered 0..N-1, or (with `tokenizer`) that
    holds no tokenizer, in one line naming the file and the fix (for a Trainer `checkpoint-N` folder: the run's
    output folder to pass instead). A Hub name (not a local folder) is left to `from_pretrained`."""
    folder = Path(path)
    if folder.is_file():
        raise error(f"{what} {folder} is a file: pass the checkpoint folder (the one holding config.json).")
    if not folder.is_dir():
        if _looks_local(str(path)):
            raise error(f"{what} {path}: no such folder (and not a Hub model id of the form org/name).")
        return
    if not (folder / "config.json").is_file():
        raise error(
            f"{what} {folder}: no config.json; not a folder written by save_pretrained (or the copy is incomplete): "
            f"point at the checkpoint folder itself, or copy it again."
        )
    for name in _CHECKPOINT_JSON:
        file = folder / name
        if not file.exists():
            continue
        try:
            content = json.loads(file.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise error(f"{file}: not valid UTF-8; {_DAMAGED}.") from None
        except json.JSONDecodeError as e:
            raise error(f"{file}:{e.lineno}: not valid JSON ({e.msg}); {_DAMAGED}.") from None
        except OSError as e:
            raise error(f"{file}: cannot read it ({e.strerror or e}).") from None
        if name == "config.json" and isinstance(content, dict):
            _check_label_map(file, content, error)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if is_trainer_checkpoint(folder):
            final = folder.parent
            done = (final / "config.json").is_file() and any((final / n).is_file() for n in TOKENIZER_FILES)
            instead = (
                f"pass the run's output folder {final} instead (written when the run finished)"
                if done
                else f"finish that run first (--resume_from_checkpoint {folder} with its --output_dir {final}), "
                f"then pass {final}"
            )
            raise error(
                f"{what} {folder} is a Trainer checkpoint-N folder: it holds the weights and optimizer state but no "
                f"tokenizer, which this step needs: {instead}."
            )
        raise error(
            f"{what} {folder}: no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])}, ...); this step "
            f"tokenises text: copy the tokenizer files of the CLIP it was made from into the folder "
            f"(AutoTokenizer.from_pretrained(clip).save_pretrained(folder))."
        )
    if not weights:
        return
    files = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8-sig")).get("weight_map", {}).values()
        files = [folder / shard for shard in sorted(set(shards))]
    elif not files[0].is_file():
        if (folder / "pytorch_model.bin").is_file():
            return
        raise error(
            f"{what} {folder}: no model.safetensors (the weights); the copy is incomplete or the run that wrote it "
            f"stopped before saving: copy it again, or use one of its checkpoint-N folders."
        )
    for file in files:
        if not file.is_file():
            raise error(f"{file}: missing (listed in {index.name}); copy the checkpoint again.")
        fault = safetensors_fault(file)
        if fault:
            raise error(f"{file} {fault}; {_DAMAGED}.")

"""Published descriptor files (one JSON object: class name → list of attribute phrases, as Menon & Vondrick,
"Visual Classification via Description from Large Language Models", ICLR 2023, and CuPL released them) turned into
sentences the way Menon & Vondrick prompt CLIP with them: "tench, which has small eyes."
"""

import json
import os

from transformers.utils import logging

from ..io_utils import DataError, read_text_file, unique_keys
from .classes import RANK_NAMES, ClassEntry, NameMatcher

logger = logging.get_logger(__name__)


def descriptor_clause(descriptor: str) -> str:
    """The clause after the class name, by Menon & Vondrick's rule (`make_descriptor_sentence`,
    sachit-menon/classify_by_description_release `descriptor_strings.py` L43-51), kept as written there: a phrase starting
    with the letter "a" (not only the word) takes "which is", as does one starting with "used"; one starting with
    "has", "often", "typically", "may" or "can" takes "which"; any other takes "which has"."""
    if descriptor.startswith("a") or descriptor.startswith("used"):
        return f"which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f"which {descriptor}"
    return f"which has {descriptor}"


def descriptor_sentence(class_name: str, descriptor: str) -> str:
    """`"{class}, {clause}."`: their prompt is the class name, ", " and the clause (`load.py` L57-62: between_text
    ", ", after_text ""); the full stop ends a sentence
    for the sentence splitter and the corpus."""
    descriptor = " ".join(descriptor.split()).rstrip(".")
    return f"{class_name}, {descriptor_clause(descriptor)}."


def read_descriptors(path: str | os.PathLike) -> dict[str, list[str]]:
    """The file's class → phrases; a malformed file is one line naming the file and the fault."""
    try:
        data = json.loads(read_text_file(path, "descriptor file"), object_pairs_hook=unique_keys(path, DataError))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}); a descriptor file is one JSON object."
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a JSON object mapping class name to a list of descriptor phrases, got a "
            f"{type(data).__name__}."
        )
    for key, phrases in data.items():
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise DataError(f"{path}: the entry for class {key!r} must be a list of descriptor phrases (strings).")
    return data


KEY_RULES = ("name", "order")


def descriptor_sentences(
    entries: list[ClassEntry], path: str | os.PathLike, keys: str = "name"
) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Each class's descriptor sentences. With `keys="name"` the file's keys are matched to classes by the package's
    one naming rule (exact, then case-folded, then a WordNet lemma name: `NameMatcher`); with `keys="order"` the
    file's i-th key is class i, for files that list every class in the class list's order under other names (Menon &
    Vondrick's ImageNet file uses CLIP's curated names: "rooster" for WordNet's "cock"). Returns the sentences and,
    per matched class, which key matched and how."""
    data = read_descriptors(path)
    if keys not in KEY_RULES:
        raise DataError(f"--descriptor_keys {keys}: expected one of {', '.join(KEY_RULES)}.")
    if keys == "order":
        if len(data) != len(entries):
            raise DataError(
                f"{path}: --descriptor_keys order needs one key per class, in class order; the file has {len(data)} "
                f"keys for {len(entries)} classes."
            )
        chosen = dict(enumerate(data))
        how = {c: f"key {key!r} (position {c})" for c, key in chosen.items()}
    else:
        matcher = NameMatcher(entries)
        chosen = {}
        for key in data:
            for c in matcher.offer(key):
                chosen[c] = key
        how = {c: f"key {key!r} ({RANK_NAMES[rank]})" for c, (rank, key) in matcher.best.items()}
        position = {key: i for i, key in enumerate(data)}
        in_place = sum(position[key] == c for c, key in chosen.items())
        if len(chosen) < len(entries) and len(data) == len(entries) and in_place >= 0.9 * len(chosen):
            logger.warning(
                f"{path}: {len(entries) - len(chosen)} class(es) match no key by name, but the file has one key per "
                f"class and {in_place} of the {len(chosen)} matched keys sit at their class's position: "
                f"--descriptor_keys order matches every class by position."
            )
    sentences = {
        c: [descriptor_sentence(entries[c].subject, p) for p in data[key] if p.strip()] for c, key in chosen.items()
    }
    return sentences, how

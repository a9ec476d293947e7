"""The class list a corpus is described for, and the one rule every source matches class names by.

A class-list line is a class name (as `--class_names` files are everywhere in the package), or a WordNet id and
the names the ImageNet lists give ("n01440764 tench, Tinca tinca"), or a WordNet id alone.
"""

import os
import re
from dataclasses import dataclass, field

from ..io_utils import DataError, check_class_names, normalize_class_name, read_text_file
from .wordnet import WNID, WordNet

_WNID_LINE = re.compile(r"(n\d{8})(?:\s+(.*))?")
_QUALIFIER = re.compile(r"\s*\([^)]*\)\s*$")


@dataclass
class ClassEntry:
    """One class: its `name` (the corpus key), its WordNet id if the list gave one, the other names the list gave
    (`aliases`, e.g. "Tinca tinca"), and the WordNet lemma names of its synset once found (`lemmas`)."""

    name: str
    wnid: str | None = None
    aliases: list[str] = field(default_factory=list)
    lemmas: list[str] = field(default_factory=list)

    @property
    def subject(self) -> str:
        """The name as sentences use it: without a trailing qualifier ("crane (bird)" → "crane")."""
        return _QUALIFIER.sub("", self.name) or self.name


def read_class_list(path: str | os.PathLike, wordnet: WordNet | None = None) -> list[ClassEntry]:
    """The classes of `path`, line i = label i. A plain line is a class name (underscores read as spaces, as
    `splits.read_class_names` reads them). A `wnid names` line takes the first comma-separated name ("n01440764
    tench, Tinca tinca" → "tench"; the others are aliases); a wnid alone takes its synset's first lemma name (this
    needs `wordnet`). Where that leaves two classes with one name (ImageNet has two "crane" and two "maillot"
    synsets), each gets its next alias or else its wnid as a qualifier: "maillot (tank suit)", "crane (n02012849)".
    """
    lines = read_text_file(path, "class-name file").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    entries = []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip().rstrip("|").strip()  # some synset_words.txt copies end each line with "|"
        if not text:
            raise DataError(f"{path}:{lineno}: empty class name.")
        match = _WNID_LINE.fullmatch(text)
        if match is None:
            entries.append(ClassEntry(text.replace("_", " ")))
            continue
        wnid, names = match.group(1), match.group(2)
        aliases = [" ".join(n.replace("_", " ").split()) for n in (names or "").split(",") if n.strip()]
        if not aliases:
            synset = wordnet.by_wnid(wnid) if wordnet is not None else None
            if synset is None:
                why = "which WordNet does not have" if wordnet is not None else "and no WordNet database to name it"
                raise DataError(f"{path}:{lineno}: wnid {wnid} without a name, {why}; write 'wnid name' lines.")
            aliases = [synset.lemmas[0]]
        entries.append(ClassEntry(aliases[0], wnid, aliases[1:]))
    if not entries:
        raise DataError(f"{path}: no class names.")
    _qualify_repeated_names(entries)
    check_class_names([e.name for e in entries], path, DataError)
    return entries


def _qualify_repeated_names(entries: list[ClassEntry]) -> None:
    groups: dict[str, list[ClassEntry]] = {}
    for entry in entries:
        groups.setdefault(normalize_class_name(entry.name), []).append(entry)
    for group in groups.values():
        if len(group) > 1 and all(e.wnid for e in group):
            for entry in group:
                entry.name = f"{entry.name} ({entry.aliases[0] if entry.aliases else entry.wnid})"


def candidate_names(entry: ClassEntry) -> list[tuple[str, int]]:
    """The names a source's key (an article title, a descriptor file's class) may match `entry` by, each with its
    rank (lower is better): 0 the class name or an alias as written, 1 the same up to case, underscores and
    spacing (`normalize_class_name`), 2 a WordNet lemma name of its synset up to case."""
    written = [entry.name, entry.subject, *entry.aliases]
    return [(n, 0) for n in written] + [(n, 1) for n in written] + [(n, 2) for n in entry.lemmas]


class NameMatcher:
    """Finds the classes a key names, by `candidate_names`' ranks; each class keeps its best-ranked key, the first
    one seen among equals (`offer`)."""

    def __init__(self, entries: list[ClassEntry]):
        self.exact: dict[str, set[int]] = {}
        self.folded: dict[str, dict[int, int]] = {}
        for c, entry in enumerate(entries):
            for name, rank in candidate_names(entry):
                if rank == 0:
                    self.exact.setdefault(name, set()).add(c)
                else:
                    ranks = self.folded.setdefault(normalize_class_name(name), {})
                    ranks[c] = min(rank, ranks.get(c, rank))
        self.best: dict[int, tuple[int, str]] = {}  # class -> (rank, key)

    def ranks(self, key: str) -> dict[int, int]:
        found = dict(self.folded.get(normalize_class_name(key), {}))
        found.update({c: 0 for c in self.exact.get(key, ())})
        return found

    def offer(self, key: str) -> list[int]:
        """Records `key` for each class it names better than that class's key so far; returns those classes."""
        taken = []
        for c, rank in self.ranks(key).items():
            if c not in self.best or rank < self.best[c][0]:
                self.best[c] = (rank, key)
                taken.append(c)
        return taken

    def all_exact(self, num_classes: int) -> bool:
        return len(self.best) == num_classes and all(rank == 0 for rank, _ in self.best.values())


RANK_NAMES = {0: "exact", 1: "case-folded", 2: "WordNet lemma"}


def is_wnid(text: str) -> bool:
    return WNID.fullmatch(text) is not None

"""WordNet 3.0 noun synsets read straight from the database files (`data.noun`, `index.noun`, `noun.exc`, format
wndb(5)), and the sentences a synset gives a class: its gloss, its usage examples, its other lemma names and its
hypernym chain.

ImageNet's wnids are WordNet noun synsets: `n01440764` is the synset at byte offset 01440764 of `data.noun`. A class
named without a wnid is looked up by lemma (see `WordNet.lookup`).
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..io_utils import DataError

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
WORDNET_HELP = (
    "install Debian's wordnet-base (apt-get install wordnet-base), unpack the WordNet 3.0 tarball from Princeton "
    "(its dict/ folder), or point --wordnet_dir at nltk's corpora/wordnet folder"
)
WNID = re.compile(r"n(\d{8})")

# Synsets above these say nothing about what a thing looks like ("a tench is a kind of physical entity").
_TOO_GENERAL = {
    "entity", "physical entity", "abstraction", "object", "whole", "thing", "matter", "living thing", "organism",
    "being", "artifact", "artefact", "causal agent", "cause", "causal agency", "psychological feature", "attribute",
    "relation", "communication", "measure", "group", "grouping", "unit", "physical object",
}  # fmt: skip

# Noun endings and their base forms, tried in this order after the exception list (WordNet's own morphy rules for
# nouns, wnintro(3) / morph(7WN)).
_NOUN_SUFFIXES = (("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
                  ("ies", "y"), ("s", ""))  # fmt: skip


@dataclass
class Synset:
    """One noun synset of `data.noun`: its lemma names (spaces, not underscores), gloss definition, usage examples
    and the offsets of its hypernyms (`@`) and instance hypernyms (`@i`)."""

    offset: int
    lemmas: list[str]
    definition: str
    examples: list[str]
    hypernyms: list[int]
    instance_of: list[int]

    @property
    def wnid(self) -> str:
        return f"n{self.offset:08d}"


@dataclass
class Match:
    """How a class was found: by `wnid`, or by `lemma` (the lemma tried and how many noun senses it has)."""

    synset: Synset
    how: str  # "wnid" or "lemma"
    lemma: str | None = None
    num_senses: int = 1
    plural: bool = False  # found through a base form ("geese" → "goose"): the class name is a plural


def parse_data_line(line: str) -> Synset:
    """A `data.noun` line (wndb(5)): `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ptr... | gloss`."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, w_cnt = int(fields[0]), int(fields[3], 16)  # w_cnt is two hexadecimal digits
    words = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
    i = 4 + 2 * w_cnt
    p_cnt = int(fields[i])  # three decimal digits
    hypernyms, instance_of = [], []
    for j in range(p_cnt):  # each pointer: symbol, target offset, part of speech, source/target
        symbol, target, pos = fields[i + 1 + 4 * j : i + 4 + 4 * j]
        if pos == "n" and symbol == "@":
            hypernyms.append(int(target))
        elif pos == "n" and symbol == "@i":
            instance_of.append(int(target))
    # the gloss: a definition, then zero or more quoted examples, separated by "; "
    parts = [p.strip() for p in gloss.strip().split("; ")]
    definition = "; ".join(p for p in parts if not p.startswith('"'))
    examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
    return Synset(offset, words, definition, [e for e in examples if e], hypernyms, instance_of)


class WordNet:
    """Noun synsets of a WordNet 3.0 database folder. `data.noun` is read by seeking to a synset's offset;
    `index.noun` (lemma → senses) is read once, on the first lookup by lemma."""

    def __init__(self, folder: str | os.PathLike = DEFAULT_WORDNET_DIR):
        self.folder = Path(folder)
        missing = [name for name in ("data.noun", "index.noun") if not (self.folder / name).is_file()]
        if missing:
            raise DataError(
                f"--wordnet_dir {self.folder}: no WordNet database there (missing {', '.join(missing)}); "
                f"{WORDNET_HELP}."
            )
        self._data = open(self.folder / "data.noun", "rb")
        self._cache: dict[int, Synset] = {}
        self._index: dict[str, list[int]] | None = None
        self._exceptions: dict[str, list[str]] | None = None

    def close(self) -> None:
        self._data.close()

    def synset(self, offset: int) -> Synset | None:
        """The synset at `offset` of `data.noun`, or None when no synset starts there (a wrong wnid)."""
        if offset not in self._cache:
            self._data.seek(offset)
            line = self._data.readline().decode("utf-8", errors="replace")
            if not line.startswith(f"{offset:08d} ") or line.startswith("  "):
                return None
            self._cache[offset] = parse_data_line(line)
        return self._cache[offset]

    def by_wnid(self, wnid: str) -> Synset | None:
        match = WNID.fullmatch(wnid)
        return self.synset(int(match.group(1))) if match else None

    def senses(self, lemma: str) -> list[int]:
        """The noun synset offsets of `lemma` (any case, spaces or underscores) in WordNet's sense order."""
        if self._index is None:
            self._index = {}
            with open(self.folder / "index.noun", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("  "):  # the licence header
                        continue
                    # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
                    fields = line.split()
                    synset_cnt, p_cnt = int(fields[2]), int(fields[3])
                    self._index[fields[0]] = [int(o) for o in fields[6 + p_cnt : 6 + p_cnt + synset_cnt]]
        return self._index.get("_".join(lemma.casefold().split()), [])

    def base_forms(self, word: str) -> list[str]:
        """`word` as WordNet's morphy finds noun lemmas: the exception list (`noun.exc`, "mice" → "mouse"), then
        the regular plural endings."""
        if self._exceptions is None:
            self._exceptions = {}
            path = self.folder / "noun.exc"
            if path.is_file():
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    inflected, *bases = line.split()
                    self._exceptions[inflected] = bases
        key = "_".join(word.casefold().split())
        forms = [b.replace("_", " ") for b in self._exceptions.get(key, [])]
        forms += [
            word[: -len(end)] + base for end, base in _NOUN_SUFFIXES if word.endswith(end) and len(word) > len(end)
        ]
        return forms

    def lookup(self, name: str, wnid: str | None = None) -> Match | None:
        """The synset of a class. With a wnid, that synset (None if `data.noun` has none at its offset). Without,
        by lemma, trying in turn: the name as written; each of its comma-separated names ("tench, Tinca tinca");
        the name without a trailing parenthesised qualifier ("crane (bird)" → "crane"); the base forms of each of
        these ("geese" → "goose"). The first lemma WordNet knows is used, and of its noun senses:

        1. with a qualifier, the first sense whose definition or hypernyms mention it ("crane (bird)" → the bird);
        2. else the first sense that is not an instance (a named person or place: "crane" → a common noun's sense
           before the poet Hart Crane);
        3. else the first sense.

        WordNet lists senses most frequent first (by their counts in the sense-tagged SemCor corpus), so rule 2 is
        the most common common-noun meaning. A class whose lemma has several senses is flagged in the coverage
        report (`ambiguous`) so that a wnid or a qualifier can be given instead."""
        if wnid is not None:
            synset = self.by_wnid(wnid)
            return Match(synset, "wnid") if synset is not None else None
        qualifier = re.search(r"\(([^)]*)\)\s*$", name)
        qualifier = qualifier.group(1).strip().casefold() if qualifier else ""
        bare = re.sub(r"\s*\([^)]*\)\s*$", "", name)
        candidates = [name, bare, *(part for part in bare.split(",") if "," in bare)]
        candidates = list(dict.fromkeys(" ".join(c.split()) for c in candidates if c.strip()))
        tried = [(c, False) for c in candidates] + [(f, True) for c in candidates for f in self.base_forms(c)]
        for lemma, inflected in tried:
            synsets = [s for s in map(self.synset, self.senses(lemma)) if s is not None]
            if not synsets:
                continue
            chosen = None
            if qualifier:
                chosen = next((s for s in synsets if qualifier in self._about(s)), None)
            chosen = chosen or next((s for s in synsets if not s.instance_of), synsets[0])
            return Match(chosen, "lemma", lemma, len(synsets), plural=inflected)
        return None

    def _about(self, synset: Synset) -> str:
        """The definition and every ancestor's lemma names of `synset`, lower case: what a qualifier is sought in."""
        words = [
            synset.definition,
            *(lemma for s in self.hypernym_chain(synset, 50, general=True) for lemma in s.lemmas),
        ]
        return " | ".join(words).casefold()

    def hypernym_chain(self, synset: Synset, depth: int, general: bool = False) -> list[Synset]:
        """Up to `depth` ancestors, each the first (instance) hypernym of the one before, stopping at the very
        general top of the hierarchy (entity, object, organism, artifact, ...) unless `general`."""
        chain, current = [], synset
        while len(chain) < depth:
            parents = current.instance_of or current.hypernyms
            if not parents:
                break
            current = self.synset(parents[0])
            if current is None or (not general and current.lemmas[0].casefold() in _TOO_GENERAL):
                break
            chain.append(current)
        return chain


# ----------------------------------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------------------------------

# Gloss openings that already carry their determiner: "any of various fishes" → "A dace is any of various fishes".
_DETERMINED = re.compile(r"^(a|an|the|any|one|either|each|some|someone|something|anything|all|two|three)\b", re.I)


def indefinite(phrase: str) -> str:
    """`phrase` with "a" or "an" before it, chosen by its first letter (a vowel letter takes "an")."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(" ;,")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def synset_sentences(name: str, synset: Synset, chain: list[Synset], plural: bool = False) -> list[str]:
    """The sentences of a class `name` from its synset, each naming the class:

    - the gloss: "A tench is a freshwater dace-like game fish of Europe and western Asia noted for ...";
    - the other lemma names: "A tench is also called Tinca tinca.";
    - the hypernym chain, one sentence a level: "A tench is a kind of cyprinid.", "A tench is a kind of fish.";
    - the usage examples as WordNet gives them (they use the word in context; they may not name the class).

    A plural name (`plural`: "geese") takes no article and "are": "Geese are web-footed long-necked ... birds."
    """
    subject, verb = (name, "are") if plural else (indefinite(name), "is")
    sentences = []
    definition = re.sub(r"^\([^)]*\)\s*", "", synset.definition)  # "(usually plural) close-fitting trousers"
    if definition:
        if not (plural or _DETERMINED.match(definition)):
            definition = indefinite(definition)
        sentences.append(_sentence(f"{subject} {verb} {definition}"))
    others = [
        lemma
        for lemma in synset.lemmas
        if lemma.casefold() not in (name.casefold(), synset.lemmas[0].casefold() if plural else "")
    ]
    if others:
        names = others[0] if len(others) == 1 else ", ".join(others[:-1]) + " or " + others[-1]
        sentences.append(_sentence(f"{subject} {verb} also called {names}"))
    for ancestor in chain:
        kind = "an instance" if ancestor.offset in synset.instance_of else "a kind"
        sentences.append(_sentence(f"{subject} {verb} {kind} of {ancestor.lemmas[0]}"))
    sentences += [_sentence(example) for example in synset.examples]
    return [s for s in sentences if s]

"""The lead section of each class's Wikipedia article, from a dump loaded with 🤗 datasets and streamed, so memory
holds only the matched leads whatever the dump's size.

The dump is a Hub dataset such as `wikimedia/wikipedia` (config `20231101.en`) or a local parquet / JSON(-lines)
file or folder, with a `title` and a `text` column.
"""

import re
from pathlib import Path

import datasets
from transformers.utils import logging

from ..corpus import split_sentences
from ..io_utils import DataError
from .classes import RANK_NAMES, ClassEntry, NameMatcher

logger = logging.get_logger(__name__)

_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
# A disambiguation page lists meanings; it describes none of them.
_DISAMBIGUATION = re.compile(r"\bmay (also )?refer to\b|\bmay mean\b|\(disambiguation\)", re.I)


def open_dump(name: str, config: str | None, split: str = "train") -> datasets.IterableDataset:
    """The dump as a streamed dataset: a local file or folder of parquet / JSON files, else a Hub dataset."""
    path = Path(name)
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _FORMATS)
        kinds = {_FORMATS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) > 1:
            raise DataError(
                f"--wikipedia {name}: expected parquet or JSON(-lines) files (one kind) with title and text columns."
            )
        dump = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split=split, streaming=True)
    else:
        try:
            dump = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # an unknown name, no network, a wrong config: one line naming the dump
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"--wikipedia {name} (config {config}): cannot open the dump ({message}).") from None
    columns = dump.column_names
    if columns is not None and not {"title", "text"} <= set(columns):
        raise DataError(f"--wikipedia {name}: the dump has columns {columns}; it needs 'title' and 'text'.")
    return dump


def lead_section(text: str) -> str:
    """The article text before its first section heading. Headings are `== ... ==` lines in wikitext-style dumps;
    in `wikimedia/wikipedia`'s plain text they are short lines of their own (under 10 words, no closing
    punctuation) after a blank line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        heading = next((i for i, line in enumerate(lines) if line.startswith("==")), None)
        if heading is None and len(lines) == 1 and len(lines[0].split()) < 10 and lines[0][-1] not in ".!?:;\"')":
            heading = 0  # a plain-text heading: a short line of its own
        if heading is not None:
            if lines[:heading]:
                paragraphs.append(" ".join(lines[:heading]))
            if paragraphs:
                break
            continue  # a heading before any text (a stray title line)
        if lines:
            paragraphs.append(" ".join(lines))
    return "\n".join(paragraphs)


def wikipedia_sentences(
    entries: list[ClassEntry], name: str, config: str | None = None, max_articles: int | None = None
) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Each class's lead-section sentences (split with the package's `split_sentences`) from the article whose
    title matches it: exact, then case-folded, then a WordNet lemma name of its synset (`NameMatcher`); a
    disambiguation page never matches. The dump is read once, stopping early when every class has an exact match.
    Returns the sentences and, per matched class, which title matched and how."""
    dump = open_dump(name, config)
    matcher = NameMatcher(entries)
    leads: dict[int, str] = {}
    total = None
    info = getattr(dump, "info", None)
    if info is not None and info.splits and "train" in info.splits:
        total = info.splits["train"].num_examples or None
    for i, row in enumerate(logging.tqdm(dump, desc="Wikipedia articles", total=total, unit=" articles")):
        if max_articles is not None and i >= max_articles:
            break
        title = row.get("title")
        if not isinstance(title, str) or not matcher.ranks(title):
            continue
        lead = lead_section(row.get("text") or "")
        if not lead or _DISAMBIGUATION.search(title) or _DISAMBIGUATION.search(lead[:300]):
            continue
        for c in matcher.offer(title):
            leads[c] = lead
        if matcher.all_exact(len(entries)):
            break
    sentences = {c: [s for p in lead.splitlines() for s in split_sentences(p)] for c, lead in leads.items()}
    how = {c: f"title {key!r} ({RANK_NAMES[rank]})" for c, (rank, key) in matcher.best.items()}
    return sentences, how

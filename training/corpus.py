"""The class text corpus: CLIP's prompt templates, class descriptions (a JSON file or the official `desc_<i>.txt`
Wikipedia pages), sentence splitting, and the tokenised corpus with its cache.

`load_corpus` is what the scripts call; every user-data error is a one-line `DataError` naming the file or class.
"""

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .arguments import CorpusArguments
from .io_utils import DataError, atomic_write, match_corpus_keys, read_text_file, unique_keys

logger = logging.get_logger(__name__)

# CLIP's text context: [SOT] + 75 tokens + [EOT] (OpenAI CLIP; official `mcloader/classification.py`
# `SentPreProcessor`, context_length 75 + 2).
CLIP_CONTEXT_LENGTH = 77

# CLIP's 80 ImageNet prompt templates (Radford et al. 2021; reference `mcloader/prompt_template.py`).
IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]  # fmt: skip

# LIFT's ways of writing each class's text for the head's initialisation (shijxcs/LIFT `trainer.py`
# `init_head_text_feat`, `utils/config.py` `prompt`).
LIFT_PROMPT_MODES = ("default", "classname", "ensemble", "descriptor")
LIFT_DEFAULT_TEMPLATE = "a photo of a {}."


def lift_prompts(
    mode: str, class_names: list[str], templates: list[str] | None = None, descriptors: str | os.PathLike | None = None
) -> list[list[str]]:
    """The prompts of each class whose normalised text embeddings LIFT averages into the head's initial row:
    `default` ["a photo of a {name}."], `classname` [name], `ensemble` the 80 CLIP ImageNet templates, `descriptor`
    the class's phrases in the `descriptors` JSON file (class name -> list of phrases, keys matched up to case,
    underscores and spacing), each phrase as it is. `templates` (own '{}' prompts; ["imagenet"] = the 80) replaces
    the mode. As LIFT, underscores in class names become spaces. A class missing from the file, or with no phrase,
    is a `DataError` naming the file and the class."""
    names = [name.replace("_", " ") for name in class_names]
    if mode == "descriptor":
        return _descriptor_prompts(Path(descriptors), class_names)
    if templates is not None:
        templates = IMAGENET_TEMPLATES if templates == ["imagenet"] else templates
    elif mode == "ensemble":
        templates = IMAGENET_TEMPLATES
    elif mode == "classname":
        templates = ["{}"]
    elif mode == "default":
        templates = [LIFT_DEFAULT_TEMPLATE]
    else:
        raise ValueError(f"prompt mode must be one of {LIFT_PROMPT_MODES}, got {mode!r}.")
    return [[template.format(name) for template in templates] for name in names]


def _descriptor_prompts(path: Path, class_names: list[str]) -> list[list[str]]:
    try:
        data = json.loads(read_text_file(path, "descriptor file"), object_pairs_hook=unique_keys(path, DataError))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping each class name to a list of phrases.")
    data = match_corpus_keys(data, class_names, path, DataError)
    prompts = []
    for name in class_names:
        phrases = data.get(name)
        if phrases is None:
            raise DataError(f"{path}: no phrases for class {name!r} (--prompt_mode descriptor needs every class).")
        if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise DataError(f"{path}: class {name!r} must map to a non-empty list of non-empty phrases.")
        prompts.append([p.replace("_", " ") for p in phrases])  # LIFT formats each phrase as a class name
    return prompts


# Wikipedia sections the reference preprocessing drops (`mcloader/preprocess.py`).
DROPPED_SECTIONS = ("references", "external links", "further reading", "bibliography")

# A sentence ends after "." or "?" followed by white space or a capital letter, except after an abbreviation like
# "e.g." or a capital letter and a full stop (an initial, and also the end of an acronym: "the USA. It" stays one
# sentence). This is the reference `SentPreProcessor.split_sent` pattern (`mcloader/preprocess.py` L57-64), verbatim.
_SENTENCE_END = re.compile(r"(?<!\w\.\w.)(?<!([A-Z][a-z])|([A-Z])\.)(?<=\.|\?)(?=[\sA-Z])", re.X)


def split_sentences(text: str) -> list[str]:
    # the pattern's groups sit in a negative look-behind: `re.split` returns them as None
    return [s.strip() for s in _SENTENCE_END.split(text) if s is not None and s.strip()]


def wikipedia_text(text: str) -> str:
    """The summary plus every section except References / External links / Further reading / Bibliography.
    Lines starting with "==" are section headers (their own text is not kept)."""
    kept, dropped_level = [], None  # level ("==" = 2) of the dropped section we are in, if any
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("=="):
            level = len(stripped) - len(stripped.lstrip("="))
            if dropped_level is not None and level > dropped_level:
                continue  # a sub-section of a dropped section stays dropped
            dropped_level = level if stripped.strip("=").strip().lower() in DROPPED_SECTIONS else None
            continue
        if dropped_level is None:
            kept.append(stripped)
    return "\n".join(kept)


@dataclass
class ClassCorpus:
    """The sentences of every class, grouped by class in label order (`sentences[offsets[c]:offsets[c + 1]]` are
    class c's). Templates come first within a class, as in the reference corpus."""

    class_names: list[str]
    sentences: list[str]
    labels: np.ndarray  # (N,) class id of each sentence
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.bincount(self.labels, minlength=len(self.class_names)))])

    def class_sentences(self, c: int) -> list[str]:
        start, end = self.offsets[c], self.offsets[c + 1]
        return self.sentences[start:end]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for label, sentence in zip(self.labels.tolist(), self.sentences):
            h.update(f"{label}\t{sentence}\n".encode())
        return h.hexdigest()


def _corpus_from_json(path: Path, class_names: list[str]) -> dict[int, list[str]]:
    try:
        data = json.loads(read_text_file(path, "corpus file"), object_pairs_hook=unique_keys(path, DataError))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping class name or index to a list of sentences.")
    data = match_corpus_keys(data, class_names, path, DataError)
    ambiguous = {name for name, count in Counter(class_names).items() if count > 1}
    index_of = {}
    for i, name in enumerate(class_names):
        index_of.setdefault(name, i)
    by_class: dict[int, list[str]] = {}
    for key, value in data.items():
        if key in index_of:
            c = index_of[key]
            if key in ambiguous:
                raise DataError(f"{path}: class name {key!r} is ambiguous (it names several classes); key by index.")
        elif str(key).isdigit() and int(key) < len(class_names):
            c = int(key)
        else:
            raise DataError(
                f"{path}: names class {key!r}, which is not in the class list ({len(class_names)} classes)."
            )
        if isinstance(value, str):
            value = split_sentences(value)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise DataError(f"{path}: the entry for class {key!r} must be a list of sentences (strings) or a text.")
        by_class.setdefault(c, []).extend(value)
    return by_class


def _corpus_from_wiki_dir(folder: Path, class_names: list[str]) -> dict[int, list[str]]:
    if (folder / "wiki").is_dir():
        folder = folder / "wiki"
    files = {}
    for path in folder.glob("desc_*.txt"):
        match = re.fullmatch(r"desc_(\d+)\.txt", path.name)
        if match:
            files[int(match.group(1))] = path
    extra = sorted(i for i in files if i >= len(class_names))
    if extra:
        raise DataError(f"{files[extra[0]]}: names class index {extra[0]}, but there are {len(class_names)} classes.")
    return {c: split_sentences(wikipedia_text(read_text_file(path, "corpus file"))) for c, path in files.items()}


def build_class_corpus(
    class_names: list[str],
    text_corpus: str | os.PathLike | None = None,
    use_templates: bool = True,
    drop_duplicates: bool = False,
) -> ClassCorpus:
    """Builds the sentence pool of every class.

    Args:
        class_names: label i is `class_names[i]`.
        text_corpus: a JSON file mapping class name or index to a list of sentences (or a text to split); a folder
            in the official VL-LTR layout (`desc_<i>.txt` Wikipedia files, optionally under `wiki/`); or `None` /
            `"templates"` for the prompt templates alone (asked for explicitly, since it drops the descriptions).
        use_templates: prepend CLIP's 80 ImageNet prompt templates to every class, as the reference runs do.
        drop_duplicates: remove repeated sentences within a class. Off by default: the reference
            (`SentPreProcessor`) keeps them, so a repeated sentence is drawn more often in stage 1 and can fill
            several anchor slots.

    Empty sentences are dropped (counted in `stats`, as are duplicates removed). A class with no
    sentence in a given corpus, or a corpus entry for a class that does not exist, is a `DataError`.
    """
    templates_only = text_corpus is None or str(text_corpus) == "templates"
    if templates_only and not use_templates:
        raise DataError("No text corpus given and the prompt templates are turned off: every class has no sentence.")
    by_class: dict[int, list[str]] = {}
    if not templates_only:
        path = Path(text_corpus)
        if path.is_dir():
            by_class = _corpus_from_wiki_dir(path, class_names)
        elif path.is_file():
            by_class = _corpus_from_json(path, class_names)
        else:
            raise DataError(
                f"{text_corpus}: text corpus not found (a JSON file, a desc_<i>.txt folder or 'templates')."
            )
        missing = [c for c in range(len(class_names)) if not any(s.strip() for s in by_class.get(c, []))]
        if missing:
            names = ", ".join(f"{c} ({class_names[c]!r})" for c in missing[:5])
            raise DataError(
                f"{text_corpus}: {len(missing)} class(es) have no sentences, e.g. {names}. Add descriptions, or pass "
                f"--text_corpus templates to train on the prompt templates alone."
            )
    sentences, labels = [], []
    stats = {"empty_dropped": 0, "duplicates_removed": 0, "template_sentences": 0}
    for c, name in enumerate(class_names):
        pool = [t.format(name) for t in IMAGENET_TEMPLATES] if use_templates else []
        stats["template_sentences"] += len(pool)
        seen = set()
        for sentence in pool + by_class.get(c, []):
            sentence = " ".join(sentence.split())
            if not sentence:
                stats["empty_dropped"] += 1
            elif drop_duplicates and sentence in seen:
                stats["duplicates_removed"] += 1
            else:
                seen.add(sentence)
                sentences.append(sentence)
                labels.append(c)
    if stats["empty_dropped"] or stats["duplicates_removed"]:
        logger.warning(
            f"Text corpus: dropped {stats['empty_dropped']} empty sentence(s) and removed "
            f"{stats['duplicates_removed']} duplicate(s) within a class."
        )
    corpus = ClassCorpus(list(class_names), sentences, np.array(labels, dtype=np.int64), stats)
    logger.info(f"Text corpus: {len(sentences)} sentences for {len(class_names)} classes.")
    return corpus


@dataclass
class TokenizedCorpus:
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    num_truncated: int


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{vocab}".encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLLTR_CACHE", Path.home() / ".cache" / "vlltr"))


def tokenize_corpus(
    corpus: ClassCorpus, tokenizer, max_length: int = CLIP_CONTEXT_LENGTH, cache_dir=None
) -> TokenizedCorpus:
    """Tokenises every sentence once to `max_length` tokens: `[SOT] + tokens[: max_length - 2] + [EOT]`, padded.
    Long sentences are truncated, not dropped (reference `SentPreProcessor.tokenize`), and counted in the log.
    The result is cached under `cache_dir` keyed by a hash of the sentences and the tokenizer's vocabulary (the
    reference keys its cache by dataset name only, so a changed corpus silently reused a stale one)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        f"{corpus.fingerprint()}\n{_tokenizer_fingerprint(tokenizer)}\n{max_length}".encode()
    ).hexdigest()[:32]
    cache_file = cache_dir / "tokens" / f"{key}.safetensors"
    if cache_file.exists():
        try:
            cached = load_file(cache_file)
            result = TokenizedCorpus(
                cached["input_ids"].long(), cached["attention_mask"].long(), int(cached["num_truncated"])
            )
            if len(result.input_ids) == len(corpus.sentences):
                logger.info(f"Loaded tokenised corpus from {cache_file}.")
                return result
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            logger.warning(f"Ignoring unreadable token cache {cache_file} ({e}).")

    encoded = tokenizer(corpus.sentences, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), max_length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(encoded), max_length), dtype=torch.int64)
    num_truncated = 0
    for i, ids in enumerate(encoded):
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [eos_id]
            num_truncated += 1
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    if num_truncated:
        logger.warning(f"Text corpus: {num_truncated} sentence(s) longer than {max_length} tokens were truncated.")
    result = TokenizedCorpus(input_ids, attention_mask, num_truncated)
    tensors = {
        "input_ids": input_ids.int(),
        "attention_mask": attention_mask.to(torch.int8),
        "num_truncated": torch.tensor(num_truncated),
    }
    try:
        atomic_write(cache_file, lambda tmp: save_file(tensors, tmp))
    except OSError as e:  # a cache: the run goes on without it (atomic_write left no partial file)
        logger.warning(f"Could not write the token cache {cache_file} ({e.strerror or e}); continuing without it.")
    return result


def load_corpus(
    corpus_args: CorpusArguments, class_names: list[str], tokenizer, text_config
) -> tuple[ClassCorpus, TokenizedCorpus]:
    """The corpus of `class_names` from --text_corpus / --use_templates, tokenised for a text tower with
    `text_config`: to CLIP's 77 tokens, or fewer when the tower has fewer positions."""
    corpus = build_class_corpus(
        class_names, corpus_args.text_corpus, corpus_args.use_templates, corpus_args.drop_duplicate_sentences
    )
    max_length = min(CLIP_CONTEXT_LENGTH, text_config.max_position_embeddings)
    return corpus, tokenize_corpus(corpus, tokenizer, max_length, corpus_args.token_cache_dir)

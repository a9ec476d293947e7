"""Describe any label set: build the class text corpus (`--text_corpus corpus.json` for every script) from WordNet,
a Wikipedia dump, a causal language model or a published descriptor file, with a coverage report beside it.

    python -m training.describe_classes --class_names classes.txt --sources wordnet --output corpus.json
    python -m training.describe_classes --class_names classes.txt --sources wordnet,wikipedia \
        --wikipedia wikimedia/wikipedia --wikipedia_config 20231101.en --output corpus.json
    python -m training.describe_classes --class_names classes.txt --sources llm \
        --llm_model Qwen/Qwen2.5-1.5B-Instruct --sentences_per_class 20 --output corpus.json
    python -m training.describe_classes --class_names classes.txt --sources descriptors \
        --descriptors descriptors_imagenet.json --output corpus.json

`--class_names` has one class a line: a name, or a WordNet id and names as the ImageNet lists give them
("n01440764 tench, Tinca tinca"), or a WordNet id alone. The corpus maps each class name to its sentences, sources in
the order given, repeats within a class removed. Beside it: `<output>.coverage.json` (sentences per class and per
source, how each class was matched, the classes a source did not find) and, for a list with WordNet ids, the class
names one a line (`<output>.classes.txt`) to pass as --class_names to the training scripts. See
docs/descriptions.md.
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from .cli import UsageError, parse_args, run_main
from .describe.classes import read_class_list
from .describe.descriptors import KEY_RULES, descriptor_sentences
from .describe.llm import UNNAMED_RULES, GenerationSettings, LLMDescriber, llm_sentences
from .describe.wikipedia import wikipedia_sentences
from .describe.wordnet import DEFAULT_WORDNET_DIR, WordNet, synset_sentences
from .io_utils import DataError, atomic_write_json, atomic_write_text

logger = logging.get_logger(__name__)

SOURCES = ("wordnet", "wikipedia", "llm", "descriptors")


@dataclass
class DescribeArguments:
    class_names: str | None = field(
        default=None,
        metadata={"help": "The classes, one a line: a name, 'wnid name[, other names]' or a wnid alone."},
    )
    output: str | None = field(default=None, metadata={"help": "The corpus JSON file to write (class → sentences)."})
    sources: str = field(
        default="wordnet", metadata={"help": f"Comma-separated sources, in corpus order: {', '.join(SOURCES)}."}
    )
    require_all: bool = field(
        default=False,
        metadata={"help": "Refuse to write the corpus when a class gets no sentence (the report is still written)."},
    )
    wordnet_dir: str = field(
        default=DEFAULT_WORDNET_DIR,
        metadata={"help": "WordNet 3.0 database folder (data.noun, index.noun); also used to match names if present."},
    )
    wordnet_hypernym_depth: int = field(default=3, metadata={"help": "Hypernym levels turned into sentences."})
    wikipedia: str | None = field(
        default=None,
        metadata={"help": "A Hub Wikipedia dump (wikimedia/wikipedia) or a local parquet/JSON file or folder."},
    )
    wikipedia_config: str | None = field(default=None, metadata={"help": "The dump's config, e.g. 20231101.en."})
    wikipedia_max_articles: int | None = field(
        default=None, metadata={"help": "Read at most this many articles (a quick partial pass)."}
    )
    llm_model: str | None = field(default=None, metadata={"help": "A Hub name or folder of a causal language model."})
    sentences_per_class: int = field(default=20, metadata={"help": "LLM sentences kept per class at most."})
    llm_max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer at most."})
    llm_batch_size: int = field(default=8, metadata={"help": "Prompts generated per batch."})
    llm_do_sample: bool = field(
        default=False, metadata={"help": "Sample (seeded by --seed) instead of greedy decoding."}
    )
    llm_temperature: float = field(default=0.99, metadata={"help": "Sampling temperature (CuPL's 0.99)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampled LLM answers."})
    llm_cache_dir: str | None = field(
        default=None, metadata={"help": "Answer cache (default ~/.cache/vlltr/describe_llm or $VLLTR_CACHE/...)."}
    )
    llm_unnamed: str = field(
        default="keep",
        metadata={
            "help": "LLM sentences that do not name the class: 'keep' (as CuPL; counted in the report) or 'drop'.",
            "choices": list(UNNAMED_RULES),
        },
    )
    descriptors: str | None = field(
        default=None, metadata={"help": "A descriptor JSON file (class → attribute phrases), Menon & Vondrick style."}
    )
    descriptor_keys: str = field(
        default="name",
        metadata={
            "help": "How descriptor keys find their class: 'name' (the naming rule) or 'order' (key i is class i).",
            "choices": list(KEY_RULES),
        },
    )


def _sources(args: DescribeArguments) -> list[str]:
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise UsageError(f"--sources {args.sources!r}: expected a comma-separated list of {', '.join(SOURCES)}.")
    needs = {"wikipedia": "wikipedia", "llm": "llm_model", "descriptors": "descriptors"}
    for source in sources:
        if source in needs and getattr(args, needs[source]) is None:
            raise UsageError(f"--sources {source} needs --{needs[source]}.")
    return list(dict.fromkeys(sources))


def _open_wordnet(args: DescribeArguments, sources: list[str]) -> WordNet | None:
    """WordNet when a source needs it; else when its files are there anyway (its lemma names help match titles and
    descriptor keys, and name bare wnids)."""
    if "wordnet" in sources or args.wordnet_dir != DEFAULT_WORDNET_DIR:
        return WordNet(args.wordnet_dir)
    return WordNet(args.wordnet_dir) if (Path(args.wordnet_dir) / "data.noun").is_file() else None


def describe(args: DescribeArguments) -> dict:
    """Builds the corpus and its coverage report; returns the report."""
    sources = _sources(args)
    if args.class_names is None or args.output is None:
        raise UsageError("--class_names and --output are required (see --help).")
    wordnet = _open_wordnet(args, sources)
    entries = read_class_list(args.class_names, wordnet)

    # ---- Each class's synset (by wnid, else by lemma): the WordNet source, and lemma names for matching ------------
    synsets, wordnet_how, ambiguous = {}, {}, []
    if wordnet is not None:
        for c, entry in enumerate(entries):
            match = wordnet.lookup(entry.name, entry.wnid)  # a qualifier, "crane (bird)", picks the sense
            if match is None:
                continue
            synsets[c] = match
            entry.lemmas = match.synset.lemmas
            wordnet_how[c] = "wnid" if match.how == "wnid" else f"lemma {match.lemma!r}"
            if match.how == "lemma" and match.num_senses > 1:
                wordnet_how[c] += f" (1 of {match.num_senses} senses)"
                ambiguous.append({"class": entry.name, "lemma": match.lemma, "senses": match.num_senses,
                                  "chosen": match.synset.wnid, "definition": match.synset.definition})  # fmt: skip

    # ---- Sentences from each source ---------------------------------------------------------------------------------
    found: dict[str, dict[int, list[str]]] = {}
    how: dict[str, dict[int, str]] = {}
    extra: dict = {}
    for source in sources:
        if source == "wordnet":
            found[source] = {
                c: synset_sentences(
                    entries[c].subject, m.synset, wordnet.hypernym_chain(m.synset, args.wordnet_hypernym_depth),
                    m.plural,
                )
                for c, m in synsets.items()
            }  # fmt: skip
            how[source] = wordnet_how
        elif source == "wikipedia":
            found[source], how[source] = wikipedia_sentences(
                entries, args.wikipedia, args.wikipedia_config, args.wikipedia_max_articles
            )
        elif source == "descriptors":
            found[source], how[source] = descriptor_sentences(entries, args.descriptors, args.descriptor_keys)
        else:
            settings = GenerationSettings(
                args.llm_max_new_tokens, args.llm_do_sample, args.llm_temperature, args.seed, args.llm_batch_size
            )
            describer = LLMDescriber(args.llm_model, settings, args.llm_cache_dir)
            found[source], unnamed = llm_sentences(entries, describer, args.sentences_per_class, args.llm_unnamed)
            how[source] = {c: f"model {args.llm_model!r}" for c in found[source] if found[source][c]}
            extra["llm"] = {
                "model": args.llm_model, "chat_template": describer.chat, "generated": describer.generated,
                "from_cache": describer.from_cache, "cache_file": str(describer.cache_file),
                "unnamed_rule": args.llm_unnamed, "unnamed": sum(unnamed.values()),
            }  # fmt: skip
            for c, count in unnamed.items():
                how[source][c] = how[source].get(c, f"model {args.llm_model!r}") + f", {count} unnamed"
        for c, entry in enumerate(entries):
            if not found[source].get(c):
                logger.warning(f"{source}: no sentence for class {entry.name!r} ({args.class_names}:{c + 1}).")
    if wordnet is not None:
        wordnet.close()

    # ---- The corpus: each class's sentences, sources in order, repeats removed -------------------------------------
    corpus, per_class = {}, []
    per_source = dict.fromkeys(sources, 0)
    for c, entry in enumerate(entries):
        kept, counts = {}, {}
        for source in sources:
            new = [
                s for s in dict.fromkeys(" ".join(s.split()) for s in found[source].get(c, [])) if s and s not in kept
            ]
            kept.update(dict.fromkeys(new))
            counts[source] = len(new)
            per_source[source] += len(new)
        if kept:
            corpus[entry.name] = list(kept)
        per_class.append({
            "name": entry.name, "wnid": entry.wnid, "sentences": counts,
            "matched": {s: how[s][c] for s in sources if c in how[s]},
        })  # fmt: skip
    without = [e.name for c, e in enumerate(entries) if e.name not in corpus]
    output = Path(args.output)
    report = {
        "class_names": args.class_names, "output": str(output), "sources": sources, "num_classes": len(entries),
        "num_sentences": sum(per_source.values()), "sentences_per_source": per_source,
        "classes_per_source": {s: sum(1 for c in range(len(entries)) if found[s].get(c)) for s in sources},
        "classes_without_sentences": without,
        "unmatched": {s: [e.name for c, e in enumerate(entries) if not found[s].get(c)] for s in sources},
        "ambiguous": ambiguous, **extra, "classes": per_class,
    }  # fmt: skip
    report_path = output.with_name(output.stem + ".coverage.json")
    atomic_write_json(report_path, report)
    report["coverage_file"] = str(report_path)
    if without and args.require_all:
        names = ", ".join(repr(n) for n in without[:5])
        raise DataError(
            f"--require_all: {len(without)} class(es) got no sentence from {', '.join(sources)}, e.g. {names}; "
            f"the corpus was not written (see {report_path})."
        )
    atomic_write_json(output, corpus)
    if any(e.wnid for e in entries):
        classes_path = output.with_name(output.stem + ".classes.txt")
        atomic_write_text(classes_path, "".join(f"{e.name}\n" for e in entries))
        report["classes_file"] = str(classes_path)
    return report


def summary(report: dict) -> str:
    """The few lines printed after a run: what was written, sentences and classes per source, what is missing."""
    n = report["num_classes"]
    counts = ", ".join(f"{s} {k}" for s, k in report["sentences_per_source"].items())
    lines = [f"Wrote {report['output']}: {n} classes, {report['num_sentences']} sentences ({counts})."]
    for source in report["sources"]:
        covered, missing = report["classes_per_source"][source], report["unmatched"][source]
        line = f"  {source}: {covered}/{n} classes, {report['sentences_per_source'][source]} sentences"
        if missing:
            line += f"; none for {_names(missing)}"
        lines.append(line + ".")
    if "llm" in report:
        llm = report["llm"]
        lines.append(
            f"  llm: {llm['generated']} answers generated, {llm['from_cache']} from the cache; {llm['unnamed']} "
            f"sentences do not name their class ({'kept' if llm['unnamed_rule'] == 'keep' else 'dropped'})."
        )
    if report["ambiguous"]:
        lines.append(
            f"  {len(report['ambiguous'])} class(es) matched by a WordNet lemma with several senses (the first common "
            f"sense was used; give a wnid or a qualifier to choose): {_names([a['class'] for a in report['ambiguous']])}."
        )
    if report["classes_without_sentences"]:
        lines.append(
            f"  {len(report['classes_without_sentences'])} class(es) have no sentence: "
            f"{_names(report['classes_without_sentences'])}; the corpus loader refuses a class without sentences: add "
            f"its sentences by hand or with another source."
        )
    lines.append(f"Coverage report: {report['coverage_file']}.")
    if "classes_file" in report:
        lines.append(f"Class names (pass as --class_names to the training scripts): {report['classes_file']}.")
    return "\n".join(lines)


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((DescribeArguments,), argv)
    logging.set_verbosity_warning()
    logging.get_logger("training").setLevel(logging.INFO)
    report = describe(args)
    print(summary(report))
    return report


__all__ = ["DescribeArguments", "describe", "main", "summary"]

if __name__ == "__main__":
    run_main(main, "describe_classes")

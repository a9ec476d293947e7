"""Class descriptions from a causal language model through `pipeline("text-generation")`, asked the questions CuPL
asks (Pratt et al., "What does a platypus look like? Generating customized prompts for zero-shot image
classification", ICCV 2023: its five ImageNet prompts).

Greedy decoding by default, so a rerun gives the same text; every answer is cached per (model, prompt, class and
generation settings), so a rerun, or a run on a longer class list, asks the model only what it has not asked.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import AutoConfig, pipeline
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from ..corpus import default_cache_dir, split_sentences
from ..io_utils import DataError, atomic_write_json, normalize_class_name
from .classes import ClassEntry
from .wordnet import indefinite

logger = logging.get_logger(__name__)

# CuPL's ImageNet questions ("a"/"an" by the class name's first letter, as CuPL writes them).
CUPL_QUESTIONS = (
    "Describe what {} looks like",
    "How can you identify {}?",
    "What does {} look like?",
    "Describe an image from the internet of {}",
    "A caption of an image of {}:",
)
UNNAMED_RULES = ("keep", "drop")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.99  # CuPL's, used only with do_sample
    seed: int = 0
    batch_size: int = 8

    def key(self) -> dict:
        settings = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            settings.update(temperature=self.temperature, seed=self.seed)
        return settings


def check_causal_lm(model: str) -> None:
    """One line naming `model` when it is not a causal language model (or not a model at all)."""
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:  # no config.json, an unreachable Hub name, a damaged file
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"--llm_model {model}: not a model folder or Hub name transformers can load ({message})."
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DataError(
            f"--llm_model {model}: a {config.model_type!r} model, not a causal language model; the llm source needs "
            f"a text-generation model (e.g. an instruction-tuned one such as Qwen/Qwen2.5-1.5B-Instruct)."
        )


def names_class(sentence: str, entry: ClassEntry) -> bool:
    """Whether `sentence` names the class: its name, an alias or a WordNet lemma, up to case and spacing."""
    text = f" {_words(sentence)} "
    names = {entry.subject, *entry.aliases, *entry.lemmas}
    return any(f" {_words(n)} " in text for n in names if _words(n))


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", normalize_class_name(text)).split())


def clean_answer(text: str) -> list[str]:
    """The whole sentences of an answer: list markers and white space removed; dropped are a last sentence cut off by
    the token limit (no closing punctuation), a fragment that continues the prompt (no capital letter, digit or
    quote first) and fragments of fewer than three words."""
    sentences = []
    for line in text.splitlines():
        line = line.strip().lstrip("-*•").strip()
        if line[:3].rstrip(".)").isdigit():  # "1. " / "2) " numbering
            line = line.split(maxsplit=1)[1] if len(line.split(maxsplit=1)) > 1 else ""
        sentences += split_sentences(line)
    return [
        s for s in sentences if s[-1] in ".!?" and (s[0].isupper() or s[0] in "0123456789\"'") and len(s.split()) >= 3
    ]


class LLMDescriber:
    """Asks `model` the CuPL questions for every class, batched, with the model's chat template where its tokenizer
    has one (the question as the user's message) and as a plain prompt to continue otherwise."""

    def __init__(self, model: str, settings: GenerationSettings, cache_dir: str | os.PathLike | None = None):
        check_causal_lm(model)
        self.model_name = model
        self.settings = settings
        self.generator = pipeline("text-generation", model=model)
        tokenizer = self.generator.tokenizer
        if tokenizer.pad_token_id is None:  # batching pads; decoder-only models pad on the left
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        identity = {"model": model}
        config_file = Path(model) / "config.json"
        if config_file.is_file():  # a local folder: another model saved under the same path is another cache
            identity["config"] = hashlib.sha256(config_file.read_bytes()).hexdigest()
        model_key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "describe_llm"
        self.cache_file = cache_dir / f"{model_key}.json"
        self.cache: dict[str, str] = {}
        if self.cache_file.is_file():
            try:
                self.cache = json.loads(self.cache_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # a damaged cache is rebuilt, never trusted
                logger.warning(f"Ignoring unreadable answer cache {self.cache_file} ({e}).")
        self.generated = self.from_cache = 0

    def _key(self, prompt: str) -> str:
        item = {"prompt": prompt, "chat": self.chat, **self.settings.key()}
        return hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()

    def _generate(self, prompts: list[str]) -> list[str]:
        inputs = [[{"role": "user", "content": p}] for p in prompts] if self.chat else prompts
        kwargs = dict(max_new_tokens=self.settings.max_new_tokens, do_sample=self.settings.do_sample)
        if self.settings.do_sample:
            kwargs["temperature"] = self.settings.temperature
        else:  # greedy: unset the sampling defaults a model's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        outputs = self.generator(
            inputs,
            batch_size=self.settings.batch_size,
            return_full_text=False,
            pad_token_id=self.generator.tokenizer.pad_token_id,
            **kwargs,
        )
        answers = []
        for output in outputs:
            text = output[0]["generated_text"]
            if isinstance(text, list):  # a chat: the messages, the assistant's answer last
                text = text[-1]["content"]
            answers.append(text)
        return answers

    def answers(self, prompts: list[str]) -> list[str]:
        """The answer to each prompt, from the cache or generated (in batches, the cache saved after each)."""
        todo = [p for p in dict.fromkeys(prompts) if self._key(p) not in self.cache]
        waiting = set(todo)
        self.from_cache += sum(p not in waiting for p in prompts)
        step = self.settings.batch_size * 4
        for start in logging.tqdm(range(0, len(todo), step), desc="LLM answers", unit=" batches"):
            chunk = todo[start : start + step]
            if self.settings.do_sample:  # seeded per chunk: the same prompts draw the same answers
                transformers.set_seed(self.settings.seed + start)
            for prompt, answer in zip(chunk, self._generate(chunk)):
                self.cache[self._key(prompt)] = answer
            self.generated += len(chunk)
            atomic_write_json(self.cache_file, self.cache)
        return [self.cache[self._key(p)] for p in prompts]


def llm_sentences(
    entries: list[ClassEntry], describer: LLMDescriber, sentences_per_class: int, unnamed: str = "keep"
) -> tuple[dict[int, list[str]], dict[int, int]]:
    """Up to `sentences_per_class` sentences per class from the answers to the CuPL questions, taken in turn from
    each question's answer (its first sentence, then each one's second, ...) so every question contributes.
    Sentences that do not name the class (`names_class`) are kept by default, as CuPL keeps them (anchor
    selection later keeps only sentences that retrieve the class's images), or dropped with `unnamed="drop"`;
    either way they are counted (kept, or dropped). Returns the sentences and that count per class."""
    if unnamed not in UNNAMED_RULES:
        raise DataError(f"--llm_unnamed {unnamed}: expected one of {', '.join(UNNAMED_RULES)}.")
    prompts = [q.format(indefinite(e.subject)) for e in entries for q in CUPL_QUESTIONS]
    answers = describer.answers(prompts)
    sentences, unnamed_counts = {}, {}
    for c, entry in enumerate(entries):
        per_question = [clean_answer(a) for a in answers[c * len(CUPL_QUESTIONS) : (c + 1) * len(CUPL_QUESTIONS)]]
        interleaved = [s for row in _zip_longest(per_question) for s in row]
        candidates = list(dict.fromkeys(interleaved))
        if unnamed == "drop":
            kept = [s for s in candidates if names_class(s, entry)][:sentences_per_class]
            unnamed_counts[c] = len([s for s in candidates if not names_class(s, entry)])
        else:
            kept = candidates[:sentences_per_class]
            unnamed_counts[c] = len([s for s in kept if not names_class(s, entry)])
        sentences[c] = kept
    return sentences, unnamed_counts


def _zip_longest(rows: list[list[str]]) -> list[list[str]]:
    return [[row[i] for row in rows if i < len(row)] for i in range(max(map(len, rows), default=0))]

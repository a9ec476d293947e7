"""Tests for training/corpus.py: sentence splitting, Wikipedia sections, the class corpus and its tokens.
Expectations are written out by hand."""

import json

import pytest
import torch

from training.corpus import (
    IMAGENET_TEMPLATES,
    build_class_corpus,
    split_sentences,
    tokenize_corpus,
    wikipedia_text,
)
from training.io_utils import DataError


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Sentence splitting and Wikipedia sections
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The cat sat. The dog ran.", ["The cat sat.", "The dog ran."]),
        ("He left.She stayed.", ["He left.", "She stayed."]),  # no space, next is a capital
        ("It ended. then more", ["It ended.", "then more"]),  # white space is enough
        ("First line.\n\nSecond line.", ["First line.", "Second line."]),
        ("Why? Because it can.", ["Why?", "Because it can."]),
        ("Tools, e.g. this one, help.", ["Tools, e.g. this one, help."]),
        ("Tools, e.g. This one.", ["Tools, e.g. This one."]),
        ("Written by J. R. R. Tolkien in 1937. A classic.", ["Written by J. R. R. Tolkien in 1937.", "A classic."]),
        ("The U.S. Army grew. It won.", ["The U.S. Army grew.", "It won."]),
        # as the reference pattern: a capital and a full stop never end a sentence, so neither does an acronym
        ("Found in the USA. It is rare.", ["Found in the USA. It is rare."]),
        ("Is it a.b? Yes.", ["Is it a.b? Yes."]),
        ("Pi is 3.14 roughly. Yes.", ["Pi is 3.14 roughly.", "Yes."]),
        ("no full stop at the end", ["no full stop at the end"]),
        ("  padded.   Also padded.  ", ["padded.", "Also padded."]),
        ("", []),
        ("   \n ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


WIKI = """Lions are large cats.

The lion is muscular.
== Description ==
Manes are dark.
=== Size ===
Males weigh more.
== References ==
Smith 2001.
=== Journals ===
Journal of Lions.
== External Links ==
http://example.org
== Further reading ==
Book one.
==Bibliography==
Book two.
== Behaviour ==
They hunt at night.
=== Hunting ===
Prides hunt together.
"""


def test_wikipedia_text_keeps_summary_and_sections_drops_reference_sections_and_headers():
    assert wikipedia_text(WIKI).splitlines() == [
        "Lions are large cats.",
        "The lion is muscular.",
        "Manes are dark.",
        "Males weigh more.",
        "They hunt at night.",
        "Prides hunt together.",
    ]


def test_wikipedia_text_without_headers_is_the_text_without_blank_lines():
    assert wikipedia_text("  One.\n\nTwo.  \n") == "One.\nTwo."


def test_wikipedia_text_sub_section_after_a_dropped_sub_section_of_a_kept_section():
    text = "Summary.\n== Works ==\nWorks.\n=== Bibliography ===\nA list.\n=== Filmography ===\nFilms.\n"
    assert wikipedia_text(text).splitlines() == ["Summary.", "Works.", "Films."]


# ----------------------------------------------------------------------------------------------------------------------
# build_class_corpus
# ----------------------------------------------------------------------------------------------------------------------


def test_imagenet_templates_are_clips_80():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    for t in ("a photo of a {}.", "itap of my {}.", "a tattoo of the {}.", "a {} in a video game."):
        assert t in IMAGENET_TEMPLATES


def templates_for(name):
    return [t.replace("{}", name) for t in IMAGENET_TEMPLATES]


def check_layout(corpus, expected_per_class):
    """sentences, labels, offsets and class_sentences against a hand-written list per class."""
    flat, labels, offsets = [], [], [0]
    for c, pool in enumerate(expected_per_class):
        flat += pool
        labels += [c] * len(pool)
        offsets.append(offsets[-1] + len(pool))
    assert corpus.sentences == flat
    assert corpus.labels.tolist() == labels
    assert corpus.offsets.tolist() == offsets
    for c, pool in enumerate(expected_per_class):
        assert corpus.class_sentences(c) == pool


def test_build_class_corpus_from_json_keyed_by_name(tmp_path):
    path = write(
        tmp_path / "corpus.json",
        json.dumps({"tabby cat": ["A cat sleeps.", "Cats purr."], "dog": "Dogs bark. They run fast."}),
    )
    corpus = build_class_corpus(["tabby cat", "dog"], path)
    check_layout(
        corpus,
        [
            templates_for("tabby cat") + ["A cat sleeps.", "Cats purr."],
            templates_for("dog") + ["Dogs bark.", "They run fast."],
        ],
    )
    assert corpus.class_sentences(0)[0] == "a bad photo of a tabby cat."
    assert corpus.stats == {"empty_dropped": 0, "duplicates_removed": 0, "template_sentences": 160}
    assert corpus.class_names == ["tabby cat", "dog"]


def test_build_class_corpus_from_json_keyed_by_index_without_templates(tmp_path):
    path = write(tmp_path / "c.json", json.dumps({"1": ["B one.", "B two."], "0": ["A one."], "2": ["C."]}))
    corpus = build_class_corpus(["a", "b", "c"], path, use_templates=False)
    check_layout(corpus, [["A one."], ["B one.", "B two."], ["C."]])
    assert corpus.stats["template_sentences"] == 0


def test_build_class_corpus_removes_duplicates_and_empty_sentences_within_a_class(tmp_path):
    path = write(
        tmp_path / "c.json",
        json.dumps(
            {
                "cat": ["A cat.", "A   cat.", "", "   ", "a photo of a cat.", "Cats\tpurr.", "A cat."],
                "dog": ["A cat.", "Dogs bark."],  # the same sentence in another class is kept there
            }
        ),
    )
    corpus = build_class_corpus(["cat", "dog"], path, drop_duplicates=True)
    check_layout(
        corpus, [templates_for("cat") + ["A cat.", "Cats purr."], templates_for("dog") + ["A cat.", "Dogs bark."]]
    )
    # "A   cat." and "A cat." repeat "A cat."; "a photo of a cat." repeats a template; "" and "   " are empty
    assert corpus.stats == {"empty_dropped": 2, "duplicates_removed": 3, "template_sentences": 160}
    # by default duplicates are kept, as the reference `SentPreProcessor` keeps them; empty sentences still go
    kept = build_class_corpus(["cat", "dog"], path)
    check_layout(
        kept,
        [
            templates_for("cat") + ["A cat.", "A cat.", "a photo of a cat.", "Cats purr.", "A cat."],
            templates_for("dog") + ["A cat.", "Dogs bark."],
        ],
    )
    assert kept.stats == {"empty_dropped": 2, "duplicates_removed": 0, "template_sentences": 160}


def test_build_class_corpus_from_desc_folder(tmp_path):
    for folder in (tmp_path / "flat", tmp_path / "official" / "wiki"):
        write(folder / "desc_0.txt", WIKI)
        write(folder / "desc_1.txt", "A rose is a plant. It has thorns.\n== References ==\nBook.\n")
        write(folder / "notes.txt", "ignored")
        write(folder / "desc_x.txt", "ignored: not an index")
    lion = [
        "Lions are large cats.",
        "The lion is muscular.",
        "Manes are dark.",
        "Males weigh more.",
        "They hunt at night.",
        "Prides hunt together.",
    ]
    rose = ["A rose is a plant.", "It has thorns."]
    for root in (tmp_path / "flat", tmp_path / "official"):
        corpus = build_class_corpus(["lion", "rose"], root)
        check_layout(corpus, [templates_for("lion") + lion, templates_for("rose") + rose])
        no_templates = build_class_corpus(["lion", "rose"], str(root), use_templates=False)
        check_layout(no_templates, [lion, rose])


@pytest.mark.parametrize("text_corpus", [None, "templates"])
def test_build_class_corpus_templates_only(text_corpus):
    corpus = build_class_corpus(["a b", "c", "d"], text_corpus)
    check_layout(corpus, [templates_for("a b"), templates_for("c"), templates_for("d")])
    assert corpus.offsets.tolist() == [0, 80, 160, 240]


def test_build_class_corpus_templates_off_and_no_corpus():
    with pytest.raises(DataError, match="templates are turned off"):
        build_class_corpus(["a"], None, use_templates=False)
    with pytest.raises(DataError, match="templates are turned off"):
        build_class_corpus(["a"], "templates", use_templates=False)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"cat": ["A cat."]}, r"1 class\(es\) have no sentences, e\.g\. 1 \('dog'\)"),
        ({"cat": ["A cat."], "dog": ["", "  "]}, r"have no sentences, e\.g\. 1 \('dog'\)"),
        ({"cat": ["A cat."], "dog": ["D."], "cow": ["Moo."]}, r"names class 'cow', which is not in the class list"),
        ({"cat": ["A cat."], "dog": ["D."], "2": ["Two."]}, r"names class '2', which is not in the class list"),
        ({"cat": ["A cat."], "dog": [1, 2]}, r"entry for class 'dog' must be a list of sentences"),
        (["A cat."], r"expected a JSON object"),
    ],
)
def test_build_class_corpus_json_errors(tmp_path, data, message):
    path = write(tmp_path / "corpus.json", json.dumps(data))
    with pytest.raises(DataError, match=message):
        build_class_corpus(["cat", "dog"], path)


def test_build_class_corpus_ambiguous_class_name_key(tmp_path):
    path = write(tmp_path / "corpus.json", json.dumps({"crane": ["A bird or a machine."]}))
    with pytest.raises(DataError, match=r"'crane' is ambiguous"):
        build_class_corpus(["crane", "crane"], path)


def test_build_class_corpus_file_errors(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"caf\xe9": ["x."]}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.json:1: not valid UTF-8"):
        build_class_corpus(["café"], tmp_path / "latin1.json")
    write(tmp_path / "broken.json", "{oops")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        build_class_corpus(["a"], tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"nowhere: text corpus not found"):
        build_class_corpus(["a"], tmp_path / "nowhere")


def test_build_class_corpus_desc_folder_errors(tmp_path):
    write(tmp_path / "d1" / "desc_0.txt", "Zero.")
    write(tmp_path / "d1" / "desc_1.txt", "One.")
    write(tmp_path / "d1" / "desc_5.txt", "Five.")
    with pytest.raises(DataError, match=r"desc_5\.txt: names class index 5, but there are 2 classes"):
        build_class_corpus(["a", "b"], tmp_path / "d1")

    write(tmp_path / "d2" / "desc_0.txt", "Zero.")
    with pytest.raises(DataError, match=r"have no sentences, e\.g\. 1 \('b'\)"):
        build_class_corpus(["a", "b"], tmp_path / "d2")

    write(tmp_path / "d3" / "desc_0.txt", "Zero.")
    (tmp_path / "d3" / "desc_1.txt").write_bytes("Caf\xe9 au lait.".encode("latin-1"))
    with pytest.raises(DataError, match=r"desc_1\.txt:1: not valid UTF-8"):
        build_class_corpus(["a", "b"], tmp_path / "d3")


def test_corpus_fingerprint_changes_with_content():
    a = build_class_corpus(["x", "y"])
    b = build_class_corpus(["x", "y"])
    c = build_class_corpus(["x", "z"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# ----------------------------------------------------------------------------------------------------------------------
# tokenize_corpus
# ----------------------------------------------------------------------------------------------------------------------


SENTENCES = {
    "short": ["A cat.", "Cats purr loudly at night."],
    "long": ["An extremely long sentence that has far more characters than the maximum length allows."],
}


def small_corpus(tmp_path, sentences=SENTENCES):
    path = write(tmp_path / "corpus.json", json.dumps(sentences))
    return build_class_corpus(list(sentences), path, use_templates=False)


def test_tokenize_corpus_rows_truncation_and_padding(tmp_path, tokenizer):
    corpus = small_corpus(tmp_path)
    max_length = 24
    tokens = tokenize_corpus(corpus, tokenizer, max_length=max_length, cache_dir=tmp_path / "cache")
    assert tokens.input_ids.shape == (3, max_length) and tokens.attention_mask.shape == (3, max_length)
    assert tokens.input_ids.dtype == torch.int64 and tokens.attention_mask.dtype == torch.int64
    num_truncated = 0
    for row, mask, sentence in zip(tokens.input_ids.tolist(), tokens.attention_mask.tolist(), corpus.sentences):
        full = tokenizer(sentence)["input_ids"]  # [SOT] + body + [EOT]
        assert full[0] == 0 and full[-1] == 1
        body = full[1:-1]
        if len(body) > max_length - 2:
            body = body[: max_length - 2]
            num_truncated += 1
        expected = [0] + body + [1]
        n = len(expected)
        assert row[:n] == expected
        assert row[n:] == [1] * (max_length - n)  # pad id 1
        assert mask == [1] * n + [0] * (max_length - n)
        assert row[0] == 0 and row[:n].count(1) == 1 and row[n - 1] == 1  # one EOT, at the end of the real tokens
    assert num_truncated == 1 and tokens.num_truncated == 1
    assert tokens.attention_mask[2].sum() == max_length  # the long sentence fills the row


def test_tokenize_corpus_cache_written_and_reused(tmp_path, tokenizer, monkeypatch):
    corpus = small_corpus(tmp_path)
    cache = tmp_path / "cache"
    first = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    files = sorted((cache / "tokens").glob("*.safetensors"))
    assert len(files) == 1

    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer must not run when the cache is valid")

    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    second = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    assert torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.attention_mask, second.attention_mask)
    assert second.input_ids.dtype == torch.int64 and second.attention_mask.dtype == torch.int64
    assert second.num_truncated == first.num_truncated == 1


def test_tokenize_corpus_changed_corpus_or_length_gets_a_new_cache_entry(tmp_path, tokenizer, monkeypatch):
    cache = tmp_path / "cache"
    first = tokenize_corpus(small_corpus(tmp_path / "a"), tokenizer, max_length=30, cache_dir=cache)
    edited = {**SENTENCES, "short": ["A dog.", "Cats purr loudly at night."]}
    calls = []
    original = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("text"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    second = tokenize_corpus(small_corpus(tmp_path / "b", edited), tokenizer, max_length=30, cache_dir=cache)
    assert len(calls) == 1  # re-tokenised, not read from the stale entry
    assert not torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.input_ids[1:], second.input_ids[1:])
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 2
    third = tokenize_corpus(small_corpus(tmp_path / "a"), tokenizer, max_length=40, cache_dir=cache)
    assert third.input_ids.shape == (3, 40) and third.num_truncated == 1
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 3


def test_tokenize_corpus_corrupted_cache_is_rebuilt(tmp_path, tokenizer):
    corpus = small_corpus(tmp_path)
    cache = tmp_path / "cache"
    good = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    (cache_file,) = (cache / "tokens").glob("*.safetensors")
    cache_file.write_bytes(b"\x00garbage, not safetensors" * 3)
    rebuilt = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    assert torch.equal(rebuilt.input_ids, good.input_ids) and rebuilt.num_truncated == good.num_truncated
    # the entry was rewritten and is readable again
    from safetensors.torch import load_file

    assert torch.equal(load_file(cache_file)["input_ids"].long(), good.input_ids)


def test_tokenize_corpus_cache_with_wrong_row_count_is_rebuilt(tmp_path, tokenizer):
    from safetensors.torch import save_file

    corpus = small_corpus(tmp_path)
    cache = tmp_path / "cache"
    good = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    (cache_file,) = (cache / "tokens").glob("*.safetensors")
    save_file(
        {
            "input_ids": torch.zeros(1, 30, dtype=torch.int32),
            "attention_mask": torch.zeros(1, 30, dtype=torch.int8),
            "num_truncated": torch.tensor(0),
        },
        cache_file,
    )
    assert torch.equal(tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache).input_ids, good.input_ids)


def test_tokenize_corpus_default_cache_dir_is_vlltr_cache(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("VLLTR_CACHE", str(tmp_path / "env_cache"))
    tokenize_corpus(small_corpus(tmp_path), tokenizer, max_length=20)
    assert len(list((tmp_path / "env_cache" / "tokens").glob("*.safetensors"))) == 1

"""The embedded world (`training.world`) on a tiny pool: what its design promises, checked from the files it writes
(splits disjoint from the pool, no target combination and no class name in the captions, near twins, visual flags
that match what the sentences say, the long-tailed profile, determinism per seed), and its stand-in CLIP."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import world as W
from training.cli import UsageError

TINY = dict(num_classes=12, imbalance=10, max_per_class=20, test_per_class=3, selection_per_class=2, pool_size=400)


def _build(folder, seed=0, **changes):
    return W.build_world(W.WorldArguments(output_dir=str(folder), seed=seed, **{**TINY, **changes}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("world"))


def _rows(path):
    return [line.split() for line in Path(path).read_text().splitlines()]


def _named(text: str) -> dict[str, set[str]]:
    """Which value of each attribute `text` names, by any of its words or phrases (whole words only)."""
    text = " " + " ".join(W.words_of(text.replace("-", " "))) + " "
    tables = {
        "shape": {k: nouns + adjs for k, (nouns, adjs) in W.SHAPES.items()},
        "colour": {k: words for k, (words, _) in W.COLOURS.items()},
        "pattern": {k: adjs + phrases for k, (adjs, phrases) in W.PATTERNS.items()},
    }
    found = {}
    for attribute, table in tables.items():
        hits = set()
        for value, phrases in table.items():
            for phrase in phrases:
                if f" {' '.join(W.words_of(phrase.replace('-', ' ')))} " in text:
                    hits.add(value)
        found[attribute] = hits
    return found


def test_splits_are_disjoint_from_the_pool_balanced_and_long_tailed(tiny):
    files = {s: {p for p, _ in _rows(tiny[s])} for s in ("train", "val", "test")}
    files["pool"] = {r["image"] for r in json.loads(Path(tiny["pool_captions"]).read_text())}
    assert len(files["pool"]) == TINY["pool_size"]
    names = list(files)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not files[a] & files[b], f"{a} and {b} share images"
    for split, per_class in (("test", 3), ("val", 2)):
        counts = np.bincount([int(y) for _, y in _rows(tiny[split])], minlength=12)
        assert (counts == per_class).all()
    train = np.bincount([int(y) for _, y in _rows(tiny["train"])], minlength=12)
    assert train.tolist() == tiny["train_counts"]
    ranked = np.sort(train)[::-1]
    expected = [max(1, round(20 * 10 ** (-r / 11))) for r in range(12)]  # n_r = max · ρ^(−r / (C − 1))
    assert ranked.tolist() == expected and ranked[0] == 20 and ranked[-1] == 2
    image = Image.open(Path(tiny["root"]) / _rows(tiny["test"])[0][0])
    assert image.size == (32, 32) and image.mode == "RGB"


def test_pool_captions_never_name_a_class_nor_show_a_target_combination(tiny):
    classes = json.loads(Path(tiny["world"]).read_text())["classes"]
    targets = {(c["shape"], c["colour"], c["pattern"]) for c in classes}
    names = [c["name"] for c in classes]
    assert names == Path(tiny["classes"]).read_text().split()
    full = 0
    for row in json.loads(Path(tiny["pool_captions"]).read_text()):
        caption = row["caption"].lower()
        assert not any(name in caption for name in names), caption
        named = _named(caption)
        assert all(len(v) <= 1 for v in named.values()), caption
        assert sum(len(v) for v in named.values()) >= 2, caption
        if all(named.values()):
            full += 1
            combo = tuple(next(iter(named[a])) for a in ("shape", "colour", "pattern"))
            assert combo not in targets, caption
    assert full > TINY["pool_size"] // 2, "most captions name all three attributes"
    phrasings = {re.sub(r"[a-z-]+", "w", r["caption"]) for r in json.loads(Path(tiny["pool_captions"]).read_text())}
    assert len(phrasings) >= 5, "varied phrasings"


def test_twins_and_names(tiny):
    classes = json.loads(Path(tiny["world"]).read_text())["classes"]
    combos = [(c["shape"], c["colour"], c["pattern"]) for c in classes]
    assert len(set(combos)) == len(combos)
    with_twin = 0
    for i, a in enumerate(combos):
        twins = [classes[j]["name"] for j, b in enumerate(combos) if sum(x != y for x, y in zip(a, b)) == 1]
        assert sorted(twins) == sorted(classes[i]["twins"])
        with_twin += bool(twins)
    assert with_twin >= len(combos) / 3
    banned = W.attribute_words()
    for c in classes:
        assert re.fullmatch(r"[a-z]{4,}", c["name"]), c["name"]
        assert not any(word in c["name"] for word in banned if len(word) >= 3), c["name"]


def test_visual_flags_match_what_the_sentences_name(tiny):
    corpus = json.loads(Path(tiny["corpus"]).read_text())
    flags = json.loads(Path(tiny["visual_sentences"]).read_text())
    classes = {c["name"]: c for c in json.loads(Path(tiny["world"]).read_text())["classes"]}
    assert set(corpus) == set(flags) == set(classes)
    triples = 0
    for name, sentences in corpus.items():
        assert len(sentences) == 12 and len(flags[name]) == 12
        assert sum(flags[name]) == 6, "visual_fraction 0.5 of 12"
        for sentence, visual in zip(sentences, flags[name]):
            named = _named(sentence)
            count = sum(len(v) for v in named.values())
            if visual:
                assert 1 <= count <= 3, sentence
                for attribute, values in named.items():
                    assert values <= {classes[name][attribute]}, (sentence, attribute)
                triples += count == 3
            else:
                assert count == 0 and not set(W.words_of(sentence)) & W.attribute_words(), sentence
    assert 0 < triples <= len(corpus) * 2, "a few sentences name all three attributes"
    other = _build(Path(tiny["root"]).parent / "vf", visual_fraction=0.25, pool_size=10)
    assert all(sum(f) == 3 for f in json.loads(Path(other["visual_sentences"]).read_text()).values())


def test_same_seed_same_world_other_seed_another(tiny, tmp_path):
    again = _build(tmp_path / "again")
    for key in ("train", "test", "val", "pool_captions", "classes", "corpus", "visual_sentences"):
        assert Path(again[key]).read_bytes() == Path(tiny[key]).read_bytes(), key
    rel = _rows(tiny["test"])[5][0]
    assert (tmp_path / "again" / rel).read_bytes() == (Path(tiny["root"]) / rel).read_bytes()
    other = _build(tmp_path / "other", seed=1)
    assert Path(other["classes"]).read_text() != Path(tiny["classes"]).read_text()
    assert Path(other["pool_captions"]).read_bytes() != Path(tiny["pool_captions"]).read_bytes()


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="--num_classes must be between 2 and 128"):
        _build(tmp_path / "a", num_classes=200)
    with pytest.raises(UsageError, match="--imbalance"):
        _build(tmp_path / "b", imbalance=50)  # 20 / 50 < 1 image
    with pytest.raises(UsageError, match="--visual_fraction"):
        _build(tmp_path / "c", visual_fraction=1.5)
    assert not any((tmp_path / f).exists() for f in "abc")
    result = subprocess.run(
        [sys.executable, "-m", "training.world", "--output_dir", str(tmp_path / "d"), "--num_classes", "500"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--num_classes" in result.stderr


def test_standin_clip_learns_the_caption_words_and_loads_as_a_clip(tiny, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from training.standin_clip import build_caption_tokenizer, pretrain_on_captions

    images, captions = W.read_pool_captions(tiny["pool_captions"], tiny["root"])
    tokenizer = build_caption_tokenizer(captions)
    assert tokenizer.tokenize("a striped cyan triangle.")[1:4] == ["striped</w>", "cyan</w>", "triangle</w>"]
    name = Path(tiny["classes"]).read_text().split()[0]
    assert len(tokenizer.tokenize(name)) > 1, "a class name is not a word of the captions"
    out = pretrain_on_captions(images[:64], captions[:64], tmp_path / "clip", seed=0, steps=2, batch_size=8,
                               warmup_steps=1, width=32, layers=1)  # fmt: skip
    model = CLIPModel.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(AutoTokenizer.from_pretrained(out))
    from training.world_measures import premise

    result = premise(out, tiny["root"], tiny["test"], Path(tiny["classes"]).read_text().split())
    assert result["chance"] == pytest.approx(1 / 12) and result["test_images"] == 36
    for key in (
        "zero_shot_by_name_top1",
        "zero_shot_by_visual_descriptions_top1",
        "zero_shot_by_all_descriptions_top1",
    ):
        assert 0 <= result[key] <= 1 and (result[key] * 36) == pytest.approx(round(result[key] * 36))


def test_anchor_visual_share_against_a_naive_count():
    from training.world_measures import anchor_visual_share

    visual_of = {"It is red.": True, "It was found in 1900.": False}
    anchors = [["It is red.", "a photo of a tafa.", "It was found in 1900."], ["It  is red."]]
    assert anchor_visual_share(anchors, visual_of) == pytest.approx(2 / 4)


def test_held_out_class_of_demo_new_class_keeps_its_description_only(tiny, tmp_path):
    from training.demo_new_class import held_out_splits

    held_out = int(np.argmin(tiny["train_counts"]))
    splits = held_out_splits(tiny, held_out, tmp_path)
    name = tiny["class_names"][held_out]
    assert splits["new_label"] == 11 and Path(splits["new_names"]).read_text().split() == [name]
    assert json.loads(Path(splits["new_corpus"]).read_text()) == {
        name: json.loads(Path(tiny["corpus"]).read_text())[name]
    }
    assert name not in json.loads(Path(splits["corpus9"]).read_text())
    assert all(int(y) < 11 for _, y in _rows(splits["train9"]))
    assert sum(int(y) == 11 for _, y in _rows(splits["test10"])) == 3

"""`python -m training.describe_classes`: class corpora from WordNet (a database written here in the real format, and
the real files where installed), a tiny local Wikipedia parquet, a tiny causal LM saved to a folder and a descriptor
file; the corpus loads through the corpus loader and drives anchor selection; every fault is one line."""

import json
import os

import datasets
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from training import describe_classes, run_select_anchors
from training.cli import run_main
from training.corpus import build_class_corpus, split_sentences
from training.describe.classes import ClassEntry, read_class_list
from training.describe.descriptors import descriptor_sentence
from training.describe.llm import CUPL_QUESTIONS, GenerationSettings, LLMDescriber, llm_sentences
from training.describe.wikipedia import lead_section
from training.describe.wordnet import WordNet, parse_data_line
from training.io_utils import DataError

REAL_WORDNET = "/usr/share/wordnet"

# ----------------------------------------------------------------------------------------------------------------------
# A WordNet database in the wndb(5) format: `data.noun` lines start with their own byte offset
# ----------------------------------------------------------------------------------------------------------------------

# key: (lemmas, hypernym keys, instance-hypernym keys, gloss)
SYNSETS = {
    "entity": (["entity"], [], [], "that which is perceived to have its own distinct existence"),
    "animal": (["animal", "beast"], ["entity"], [], "a living organism that moves"),
    "fish": (["fish"], ["animal"], [], "any of various cold-blooded aquatic vertebrates"),
    "cyprinid": (["cyprinid", "cyprinid_fish"], ["fish"], [], "a soft-finned fish of the carp family"),
    "tench": (["tench", "Tinca_tinca"], ["cyprinid"], [], 'freshwater fish of Europe; "the tench lives in ponds"'),
    "bird": (["bird"], ["animal"], [], "warm-blooded egg-laying vertebrates"),
    "crane_bird": (["crane"], ["bird"], [], "large long-necked wading bird of marshes"),
    "device": (["device"], ["entity"], [], "an instrumentality invented for a purpose"),
    "crane_machine": (["crane"], ["device"], [], "lifting machine with a boom"),
    "poet": (["poet"], ["entity"], [], "a writer of poems"),
    "crane_poet": (["Crane", "Hart_Crane"], [], ["poet"], "United States poet (1899-1932)"),
    "goose": (["goose"], ["bird"], [], "web-footed long-necked migratory aquatic birds"),
}
# index.noun sense order, most frequent first: the poet comes first, as "crane" does in WordNet 3.0
SENSES = {
    "crane": ["crane_poet", "crane_machine", "crane_bird"],
    "hart_crane": ["crane_poet"],
}
HEADER = "  1 This is a test database in the WordNet 3.0 format (wndb(5)).  \n  2 No licence text here.  \n"


def _data_line(key: str, offsets: dict[str, int]) -> str:
    lemmas, hypernyms, instances, gloss = SYNSETS[key]
    words = " ".join(f"{w} 0" for w in lemmas)
    pointers = [("@", h) for h in hypernyms] + [("@i", h) for h in instances]
    ptrs = " ".join(f"{symbol} {offsets[target]:08d} n 0000" for symbol, target in pointers)
    return f"{offsets[key]:08d} 03 n {len(lemmas):02x} {words} {len(pointers):03d} {ptrs} | {gloss}  \n".replace(
        "  | ", " | "
    )


def write_wordnet(folder) -> dict[str, int]:
    """Writes data.noun, index.noun and noun.exc; returns each synset's offset. Offsets are 8 digits wide, so each
    line's length is known before the offsets are: lay the lines out with zeros, then write them with the offsets."""
    os.makedirs(folder, exist_ok=True)
    offsets = dict.fromkeys(SYNSETS, 0)
    position = len(HEADER.encode())
    for key in SYNSETS:
        offsets[key] = position
        position += len(_data_line(key, dict.fromkeys(SYNSETS, 0)).encode())
    with open(os.path.join(folder, "data.noun"), "w", encoding="utf-8") as f:
        f.write(HEADER + "".join(_data_line(key, offsets) for key in SYNSETS))
    senses = {lemma.casefold(): [] for key in SYNSETS for lemma in SYNSETS[key][0]}
    for key in SYNSETS:
        for lemma in SYNSETS[key][0]:
            if lemma.casefold() not in SENSES:
                senses[lemma.casefold()].append(key)
    senses.update(SENSES)
    with open(os.path.join(folder, "index.noun"), "w", encoding="utf-8") as f:
        f.write(HEADER)
        for lemma in sorted(senses):
            keys = senses[lemma]
            f.write(f"{lemma} n {len(keys)} 1 @ {len(keys)} 0 {' '.join(f'{offsets[k]:08d}' for k in keys)}  \n")
    with open(os.path.join(folder, "noun.exc"), "w", encoding="utf-8") as f:
        f.write("geese goose\n")
    return offsets


@pytest.fixture(scope="module")
def wordnet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wordnet")
    return str(folder), write_wordnet(folder)


def wnid(offsets, key):
    return f"n{offsets[key]:08d}"


def test_every_offset_points_at_its_own_line(wordnet_dir):
    """A seek to each offset reads the same synset as reading the file line by line."""
    folder, offsets = wordnet_dir
    by_line = {}
    with open(os.path.join(folder, "data.noun"), encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):
                by_line[int(line[:8])] = parse_data_line(line)
    assert sorted(by_line) == sorted(offsets.values())
    wordnet = WordNet(folder)
    for offset, synset in by_line.items():
        assert wordnet.synset(offset) == synset
    assert wordnet.synset(offsets["tench"] + 1) is None  # not the start of a synset: a wrong wnid


def test_wordnet_synset_fields_and_sentences(wordnet_dir):
    folder, offsets = wordnet_dir
    tench = WordNet(folder).by_wnid(wnid(offsets, "tench"))
    assert tench.lemmas == ["tench", "Tinca tinca"]
    assert tench.definition == "freshwater fish of Europe"
    assert tench.examples == ["the tench lives in ponds"]
    assert tench.hypernyms == [offsets["cyprinid"]]


def test_lemma_rule_for_ambiguous_names(wordnet_dir):
    folder, offsets = wordnet_dir
    wordnet = WordNet(folder)
    crane = wordnet.lookup("crane")  # the poet is listed first, but is an instance: the first common noun wins
    assert crane.synset.offset == offsets["crane_machine"] and crane.num_senses == 3
    assert wordnet.lookup("crane (bird)").synset.offset == offsets["crane_bird"]  # the qualifier picks the sense
    assert wordnet.lookup("Hart Crane").synset.offset == offsets["crane_poet"]
    geese = wordnet.lookup("geese")  # noun.exc
    assert geese.synset.offset == offsets["goose"] and geese.plural
    assert wordnet.lookup("tenches").synset.offset == offsets["tench"]  # a regular plural ending
    assert wordnet.lookup("Tinca tinca, tench").synset.offset == offsets["tench"]
    assert wordnet.lookup("unicorn") is None


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_wordnet_source_end_to_end(wordnet_dir, tmp_path, capsys):
    folder, offsets = wordnet_dir
    classes = _write(
        tmp_path / "classes.txt",
        f"{wnid(offsets, 'tench')} tench, Tinca tinca\n{wnid(offsets, 'crane_bird')} crane\n"
        f"{wnid(offsets, 'crane_machine')} crane\ngeese\nunicorn\n",
    )
    out = tmp_path / "corpus.json"
    report = describe_classes.main(
        ["--class_names", classes, "--sources", "wordnet", "--wordnet_dir", folder, "--output", str(out)]
    )
    corpus = json.loads(out.read_text())
    assert corpus["tench"] == [
        "A tench is a freshwater fish of Europe.",
        "A tench is also called Tinca tinca.",
        "A tench is a kind of cyprinid.",
        "A tench is a kind of fish.",
        "A tench is a kind of animal.",
        "The tench lives in ponds.",
    ]  # three hypernym levels by default
    names = (tmp_path / "corpus.classes.txt").read_text().splitlines()
    assert names == ["tench", f"crane ({wnid(offsets, 'crane_bird')})", f"crane ({wnid(offsets, 'crane_machine')})",
                     "geese", "unicorn"]  # fmt: skip
    assert corpus[names[1]][0] == "A crane is a large long-necked wading bird of marshes."
    assert corpus[names[2]][0] == "A crane is a lifting machine with a boom."
    assert corpus["geese"][0] == "Geese are web-footed long-necked migratory aquatic birds."
    assert "unicorn" not in corpus
    coverage = json.loads((tmp_path / "corpus.coverage.json").read_text())
    assert coverage == {k: v for k, v in report.items() if k not in ("coverage_file", "classes_file")}
    assert coverage["classes_without_sentences"] == ["unicorn"] and coverage["unmatched"]["wordnet"] == ["unicorn"]
    assert coverage["sentences_per_source"]["wordnet"] == sum(len(v) for v in corpus.values())
    assert [c["matched"].get("wordnet") for c in coverage["classes"]][:4] == ["wnid", "wnid", "wnid", "lemma 'goose'"]
    printed = capsys.readouterr().out
    assert "wordnet: 4/5 classes" in printed and "'unicorn'" in printed and "corpus.classes.txt" in printed
    # the corpus (with a class added by hand for the unmatched one) is what the corpus loader reads
    corpus["unicorn"] = ["A unicorn is a horse with one horn."]
    out.write_text(json.dumps(corpus))
    loaded = build_class_corpus(names, out, use_templates=False)
    assert loaded.class_sentences(0) == corpus["tench"]


@pytest.mark.skipif(not os.path.isfile(f"{REAL_WORDNET}/data.noun"), reason="WordNet 3.0 (wordnet-base) not installed")
def test_real_wordnet_files():
    wordnet = WordNet(REAL_WORDNET)
    tench = wordnet.by_wnid("n01440764")
    assert tench.lemmas[:2] == ["tench", "Tinca tinca"]
    assert tench.definition.startswith("freshwater dace-like game fish of Europe and western Asia")
    goldfish = wordnet.lookup("goldfish")
    assert goldfish.how == "lemma" and goldfish.synset.wnid == "n01443537"  # ImageNet's goldfish class
    crane = wordnet.lookup("crane")  # WordNet lists the poet Hart Crane first
    assert not crane.synset.instance_of and crane.num_senses == 5
    assert wordnet.lookup("crane (bird)").synset.wnid == "n02012849"  # ImageNet's crane, the bird


def test_missing_wordnet_dir_is_one_line(tmp_path, capsys):
    classes = _write(tmp_path / "classes.txt", "tench\n")
    argv = ["--class_names", classes, "--wordnet_dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit) as exit_info:
        run_main(describe_classes.main, "describe_classes", argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "nowhere: no WordNet database there" in err and "wordnet-base" in err


def test_class_list_forms(tmp_path, wordnet_dir):
    folder, offsets = wordnet_dir
    path = _write(tmp_path / "c.txt", f"red_square\n{wnid(offsets, 'goose')}\nn00000001 maillot, tank suit|\n")
    entries = read_class_list(path, WordNet(folder))
    assert [(e.name, e.wnid, e.aliases) for e in entries] == [
        ("red square", None, []), ("goose", wnid(offsets, "goose"), []), ("maillot", "n00000001", ["tank suit"]),
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"c2.txt:1: wnid n00000001 without a name"):
        read_class_list(_write(tmp_path / "c2.txt", "n00000001\n"), WordNet(folder))


# ----------------------------------------------------------------------------------------------------------------------
# Wikipedia: a tiny local parquet dump
# ----------------------------------------------------------------------------------------------------------------------

TENCH_ARTICLE = (
    "The tench or doctor fish (Tinca tinca) is a fresh- and brackish-water fish. It is found in Europe.\n\n"
    "It has a thick skin.\n\nDescription\n\nThe tench has a stocky body. It is olive green."
)


def test_lead_section_stops_at_the_first_heading():
    assert lead_section(TENCH_ARTICLE) == (
        "The tench or doctor fish (Tinca tinca) is a fresh- and brackish-water fish. It is found in Europe.\n"
        "It has a thick skin."
    )
    assert lead_section("Intro text here.\n== History ==\nLater.") == "Intro text here."


def test_wikipedia_source(tmp_path, wordnet_dir):
    folder, offsets = wordnet_dir
    dump = tmp_path / "wiki"
    dump.mkdir()
    rows = {
        "title": ["Crane", "Tench", "Cyprinid fish", "tench", "Goose", "Red square"],
        "text": ["Crane may refer to:\n\nCrane (bird)\n\nCrane (machine)",
                 TENCH_ARTICLE, "Cyprinid fish are carp. They swim.", "A lower-case duplicate title. Ignored.",
                 "Geese are birds. They honk.", "A red square is a square that is red."],
    }  # fmt: skip
    datasets.Dataset.from_dict(rows).to_parquet(str(dump / "part-0.parquet"))
    classes = _write(
        tmp_path / "classes.txt", f"Tench\n{wnid(offsets, 'cyprinid')} cyprinid\ncrane\nRed_Square\nunicorn\n"
    )
    out = tmp_path / "corpus.json"
    report = describe_classes.main(
        ["--class_names", classes, "--sources", "wikipedia", "--wikipedia", str(dump), "--wordnet_dir", folder,
         "--output", str(out)]
    )  # fmt: skip
    corpus = json.loads(out.read_text())
    lead = lead_section(TENCH_ARTICLE)
    assert corpus["Tench"] == [s for p in lead.splitlines() for s in split_sentences(p)]  # exact title beats "tench"
    assert corpus["cyprinid"] == ["Cyprinid fish are carp.", "They swim."]  # by its WordNet lemma "cyprinid fish"
    assert corpus["Red Square"] == ["A red square is a square that is red."]  # case-folded, underscores as spaces
    assert "crane" not in corpus  # a disambiguation page describes nothing
    matched = {c["name"]: c["matched"].get("wikipedia") for c in report["classes"]}
    assert matched["Tench"] == "title 'Tench' (exact)"
    assert matched["cyprinid"] == "title 'Cyprinid fish' (WordNet lemma)"
    assert matched["Red Square"] == "title 'Red square' (case-folded)"
    assert report["unmatched"]["wikipedia"] == ["crane", "unicorn"]


# ----------------------------------------------------------------------------------------------------------------------
# LLM: a tiny causal LM trained for a moment to repeat two sentences, with a byte-level tokenizer built offline
# ----------------------------------------------------------------------------------------------------------------------


def _byte_tokenizer() -> GPT2Tokenizer:
    vocab = {"<|endoftext|>": 0}
    for c in sorted(ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    return GPT2Tokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """Two folders: a plain causal LM, and the same weights with a chat template."""
    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    ids = torch.tensor([tokenizer(" A tench has red fins. It swims in lakes." * 6).input_ids[:200]])
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    plain, chat = tmp_path_factory.mktemp("lm"), tmp_path_factory.mktemp("chat_lm")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    model.save_pretrained(chat)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(chat)
    return str(plain), str(chat)


ENTRIES = [ClassEntry("tench"), ClassEntry("goldfish"), ClassEntry("eel")]


def test_llm_mechanics_batching_determinism_and_cache(tiny_lm, tmp_path):
    plain, _ = tiny_lm
    settings = GenerationSettings(max_new_tokens=40, batch_size=4)
    describer = LLMDescriber(plain, settings, tmp_path / "cache_a")
    assert not describer.chat
    sentences, unnamed = llm_sentences(ENTRIES, describer, sentences_per_class=3)
    assert describer.generated == len(ENTRIES) * len(CUPL_QUESTIONS) and describer.from_cache == 0
    assert all(0 < len(sentences[c]) <= 3 for c in range(3))
    for c, entry in enumerate(ENTRIES):  # the count of kept sentences that do not name the class, counted here again
        assert unnamed[c] == sum(entry.name not in s.lower() for s in sentences[c])
    assert unnamed[1] == len(sentences[1])  # the model only ever talks about tench
    # another cache, batches of one: the same text (greedy)
    alone = LLMDescriber(plain, GenerationSettings(max_new_tokens=40, batch_size=1), tmp_path / "cache_b")
    assert llm_sentences(ENTRIES, alone, 3) == (sentences, unnamed)
    # the same cache again, one class more: only the new class's five questions are asked
    again = LLMDescriber(plain, settings, tmp_path / "cache_a")
    more = llm_sentences([*ENTRIES, ClassEntry("carp")], again, 3)
    assert (again.generated, again.from_cache) == (len(CUPL_QUESTIONS), len(ENTRIES) * len(CUPL_QUESTIONS))
    assert {c: more[0][c] for c in range(3)} == sentences
    # drop: only sentences that name the class remain
    dropped, _ = llm_sentences(ENTRIES, again, 3, unnamed="drop")
    assert dropped[1] == [] and all("tench" in s.lower() for s in dropped[0])


def test_llm_source_with_chat_template_from_the_command_line(tiny_lm, tmp_path, capsys):
    _, chat = tiny_lm
    classes = _write(tmp_path / "classes.txt", "tench\ngoldfish\n")
    argv = ["--class_names", classes, "--sources", "llm", "--llm_model", chat, "--llm_cache_dir", str(tmp_path / "c"),
            "--sentences_per_class", "2", "--llm_max_new_tokens", "40", "--output", str(tmp_path / "corpus.json")]  # fmt: skip
    first = describe_classes.main(argv)
    assert first["llm"]["chat_template"] and first["llm"]["generated"] == 10
    corpus = json.loads((tmp_path / "corpus.json").read_text())
    second = describe_classes.main(argv)
    assert second["llm"]["generated"] == 0 and second["llm"]["from_cache"] == 10
    assert json.loads((tmp_path / "corpus.json").read_text()) == corpus
    assert "10 from the cache" in capsys.readouterr().out


def test_a_model_that_is_not_a_causal_lm_is_one_line(tiny_clip_dir, tmp_path, capsys):
    classes = _write(tmp_path / "classes.txt", "tench\n")
    for model, expected in [(tiny_clip_dir, "a 'clip' model, not a causal language model"),
                            (str(tmp_path), "not a model folder or Hub name")]:  # fmt: skip
        argv = [
            "--class_names",
            classes,
            "--sources",
            "llm",
            "--llm_model",
            model,
            "--output",
            str(tmp_path / "c.json"),
        ]
        with pytest.raises(SystemExit):
            run_main(describe_classes.main, "describe_classes", argv)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--llm_model {model}: {expected}" in err, err


# ----------------------------------------------------------------------------------------------------------------------
# Descriptor files, and the corpus driving anchor selection
# ----------------------------------------------------------------------------------------------------------------------


def test_descriptor_sentences_follow_menon_and_vondrick():
    assert descriptor_sentence("tench", "small eyes") == "tench, which has small eyes."
    assert (
        descriptor_sentence("tench", "olive green or brown in color")
        == "tench, which has olive green or brown in color."
    )
    assert descriptor_sentence("tench", "a slimy body") == "tench, which is a slimy body."
    assert descriptor_sentence("tench", "aquatic") == "tench, which is aquatic."  # their rule: any leading "a"
    assert descriptor_sentence("axe", "used for chopping wood.") == "axe, which is used for chopping wood."
    assert descriptor_sentence("cat", "has whiskers") == "cat, which has whiskers."
    assert descriptor_sentence("cat", "often  sleeps") == "cat, which often sleeps."


@pytest.mark.parametrize(
    "text, fault",
    [("{not json", "not valid JSON"), ('["tench"]', "expected a JSON object"),
     ('{"tench": "small eyes"}', "the entry for class 'tench' must be a list"),
     ('{"tench": ["a"], "tench": ["b"]}', "the key 'tench' appears twice")],
)  # fmt: skip
def test_a_malformed_descriptor_file_is_one_line(tmp_path, capsys, text, fault):
    classes = _write(tmp_path / "classes.txt", "tench\n")
    descriptors = _write(tmp_path / "descriptors.json", text)
    argv = ["--class_names", classes, "--sources", "descriptors", "--descriptors", descriptors,
            "--output", str(tmp_path / "c.json")]  # fmt: skip
    with pytest.raises(SystemExit):
        run_main(describe_classes.main, "describe_classes", argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and descriptors in err and fault in err, err


def test_require_all_names_the_class_without_sentences(tmp_path, capsys):
    classes = _write(tmp_path / "classes.txt", "tench\nunicorn\n")
    descriptors = _write(tmp_path / "d.json", json.dumps({"Tench": ["small eyes"]}))
    out = tmp_path / "c.json"
    argv = ["--class_names", classes, "--sources", "descriptors", "--descriptors", descriptors, "--output", str(out),
            "--require_all"]  # fmt: skip
    with pytest.raises(SystemExit):
        run_main(describe_classes.main, "describe_classes", argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'unicorn'" in err and "--require_all" in err
    assert not out.exists() and (tmp_path / "c.coverage.json").exists()


def test_descriptor_keys_by_order(tmp_path, capsys, caplog):
    """A file listing every class in order under other names (CLIP's curated ImageNet names): by name only the
    matching classes are found, with a hint; by order, all of them; a file of another length is one line."""
    classes = _write(tmp_path / "classes.txt", "n01514668 cock\nn01440764 tench, Tinca tinca\n")
    descriptors = _write(tmp_path / "d.json", json.dumps({"rooster": ["a red comb"], "tench": ["small eyes"]}))
    argv = ["--class_names", classes, "--sources", "descriptors", "--descriptors", descriptors,
            "--output", str(tmp_path / "c.json")]  # fmt: skip
    by_name = describe_classes.main(argv)
    assert by_name["unmatched"]["descriptors"] == ["cock"]
    assert "--descriptor_keys order matches every class by position" in caplog.text
    describe_classes.main([*argv, "--descriptor_keys", "order"])
    assert json.loads((tmp_path / "c.json").read_text()) == {
        "cock": ["cock, which is a red comb."], "tench": ["tench, which has small eyes."]
    }  # fmt: skip
    _write(tmp_path / "d.json", json.dumps({"rooster": ["a red comb"]}))
    with pytest.raises(SystemExit):
        run_main(describe_classes.main, "describe_classes", [*argv, "--descriptor_keys", "order"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the file has 1 keys for 2 classes" in err, err


def test_descriptor_corpus_drives_anchor_selection(tiny_clip_dir, lt_dataset, tmp_path):
    """The built corpus is a --text_corpus like a hand-written one: run_select_anchors scores its sentences."""
    d = lt_dataset
    names = open(d["classes"]).read().split("\n")[:4]
    descriptors = {name.upper(): [f"a {name.split()[0]} colour", "sharp corners", "has a dark background"]
                   for name in names}  # fmt: skip
    path = _write(tmp_path / "descriptors.json", json.dumps(descriptors))
    out = tmp_path / "corpus.json"
    report = describe_classes.main(
        ["--class_names", d["classes"], "--sources", "descriptors", "--descriptors", path, "--output", str(out)]
    )
    assert report["classes_without_sentences"] == [] and report["classes_per_source"]["descriptors"] == 4
    corpus = json.loads(out.read_text())
    assert corpus["red square"] == [
        "red square, which is a red colour.", "red square, which has sharp corners.",
        "red square, which has a dark background.",
    ]  # fmt: skip
    results = run_select_anchors.main(
        ["--model_name_or_path", tiny_clip_dir, "--selection_file", d["val"], "--image_root", d["root"],
         "--class_names", d["classes"], "--text_corpus", str(out), "--no_use_templates", "--num_anchor_sentences",
         "2", "--output_dir", str(tmp_path / "anchors"), "--use_cpu", "--report_to", "none", "--disable_tqdm", "True"]
    )  # fmt: skip
    assert results["num_sentences"] == 12
    anchors = json.loads((tmp_path / "anchors" / "anchors.json").read_text())
    chosen = json.dumps(anchors)
    assert "red square, which" in chosen and "yellow dot, which" in chosen
    assert (tmp_path / "anchors" / "anchor_report.md").read_text().count("which") >= 8

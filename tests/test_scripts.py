"""The four commands of a user's run, in order (stage 1, anchor selection, stage 2, evaluation), checked against
independent recomputations: the stored anchors, the shot groups, the metrics and the model card."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoTokenizer, pipeline

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel
from training import add_classes, run_cvlp, run_eval, run_lgr, run_select_anchors
from training.corpus import IMAGENET_TEMPLATES

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]
M = 6


@pytest.fixture(scope="module")
def pipeline_run(tiny_clip_dir, lt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    d = lt_dataset
    common = ["--image_root", d["root"], *FAST]
    run_cvlp.main(
        ["--model_name_or_path", tiny_clip_dir, "--train_file", d["train"], "--class_names", d["classes"],
         "--text_corpus", d["corpus"], "--output_dir", str(out / "stage1"), "--num_train_epochs", "2",
         "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--crop_scale_min", "0.5", *common]
    )  # fmt: skip
    run_select_anchors.main(
        ["--model_name_or_path", str(out / "stage1"), "--selection_file", d["val"], "--class_names", d["classes"],
         "--text_corpus", d["corpus"], "--num_anchor_sentences", str(M), "--output_dir", str(out / "anchors"), *common]
    )  # fmt: skip
    run_lgr.main(
        ["--model_name_or_path", str(out / "anchors"), "--train_file", d["train"], "--output_dir", str(out / "stage2"),
         "--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", *common]
    )  # fmt: skip
    report = run_eval.main(
        ["--model_name_or_path", str(out / "stage2"), "--test_file", d["test"], "--train_file", d["train"],
         "--output_dir", str(out / "eval"), "--many_shot_threshold", "8", "--few_shot_threshold", "4",
         "--explain", "4", *common]
    )  # fmt: skip
    return out, report


def test_stored_anchors_are_the_lowest_scoring_sentences(pipeline_run, lt_dataset):
    out, _ = pipeline_run
    stage1 = VLLTRModel.from_pretrained(out / "stage1").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "stage1")
    processor = AutoImageProcessor.from_pretrained(out / "anchors")
    class_names = open(lt_dataset["classes"]).read().split("\n")[:4]
    corpus = json.load(open(lt_dataset["corpus"]))
    # the sentence pool of each class, rebuilt from the inputs: the 80 templates, then the corpus sentences
    sentences = [(c, t.format(name)) for c, name in enumerate(class_names) for t in IMAGENET_TEMPLATES]
    sentences += [(c, s) for c, name in enumerate(class_names) for s in corpus[name]]
    from PIL import Image

    lines = [line.split() for line in open(lt_dataset["val"]).read().splitlines() if line.strip()]
    images = [Image.open(f"{lt_dataset['root']}/{path}").convert("RGB") for path, _ in lines]
    image_labels = [int(label) for _, label in lines]
    with torch.no_grad():
        enc = tokenizer(
            [s for _, s in sentences], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        text = stage1.get_text_features(enc["input_ids"], enc["attention_mask"]).pooler_output.double()
        image = stage1.get_image_features(
            processor(images=images, return_tensors="pt")["pixel_values"]
        ).pooler_output.double()
    scale = stage1.clip.logit_scale.exp().double()
    text_unit, image_unit = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    scores = []
    for (c, _), t in zip(sentences, text_unit):
        log_probs = torch.log_softmax(scale * image_unit @ t, dim=0)
        positives = [k for k, y in enumerate(image_labels) if y == c]
        scores.append(-sum(log_probs[k] for k in positives).item() / len(positives))

    model = VLLTRForImageClassification.from_pretrained(out / "anchors")
    assert model.anchor_mask.all()
    for c in range(4):
        ranked = sorted((s, i) for i, ((label, _), s) in enumerate(zip(sentences, scores)) if label == c)
        expected = torch.stack([text[i] for _, i in ranked[:M]]).float()
        torch.testing.assert_close(model.anchor_text_embeds[c], expected, rtol=1e-4, atol=1e-5)
        # the checkpoint carries each anchor's text, slot by slot, through stage 2 as well
        texts = [sentences[i][1] for _, i in ranked[:M]]
        assert model.config.anchor_sentences[c] == texts
        assert VLLTRForImageClassification.from_pretrained(out / "stage2").config.anchor_sentences[c] == texts
    torch.testing.assert_close(model.clip.logit_scale, stage1.clip.logit_scale)
    report = (out / "anchors" / "anchor_report.md").read_text()
    best = min((s, i) for i, ((label, _), s) in enumerate(zip(sentences, scores)) if label == 0)
    assert sentences[best[1]][1] in report


def test_eval_explains_images_with_their_anchor_sentences(pipeline_run, lt_dataset):
    from PIL import Image

    out, _ = pipeline_run
    items = json.loads((out / "eval" / "explanations.json").read_text())
    report = (out / "eval" / "explanations.md").read_text()
    assert len(items) == 4 and (out / "eval" / "explanations.png").stat().st_size > 0
    model = VLLTRForImageClassification.from_pretrained(out / "stage2").eval()
    processor = AutoImageProcessor.from_pretrained(out / "stage2")
    lines = [line.split() for line in open(lt_dataset["test"]).read().splitlines() if line.strip()]
    for item in items:
        path, label = lines[item["index"]]
        image = Image.open(f"{lt_dataset['root']}/{path}").convert("RGB")
        expected = model.explain(processor(images=image, return_tensors="pt")["pixel_values"], top_k=5)[0]
        assert item["true_label"] == int(label) and item["where"].endswith(f"test.txt:{item['index'] + 1}")
        assert item["predicted"]["label"] == expected["label"]
        assert (item["true"] is None) == (expected["label"] == int(label))
        got = [(a["sentence"], a["weight"]) for a in item["predicted"]["anchors"]]
        assert [s for s, _ in got] == [a["sentence"] for a in expected["anchors"]]
        assert [w for _, w in got] == pytest.approx([a["weight"] for a in expected["anchors"]], abs=1e-5)
        assert all(s in model.config.anchor_sentences[expected["label"]] for s, _ in got)
        assert f"## Image {item['index']} " in report and " ".join(got[0][0].split()) in report


def test_metrics_shot_groups_match_the_split_files(pipeline_run, lt_dataset):
    out, report = pipeline_run
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    train_counts = np.bincount(
        [int(line.split()[1]) for line in open(lt_dataset["train"]) if line.strip()], minlength=4
    )
    assert metrics["per_class"]["train_count"] == train_counts.tolist()
    groups = ["many" if n > 8 else "few" if n < 4 else "medium" for n in train_counts]
    for group in ("many", "medium", "few"):
        assert metrics[f"num_{group}_classes"] == groups.count(group)
    # recompute the predictions through the stock pipeline, and the accuracies from them
    classifier = pipeline("image-classification", model=str(out / "stage2"), device="cpu")
    lines = [line.split() for line in open(lt_dataset["test"]).read().splitlines() if line.strip()]
    predicted = [classifier(f"{lt_dataset['root']}/{path}", top_k=1)[0]["label"] for path, _ in lines]
    id2label = classifier.model.config.id2label
    correct = [p == id2label[int(label)] for p, (_, label) in zip(predicted, lines)]
    assert metrics["top1"] == pytest.approx(np.mean(correct))
    per_class = [np.mean([ok for ok, (_, y) in zip(correct, lines) if int(y) == c]) for c in range(4)]
    for group in ("many", "medium", "few"):
        members = [per_class[c] for c in range(4) if groups[c] == group]
        if members:
            assert metrics[f"{group}_top1"] == pytest.approx(np.mean(members))
    assert (out / "eval" / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_reports_the_measured_numbers(pipeline_run, tmp_path_factory):
    out, report = pipeline_run
    card = ModelCard.load(out / "stage2" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["Top-1"] == round(100 * report["top1"], 2)
    for group in ("many", "medium", "few"):
        if not math.isnan(report[f"{group}_top1"]):
            assert values[f"Top-1 {group}-shot"] == round(100 * report[f"{group}_top1"], 2)
    text = card.text
    assert "Stage 1: class-wise visual-linguistic pre-training" in text and "Anchor sentence selection" in text
    assert f"| num_anchor_sentences | {M} |" in text
    assert str(tmp_path_factory.getbasetemp()) not in str(card), "the card names a path of the training machine"
    history = json.loads((out / "stage2" / "training_history.json").read_text())
    assert [h["stage"] for h in history] == ["base", "cvlp", "anss", "lgr", "eval"]


def test_every_checkpoint_has_code_processor_and_card(pipeline_run):
    out, _ = pipeline_run
    for stage in ("stage1", "anchors", "stage2"):
        files = {p.name for p in (out / stage).iterdir()}
        assert {"config.json", "model.safetensors", "modeling_vlltr.py", "configuration_vlltr.py",
                "preprocessor_config.json", "README.md", "training_history.json"} <= files, stage  # fmt: skip
    processor = json.loads((out / "stage2" / "preprocessor_config.json").read_text())
    # the official eval transform (short side int(256 / 224 · 32) = 36, crop 32) as LevitImageProcessor states it
    assert processor["image_processor_type"].startswith("LevitImageProcessor")
    assert processor["size"] == {"shortest_edge": 32} and processor["crop_size"] == {"height": 32, "width": 32}


def test_a_used_output_folder_is_refused(pipeline_run, lt_dataset, tiny_clip_dir, capsys):
    out, _ = pipeline_run
    argv = ["--model_name_or_path", tiny_clip_dir, "--train_file", lt_dataset["train"], "--class_names",
            lt_dataset["classes"], "--text_corpus", lt_dataset["corpus"], "--output_dir", str(out / "stage1"), *FAST]  # fmt: skip
    before = sorted(p.name for p in (out / "stage1").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        from training.cli import run_main

        run_main(run_cvlp.main, "run_cvlp", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "already holds a run from run_cvlp" in err and "--resume_from_checkpoint" in err
    )
    assert sorted(p.name for p in (out / "stage1").iterdir()) == before


def _folder_digest(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_add_classes_from_text(pipeline_run, lt_dataset, tmp_path, capsys):
    from PIL import Image

    from modeling_vlltr.modeling_vlltr import anchors_closest_to_mean
    from training.cli import run_main

    out, _ = pipeline_run
    source = out / "stage2"
    before = _folder_digest(source)
    (tmp_path / "new.txt").write_text("purple_star\n")
    sentences = ["A purple star on a dark background.", "Five purple points around a centre."]
    (tmp_path / "new.json").write_text(json.dumps({"purple star": sentences}))
    argv = ["--model_name_or_path", str(source), "--class_names", str(tmp_path / "new.txt"), "--text_corpus",
            str(tmp_path / "new.json"), "--output_dir", str(tmp_path / "grown"), *FAST]  # fmt: skip
    result = add_classes.main(argv)
    assert result == {"new_labels": [4], "num_labels_before": 4, "num_labels": 5}

    old = VLLTRForImageClassification.from_pretrained(source).eval()
    grown = VLLTRForImageClassification.from_pretrained(tmp_path / "grown").eval()
    assert grown.config.id2label[4] == "purple star" and grown.config.text_only_classes == [4]
    processor = AutoImageProcessor.from_pretrained(tmp_path / "grown")
    lines = [line.split() for line in open(lt_dataset["test"]).read().splitlines() if line.strip()]
    images = [Image.open(f"{lt_dataset['root']}/{path}").convert("RGB") for path, _ in lines]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        a, b = old(pixels), grown(pixels)
        # the four trained classes: unchanged branch logits and the same order of fused logits
        torch.testing.assert_close(b.image_logits[:, :4], a.image_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.text_logits[:, :4], a.text_logits, rtol=0, atol=1e-6)
        assert torch.equal(b.logits[:, :4].argsort(-1), a.logits.argsort(-1))
        # its anchors: templates + descriptions, embedded by the checkpoint's text tower, closest to their mean
        pool = [t.format("purple star") for t in IMAGENET_TEMPLATES] + sentences
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "grown")
        enc = tokenizer(pool, padding="max_length", max_length=77, return_tensors="pt")
        embeds = old.clip.get_text_features(**enc).pooler_output
    chosen = anchors_closest_to_mean(embeds, M)
    torch.testing.assert_close(grown.anchor_text_embeds[4], embeds[chosen], rtol=1e-5, atol=1e-6)
    assert grown.config.anchor_sentences[4] == [pool[i] for i in chosen.tolist()]
    card = ModelCard.load(tmp_path / "grown" / "README.md").text
    assert "Classes added from their descriptions" in card and "purple star" in card
    assert _folder_digest(source) == before

    # a class that exists already: one line, exit status 2, nothing written
    (tmp_path / "dup.txt").write_text("red square\n")
    (tmp_path / "dup.json").write_text(json.dumps({"red square": ["A red square."]}))
    argv = ["--model_name_or_path", str(source), "--class_names", str(tmp_path / "dup.txt"), "--text_corpus",
            str(tmp_path / "dup.json"), "--output_dir", str(tmp_path / "dup"), *FAST]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(add_classes.main, "add_classes", argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bar
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("add_classes: error: "), errors
    err = errors[0]
    assert "Class 'red square' already exists in this checkpoint (label 0)" in err
    assert not any((tmp_path / "dup").iterdir())
    assert _folder_digest(source) == before


def test_added_class_gets_anss_anchors_and_its_own_row_from_a_few_images(pipeline_run, lt_dataset, tmp_path):
    """add_classes, then with 5 images: run_select_anchors --classes re-scores only its anchors (AnSS, recomputed
    here), and run_lgr --train_classes trains only its row of the image branch; every other weight is unchanged."""
    from PIL import Image, ImageDraw

    out, _ = pipeline_run
    root = lt_dataset["root"]
    rng = np.random.default_rng(7)
    new_lines = {"train": [], "sel": []}
    for split, count in (("train", 5), ("sel", 3)):
        for i in range(count):
            image = Image.fromarray(rng.integers(0, 60, size=(40, 40, 3), dtype="uint8"))
            cx, cy = 20 + int(rng.integers(-4, 5)), 20
            star = [(cx + r * math.cos(a), cy + r * math.sin(a))
                    for k in range(10) for r, a in [((14, 6)[k % 2], math.pi * k / 5)]]  # fmt: skip
            ImageDraw.Draw(image).polygon(star, fill=(170, 40, 200))
            image.save(tmp_path / f"star_{split}_{i}.png")
            new_lines[split].append(f"{tmp_path}/star_{split}_{i}.png 4")
    base = {"train": lt_dataset["train"], "sel": lt_dataset["val"]}
    lists = {}
    for split in ("train", "sel"):
        old = [f"{root}/{line}" for line in open(base[split]).read().split("\n") if line.strip()]
        lists[split] = tmp_path / f"{split}.txt"
        lists[split].write_text("\n".join(old + new_lines[split]) + "\n")
    names = [*open(lt_dataset["classes"]).read().split("\n")[:4], "purple star"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "new.txt").write_text("purple star\n")
    corpus = json.load(open(lt_dataset["corpus"]))
    corpus["purple star"] = ["A purple star on a dark background.", "Five purple points.", "It is a star."]
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    (tmp_path / "new.json").write_text(json.dumps({"purple star": corpus["purple star"]}))

    common = ["--image_root", "/", *FAST]
    add_classes.main(["--model_name_or_path", str(out / "stage2"), "--class_names", str(tmp_path / "new.txt"),
                      "--text_corpus", str(tmp_path / "new.json"), "--output_dir", str(tmp_path / "grown"), *FAST])  # fmt: skip
    run_select_anchors.main(
        ["--model_name_or_path", str(tmp_path / "grown"), "--classes", "purple star", "--selection_file",
         str(lists["sel"]), "--class_names", str(tmp_path / "classes.txt"), "--text_corpus",
         str(tmp_path / "corpus.json"), "--output_dir", str(tmp_path / "reselected"), *common]
    )  # fmt: skip
    grown = VLLTRForImageClassification.from_pretrained(tmp_path / "grown")
    reselected = VLLTRForImageClassification.from_pretrained(tmp_path / "reselected")
    for name, tensor in grown.state_dict().items():  # only the new class's anchors moved
        other = reselected.state_dict()[name]
        assert torch.equal(tensor[:4], other[:4]) if name.startswith("anchor_") else torch.equal(tensor, other), name
    assert reselected.config.text_only_classes == [4]  # its image row is still untrained

    # AnSS recomputed: L_lin of each of its sentences against every selection image, its own images as positives
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "grown")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "grown")
    pool = [t.format("purple star") for t in IMAGENET_TEMPLATES] + corpus["purple star"]
    lines = [line.rsplit(" ", 1) for line in lists["sel"].read_text().splitlines()]
    with torch.no_grad():
        enc = tokenizer(pool, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = grown.clip.get_text_features(**enc).pooler_output.double()
        images = [Image.open(path).convert("RGB") for path, _ in lines]
        image = grown.clip.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"])
    image_unit, scale = F.normalize(image.pooler_output.double(), dim=-1), grown.clip.logit_scale.exp().double()
    positives = [k for k, (_, y) in enumerate(lines) if y == "4"]
    scores = [-torch.log_softmax(scale * image_unit @ F.normalize(t, dim=0), 0)[positives].mean().item() for t in text]
    best = sorted(range(len(pool)), key=lambda i: scores[i])[:M]
    assert reselected.config.anchor_sentences[4] == [pool[i] for i in best]
    torch.testing.assert_close(reselected.anchor_text_embeds[4], text[best].float(), rtol=1e-4, atol=1e-5)

    run_lgr.main(
        ["--model_name_or_path", str(tmp_path / "reselected"), "--train_classes", "purple star", "--train_file",
         str(lists["train"]), "--class_names", str(tmp_path / "classes.txt"), "--output_dir", str(tmp_path / "row"),
         "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", *common]
    )  # fmt: skip
    trained = VLLTRForImageClassification.from_pretrained(tmp_path / "row")
    after = trained.state_dict()
    for name, tensor in reselected.state_dict().items():
        if name.startswith("image_branch.fc2."):
            assert torch.equal(after[name][:4], tensor[:4]) and not torch.equal(after[name][4], tensor[4]), name
        else:
            assert torch.equal(after[name], tensor), name
    assert trained.config.text_only_classes is None  # its row is trained: fused like the others


def test_stage1_from_an_imagefolder_dataset_and_an_inaturalist_json(tiny_clip_dir, lt_dataset, tmp_path):
    """The other two data sources a user can bring: a 🤗 `datasets` image folder (class names from its ClassLabel
    feature) and iNaturalist 2018 JSON files (class names from the categories)."""
    import shutil

    rows = [line.split() for line in open(lt_dataset["train"]).read().splitlines() if line.strip()]
    folder = tmp_path / "imagefolder" / "train"
    for path, label in rows:
        target = folder / f"class_{label}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{lt_dataset['root']}/{path}", target)
    results = run_cvlp.main(
        ["--model_name_or_path", tiny_clip_dir, "--dataset_name", "imagefolder", "--data_dir",
         str(tmp_path / "imagefolder"), "--text_corpus", "templates", "--output_dir", str(tmp_path / "hf"),
         "--max_steps", "1", "--per_device_train_batch_size", "4", *FAST]
    )  # fmt: skip
    assert results["train_loss"] > 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == [f"class_{c}" for c in range(4)]

    inat = {
        "images": [{"id": 100 + i, "file_name": path} for i, (path, _) in enumerate(rows)][::-1],  # other order
        "annotations": [{"id": i, "image_id": 100 + i, "category_id": 10 + int(y)} for i, (_, y) in enumerate(rows)],
        "categories": [{"id": 10 + c, "name": name} for c, name in enumerate(["red", "green", "blue", "yellow"])],
    }
    (tmp_path / "train2018.json").write_text(json.dumps(inat))
    run_cvlp.main(
        ["--model_name_or_path", tiny_clip_dir, "--train_file", str(tmp_path / "train2018.json"), "--image_root",
         lt_dataset["root"], "--text_corpus", "templates", "--output_dir", str(tmp_path / "inat"), "--max_steps", "1",
         "--per_device_train_batch_size", "4", *FAST]
    )  # fmt: skip
    config = json.loads((tmp_path / "inat" / "config.json").read_text())
    assert [config["id2label"][str(c)] for c in range(4)] == ["red", "green", "blue", "yellow"]

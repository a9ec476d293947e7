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
from training import run_cvlp, run_eval, run_lgr, run_select_anchors
from training.data import IMAGENET_TEMPLATES

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
         "--output_dir", str(out / "eval"), "--many_shot_threshold", "8", "--few_shot_threshold", "4", *common]
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
    torch.testing.assert_close(model.clip.logit_scale, stage1.clip.logit_scale)
    report = (out / "anchors" / "anchor_report.md").read_text()
    best = min((s, i) for i, ((label, _), s) in enumerate(zip(sentences, scores)) if label == 0)
    assert sentences[best[1]][1] in report


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
    assert processor["size"] == {"shortest_edge": 36} and processor["crop_size"] == {"height": 32, "width": 32}


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

"""The FC and KNN heads of the paper's ablation from the command line: `run_select_anchors --head_type fc` then
`run_lgr`, and `run_eval --knn K` on a stage-1 checkpoint, checked against naive recomputations from the saved
predictions and from the images."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, pipeline

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel
from training import run_cvlp, run_eval, run_lgr, run_select_anchors
from training.knn import knn_scores

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]


def naive_knn(queries, memory, memory_labels, k):
    """Majority class among the k most similar memory rows (cosine); a tie goes to the class met first."""
    predictions = []
    for q in queries:
        sims = [float(np.dot(q, m) / (np.linalg.norm(q) * np.linalg.norm(m))) for m in memory]
        nearest = sorted(range(len(memory)), key=lambda j: -sims[j])[:k]
        votes = Counter(int(memory_labels[j]) for j in nearest)  # insertion order = nearest first
        best = max(votes.values())
        predictions.append(next(c for c in votes if votes[c] == best))
    return np.array(predictions)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_knn_scores_vote_like_a_naive_loop(k):
    generator = torch.Generator().manual_seed(k)
    memory = torch.randn(40, 6, generator=generator)
    labels = torch.randint(0, 5, (40,), generator=generator)
    labels[:5] = torch.arange(5)
    queries = torch.randn(30, 6, generator=generator)
    scores = knn_scores(queries, memory, labels, num_classes=6, k=k, batch_size=7)  # class 5 has no memory image
    assert scores.shape == (30, 6)
    expected = naive_knn(queries.numpy(), memory.numpy(), labels.numpy(), k)
    np.testing.assert_array_equal(scores.argmax(1).numpy(), expected)
    assert (scores[:, 5] < scores[:, :5].min(1).values).all()  # no memory image: ranked last


def test_knn_tie_goes_to_the_nearer_class():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1])
    query = torch.tensor([[0.2, 1.0]])  # 2 votes each with k=4; class 1's member is nearer
    assert knn_scores(query, memory, labels, 2, k=4).argmax(1).item() == 1
    assert knn_scores(torch.tensor([[1.0, 0.2]]), memory, labels, 2, k=4).argmax(1).item() == 0


@pytest.fixture(scope="module")
def heads_run(tiny_clip_dir, lt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    d = lt_dataset
    common = ["--image_root", d["root"], "--class_names", d["classes"], *FAST]
    evaluate = ["--test_file", d["test"], "--train_file", d["train"], "--many_shot_threshold", "8",
                "--few_shot_threshold", "4", *common]  # fmt: skip
    run_cvlp.main(
        ["--model_name_or_path", tiny_clip_dir, "--train_file", d["train"], "--text_corpus", d["corpus"],
         "--output_dir", str(out / "stage1"), "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
         "--learning_rate", "1e-3", *common]
    )  # fmt: skip
    selected = run_select_anchors.main(
        ["--model_name_or_path", str(out / "stage1"), "--train_file", d["train"], "--head_type", "fc",
         "--output_dir", str(out / "fc_init"), *common]
    )  # fmt: skip
    run_lgr.main(
        ["--model_name_or_path", str(out / "fc_init"), "--train_file", d["train"], "--output_dir", str(out / "fc"),
         "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", *common]
    )  # fmt: skip
    fc = run_eval.main(["--model_name_or_path", str(out / "fc"), "--output_dir", str(out / "eval_fc"), *evaluate])
    knn = run_eval.main(
        ["--model_name_or_path", str(out / "stage1"), "--knn", "3", "--output_dir", str(out / "eval_knn"), *evaluate]
    )
    return out, selected, fc, knn


def _recompute(metrics: dict, predictions: np.ndarray, labels: np.ndarray, train_counts: list[int]):
    assert metrics["top1"] == pytest.approx(np.mean(predictions == labels))
    per_class = [np.mean(predictions[labels == c] == c) for c in range(len(train_counts))]
    groups = ["many" if n > 8 else "few" if n < 4 else "medium" for n in train_counts]
    for group in ("many", "medium", "few"):
        members = [per_class[c] for c in range(len(train_counts)) if groups[c] == group]
        if members:
            assert metrics[f"{group}_top1"] == pytest.approx(np.mean(members))


def test_fc_head_is_trained_and_evaluated_by_the_scripts(heads_run, lt_dataset):
    out, selected, fc, _ = heads_run
    assert selected == {"num_classes": 4}
    assert not (out / "fc_init" / "anchors.json").exists()  # nothing selected for the FC head
    model = VLLTRForImageClassification.from_pretrained(out / "fc")
    assert model.config.head_type == "fc"
    start = VLLTRForImageClassification.from_pretrained(out / "fc_init")
    assert not torch.equal(model.classifier.weight, start.classifier.weight)  # run_lgr trained it
    saved = np.load(out / "eval_fc" / "predictions.npz")
    lines = [line.split() for line in open(lt_dataset["test"]).read().splitlines() if line.strip()]
    classifier = pipeline("image-classification", model=str(out / "fc"), device="cpu")
    predicted = [classifier(f"{lt_dataset['root']}/{path}", top_k=1)[0]["label"] for path, _ in lines]
    label2id = model.config.label2id
    np.testing.assert_array_equal(saved["predictions"], [label2id[p] for p in predicted])
    metrics = json.loads((out / "eval_fc" / "metrics.json").read_text())
    assert metrics["head"] == "fc"
    _recompute(metrics, saved["predictions"], saved["labels"], metrics["per_class"]["train_count"])


def test_knn_head_from_the_training_images(heads_run, lt_dataset):
    out, _, _, knn = heads_run
    stage1 = VLLTRModel.from_pretrained(out / "stage1").eval()
    processor = AutoImageProcessor.from_pretrained(out / "stage1")

    def embed(list_file):
        lines = [line.split() for line in open(list_file).read().splitlines() if line.strip()]
        images = [Image.open(f"{lt_dataset['root']}/{path}").convert("RGB") for path, _ in lines]
        with torch.no_grad():
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            embeds = F.normalize(stage1.get_image_features(pixels).pooler_output.double(), dim=-1)
        return embeds.numpy(), np.array([int(label) for _, label in lines])

    memory, memory_labels = embed(lt_dataset["train"])
    test, test_labels = embed(lt_dataset["test"])
    expected = naive_knn(test, memory, memory_labels, 3)
    saved = np.load(out / "eval_knn" / "predictions.npz")
    np.testing.assert_array_equal(saved["labels"], test_labels)
    np.testing.assert_array_equal(saved["predictions"], expected)
    metrics = json.loads((out / "eval_knn" / "metrics.json").read_text())
    assert metrics["head"].startswith("knn (K=3")
    assert knn["top1"] == metrics["top1"]
    _recompute(metrics, expected, test_labels, metrics["per_class"]["train_count"])

"""The anchor-selection image set: refused without a validation split where the reference uses one, a warning when
scored on training images, and the reference iNaturalist mode (square-root draws through the training augmentation)
recomputed independently."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from modeling_vlltr import VLLTRModel
from training import run_select_anchors
from training.cli import read_history, run_main
from training.corpus import build_class_corpus, tokenize_corpus
from training.data import LongTailSampler, train_transform
from training.selection import SampledSelection
from training.splits import ImageDataset, read_class_names, read_image_list

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0", "--bf16", "False"]


@pytest.mark.parametrize("recipe", ["imagenet_lt_vit_b16_anchors.json", "places_lt_vit_b16_anchors.json"])
def test_lt_recipes_refuse_to_run_without_the_selection_file(recipe, tiny_clip_dir, lt_dataset, tmp_path, capsys):
    d, out = lt_dataset, tmp_path / "anchors"
    argv = [str(CONFIGS / recipe), "--model_name_or_path", tiny_clip_dir, "--train_file", d["train"],
            "--image_root", d["root"], "--class_names", d["classes"], "--text_corpus", d["corpus"],
            "--output_dir", str(out), "--dataloader_num_workers", "0", *FAST]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_select_anchors.main, "run_select_anchors", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_select_anchors: error: This recipe needs --selection_file") and "\n" not in err
    assert not out.exists(), "refused before anything was written"


def test_sampled_selection_is_one_seeded_epoch_of_square_root_draws(lt_dataset):
    samples = read_image_list(lt_dataset["train"], lt_dataset["root"])
    dataset = ImageDataset(samples, train_transform(32))
    selection = SampledSelection(dataset, seed=3)
    indices, seeds = LongTailSampler(dataset.labels, "sqrt", seed=3).draws()
    assert len(selection) == len(dataset)
    assert selection.labels.tolist() == dataset.labels[indices.numpy()].tolist()
    item = selection[5]
    assert torch.equal(item["pixel_values"], dataset[(int(indices[5]), int(seeds[5]))]["pixel_values"])
    assert torch.equal(item["pixel_values"], SampledSelection(dataset, seed=3)[5]["pixel_values"])
    assert SampledSelection(dataset, seed=4).draws != selection.draws


def test_inaturalist_mode_scores_on_augmented_square_root_draws(tiny_clip_dir, lt_dataset, tmp_path, caplog):
    d, out = lt_dataset, tmp_path / "anchors"
    limit = 4
    results = run_select_anchors.main(
        ["--model_name_or_path", tiny_clip_dir, "--train_file", d["train"], "--image_root", d["root"],
         "--class_names", d["classes"], "--text_corpus", d["corpus"], "--max_images_per_class", str(limit),
         "--selection_images", "train", "--num_anchor_sentences", "5", "--output_dir", str(out), *FAST]
    )  # fmt: skip
    assert "Anchors are scored on the first 4 training images of each class, not on a held-out split" in caplog.text
    assert read_history(out)[-1]["settings"]["selection_images"] == "train"

    # independently: the first `limit` training images per class, one epoch of square-root draws (seed 0) through the
    # default training augmentation, and every sentence's L_lin against them
    samples = read_image_list(d["train"], d["root"])
    capped = [s for c in range(4) for s in [x for x in samples if x.label == c][:limit]]
    capped.sort(key=lambda s: samples.index(s))
    dataset = ImageDataset(capped, train_transform(32))
    indices, seeds = LongTailSampler(dataset.labels, "sqrt", seed=0).draws()
    assert results["num_selection_images"] == len(capped) == 4 + 4 + 3 + 2
    model = VLLTRModel.from_pretrained(tiny_clip_dir).eval()
    pixels = torch.stack([dataset[(int(i), int(s))]["pixel_values"] for i, s in zip(indices, seeds)])
    image_labels = torch.as_tensor(dataset.labels[indices.numpy()])
    corpus = build_class_corpus(read_class_names(d["classes"]), d["corpus"])
    tokens = tokenize_corpus(corpus, AutoTokenizer.from_pretrained(tiny_clip_dir), cache_dir=tmp_path)
    with torch.no_grad():
        images = F.normalize(model.get_image_features(pixels).pooler_output, dim=-1)  # (K, D)
        texts = F.normalize(
            model.get_text_features(tokens.input_ids, tokens.attention_mask).pooler_output, dim=-1
        )  # (S, D)
        scale = model.clip.logit_scale.exp()
    expected = []
    for t, label in zip(texts, corpus.labels.tolist()):
        target = (image_labels == label).double()
        target /= target.sum()
        expected.append(float(-(target * F.log_softmax((scale * images @ t).double(), dim=0)).sum()))
    stored = json.loads((out / "anchors.json").read_text())
    checked = 0
    for entry in stored["classes"]:
        for anchor in entry["anchors"]:
            assert anchor["score"] == pytest.approx(expected[anchor["index"]], rel=1e-4, abs=1e-5)
            checked += 1
    assert checked == 4 * 5
    # the eval-transform mode scores something else: the augmentation matters
    other = run_select_anchors.main(
        ["--model_name_or_path", tiny_clip_dir, "--train_file", d["train"], "--image_root", d["root"],
         "--class_names", d["classes"], "--text_corpus", d["corpus"], "--max_images_per_class", str(limit),
         "--num_anchor_sentences", "5", "--output_dir", str(tmp_path / "eval_mode"), *FAST]
    )  # fmt: skip
    assert not np.isclose(other["mean_sentence_score"], results["mean_sentence_score"], rtol=1e-6)

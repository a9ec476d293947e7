"""The LIFT-style peer: the cosine head against its formula, its prompt initialisation against a per-prompt loop,
and `run_lift` -> `run_eval` on the tiny long-tailed set (a standard AutoModelForImageClassification checkpoint,
adapters merged, evaluated with the same shot groups)."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_classifier, random_pixels
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, AutoTokenizer

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification
from training import run_eval, run_lift
from training.embedding import prompt_embeddings

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]


def test_cosine_head_matches_its_formula_and_round_trips(tmp_path):
    model = make_classifier(num_labels=5, head_type="cosine", cosine_scale=12.0).eval()
    x = random_pixels(3)
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        out = model(pixel_values=x, labels=labels)
        e = model.get_image_features(x).pooler_output  # E_I (B, D)
    w = model.classifier.weight.detach()
    expected = torch.empty(3, 5)
    for b in range(3):  # s·cos(E_I, w_c), one entry at a time
        for c in range(5):
            dot = sum(e[b, d] * w[c, d] for d in range(e.shape[1]))
            expected[b, c] = 12.0 * dot / (e[b].norm() * w[c].norm())
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.image_logits, out.logits) and out.text_logits is None
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, labels), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.head_type == "cosine" and loaded.config.cosine_scale == 12.0
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out.logits)
    with pytest.raises(ValueError, match="cosine_scale"):
        VLLTRConfig(clip_config=model.config.clip_config, cosine_scale=0)


def test_prompt_embeddings_average_normalised_prompts(tiny_clip_dir):
    model = VLLTRForImageClassification.from_pretrained(tiny_clip_dir, head_type="cosine", id2label={0: "a", 1: "b"})
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    names, templates = ["red square", "blue ring", "dot"], ["a photo of a {}.", "a {} again", "{}"]
    got = prompt_embeddings(model, tokenizer, names, templates, batch_size=4)
    for c, name in enumerate(names):
        per_prompt = []
        for template in templates:  # one prompt at a time, no padding
            enc = tokenizer([template.format(name)], return_tensors="pt")
            with torch.no_grad():
                e = model.clip.get_text_features(**enc).pooler_output[0]
            per_prompt.append(e / e.norm())
        mean = sum(per_prompt) / len(per_prompt)
        torch.testing.assert_close(got[c], mean / mean.norm(), rtol=1e-4, atol=1e-5)


def test_run_lift_then_run_eval(tiny_clip_dir, lt_dataset, tmp_path):
    out = tmp_path / "lift"
    common = ["--image_root", lt_dataset["root"], *FAST]
    results = run_lift.main(
        [
            "--model_name_or_path",
            tiny_clip_dir,
            "--train_file",
            lt_dataset["train"],
            "--class_names",
            lt_dataset["classes"],
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--peft",
            "lora",
            "--classifier_feature",
            "projected",
            "--lora_r",
            "4",
            "--save_adapter",
            "True",
            "--learning_rate",
            "0",
            *common,
        ]
    )  # fmt: skip  (learning rate 0: the saved head is its initialisation, checked below)
    assert results["train_loss"] > 0
    weights = load_file(out / "model.safetensors")
    assert "classifier.weight" in weights and not any("lora_" in k for k in weights)
    clip = VLLTRForImageClassification.from_pretrained(tiny_clip_dir, head_type="cosine", id2label={0: "a", 1: "b"})
    names = open(lt_dataset["classes"]).read().split("\n")[:4]
    expected = prompt_embeddings(clip, AutoTokenizer.from_pretrained(tiny_clip_dir), names, ["a photo of a {}."])
    torch.testing.assert_close(weights["classifier.weight"], expected)  # w_c = the normalised prompt embedding
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model) is VLLTRForImageClassification and model.config.head_type == "cosine"
    assert model.config.id2label[0] == "red square"
    history = json.load(open(out / "training_history.json"))
    settings = history[-1]["settings"]
    assert history[-1]["stage"] == "lift" and settings["peft"] == "lora" and settings["logit_adjustment"] == 1.0
    assert settings["num_train_epochs"] == 10 and settings["sampling"] == "instance"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "LIFT fine-tuning" in (out / "README.md").read_text()
    report = run_eval.main(
        ["--model_name_or_path", str(out), "--test_file", lt_dataset["test"], "--train_file", lt_dataset["train"],
         "--output_dir", str(tmp_path / "eval"), "--many_shot_threshold", "8", "--few_shot_threshold", "4", *common]
    )  # fmt: skip
    assert {"top1", "many_top1", "medium_top1", "few_top1"} <= set(report)
    assert report.get("text_top1") is None  # one branch: the cosine head is the prediction

"""LIFT as its authors run it (shijxcs/LIFT), held to its equations written out here independently: the AdaptFormer
adapter and its place in each vision layer, its initialisation, the bottleneck rule, the trainable parameters, the
head's initialisation from text for each prompt mode, the logit-adjusted loss, the per-epoch cosine schedule, the
CIFAR-LT profile, the five-crop test-time ensemble; and the checkpoint through `from_pretrained`, the pipeline and a
process without the package."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, TRAIN_COUNTS, make_classifier, random_pixels, run_without_the_package
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, AutoTokenizer, pipeline

from modeling_vlltr import VLLTRForImageClassification
from training import run_eval, run_lift
from training.adapters import adaptformer_bottleneck
from training.corpus import IMAGENET_TEMPLATES
from training.data import eval_image_processor
from training.lift_config import LIFTConfig
from training.lift_trainer import LIFTTrainer
from training.splits import ImageDataset, long_tail_indices, read_image_list
from training.tta import MultiViewTransform, predict_logits_tta

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]
R = 4  # AdaptFormer bottleneck of the tiny models


def lift_model(seed: int = 0, **kwargs):
    """A tiny LIFT classifier whose adapters are moved away from their zero initialisation."""
    model = make_classifier(
        num_labels=5, head_type="cosine", classifier_feature="pooled", adaptformer_dim=R, seed=seed, **kwargs
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("adaptformer.") or name.startswith("classifier."):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def naive_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def naive_adaptformer(adapter, h):
    """LIFT `AdaptFormer.forward`: x = ln(h); x = down(x); relu; up; × scale, with every product written out."""
    x = naive_layer_norm(h, adapter.ln.weight, adapter.ln.bias, adapter.ln.eps)
    down = torch.einsum("bnh,rh->bnr", x, adapter.down_proj.weight) + adapter.down_proj.bias
    up = torch.einsum("bnr,hr->bnh", torch.clamp(down, min=0), adapter.up_proj.weight) + adapter.up_proj.bias
    return up * adapter.scale


def naive_lift_logits(model, pixels):
    """LIFT `Peft_ViT.forward` on the CLIP tower, block by block: h = x + attn(ln_1(x)); x = h + mlp(ln_2(h)) +
    adaptformer(h); the feature ln_post(x[:, 0]) (no projection); logits = s·cos(feature, w_c)."""
    vision = model.clip.vision_model
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    for layer, adapter in zip(vision.encoder.layers, model.adaptformer):
        h = x + layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=None)[0]
        ln2 = naive_layer_norm(h, layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps)
        mlp = layer.mlp.fc2(layer.mlp.activation_fn(layer.mlp.fc1(ln2)))  # the MLP's own layers, not its hooks
        x = h + mlp + naive_adaptformer(adapter, h)
    feature = vision.post_layernorm(x[:, 0])  # (B, H)
    w = model.classifier.weight
    logits = torch.empty(feature.shape[0], w.shape[0])
    for b in range(feature.shape[0]):
        for c in range(w.shape[0]):
            logits[b, c] = 25.0 * (feature[b] @ w[c]) / (feature[b].norm() * w[c].norm())
    return logits


def test_adaptformer_in_each_layer_is_lifts_formula():
    model = lift_model()
    pixels = random_pixels(3)
    with torch.no_grad():
        out = model(pixel_values=pixels)
        expected = naive_lift_logits(model, pixels)
        h = torch.randn(2, 5, model.adaptformer[0].ln.normalized_shape[0])
        torch.testing.assert_close(model.adaptformer[0](h), naive_adaptformer(model.adaptformer[0], h))
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    # the adapters matter: with them removed from the sum the logits change
    with torch.no_grad():
        for adapter in model.adaptformer:
            adapter.scale.zero_()
        assert not torch.allclose(model(pixel_values=pixels).logits, out.logits, atol=1e-3)
    # and the pooled head differs from one on the projected embedding E_I
    assert out.image_embeds.shape[-1] == model.config.projection_dim != model.classifier.weight.shape[-1]


def test_adaptformer_initialisation_is_lifts():
    model = make_classifier(num_labels=3, head_type="cosine", adaptformer_dim=64, seed=4)
    pixels = random_pixels(2)
    plain = make_classifier(num_labels=3, head_type="cosine", seed=4)  # same tower and head, no adapters
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("adaptformer.")})
    for adapter in model.adaptformer:
        assert torch.equal(adapter.up_proj.weight, torch.zeros_like(adapter.up_proj.weight))
        assert not adapter.up_proj.bias.any() and not adapter.down_proj.bias.any()
        assert adapter.scale.tolist() == [1.0]
        assert torch.equal(adapter.ln.weight, torch.ones_like(adapter.ln.weight)) and not adapter.ln.bias.any()
        # kaiming_normal_(a=√5), fan_in = H: std = √(2 / (1 + 5)) / √H
        weight = adapter.down_proj.weight
        expected_std = math.sqrt(2.0 / 6.0) / math.sqrt(weight.shape[1])
        assert abs(weight.std().item() / expected_std - 1) < 0.1 and abs(weight.mean().item()) < 0.1 * expected_std
    with torch.no_grad():  # a zero up-projection: the adapted tower starts as the pre-trained one
        torch.testing.assert_close(model.eval()(pixels).logits, plain.eval()(pixels).logits)


def test_bottleneck_rule():
    def naive(num_classes, layers):  # the largest power of two <= C / (2L), at least 1
        width = 1
        while width * 2 <= num_classes / (2 * layers):
            width *= 2
        return width

    for num_classes in (2, 5, 23, 24, 47, 48, 100, 365, 1000, 8142):
        for layers in (2, 12, 24):
            assert adaptformer_bottleneck(num_classes, layers) == naive(num_classes, layers), (num_classes, layers)
    assert [adaptformer_bottleneck(c, 12) for c in (1000, 365, 8142, 100)] == [32, 8, 256, 4]


def test_logit_adjusted_loss_and_per_epoch_cosine(tmp_path):
    model = lift_model().train()
    labels = [0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 4]  # 11 images, class counts 5, 2, 1, 1, 2
    pixels = random_pixels(len(labels), seed=5)

    class Tiny(torch.utils.data.Dataset):
        def __init__(self):
            self.labels = labels

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {"pixel_values": pixels[i], "labels": labels[i]}

    args = LIFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4)
    args.num_train_epochs = 3
    trainer = LIFTTrainer(model=model, args=args, train_dataset=Tiny())
    batch = {"pixel_values": pixels[:6], "labels": torch.tensor(labels[:6])}
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        z = model(pixel_values=pixels[:6]).logits
    counts = [labels.count(c) for c in range(5)]
    naive = 0.0
    for b, y in enumerate(labels[:6]):  # CE(z + log(n_c / N), y), LIFT `LogitAdjustedLoss` with τ = 1
        adjusted = [z[b, c].item() + math.log(counts[c] / len(labels)) for c in range(5)]
        naive += -(adjusted[y] - math.log(sum(math.exp(a) for a in adjusted)))
    assert loss.item() == pytest.approx(naive / 6, rel=1e-5)
    # only the adapters and the head train (LIFT's tuner and head), and every one of them is decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("adaptformer.", "classifier.")) for n in trainable)
    assert trainable <= set(trainer.get_decay_parameter_names(model))
    # lr of step s in epoch e = ⌊s / 3⌋ (3 batches of 4, 4, 3): 0.01·(1 + cos(π·e / 3)) / 2, LIFT's CosineAnnealingLR
    trainer.create_optimizer_and_scheduler(num_training_steps=9)
    assert trainer.optimizer.defaults["momentum"] == 0.9
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {5e-4}
    for step in range(9):
        expected = 0.01 * (1 + math.cos(math.pi * (step // 3) / 3)) / 2
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected), step
        trainer.optimizer.step()
        trainer.lr_scheduler.step()


def test_long_tail_profile_is_cao_et_al():
    labels = np.repeat(np.arange(10), 50)  # a balanced split of 10 classes × 50
    np.random.default_rng(0).shuffle(labels)
    rows = long_tail_indices(labels, 10, imbalance=10.0, seed=3)
    counts = np.bincount(labels[rows], minlength=10)
    assert counts.tolist() == [int(50 * 0.1 ** (c / 9)) for c in range(10)]  # n_max = 50, n_min = 5
    assert len(set(rows.tolist())) == len(rows)
    # LIFT's draws: np.random.seed(seed), then one shuffle of each class's rows in label order
    np.random.seed(3)
    naive = []
    for c in range(10):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        naive.extend(idx[: counts[c]].tolist())
    assert rows.tolist() == naive


def test_lift_five_crop_averages_logits_of_lifts_crops(lt_dataset):
    model = lift_model()
    processor = eval_image_processor(32)
    samples = read_image_list(lt_dataset["test"], lt_dataset["root"])[:5]
    dataset = ImageDataset(samples, MultiViewTransform(processor, "lift_five_crop"))
    out = predict_logits_tta(model, dataset, batch_size=2, average="logits")
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    for i, sample in enumerate(samples):
        image = Image.open(sample.path).convert("RGB")
        w, h = image.size  # LIFT: Resize(32 + 24) on the short side, then FiveCrop(32), ToTensor, Normalize
        short = 32 + 24
        size = (short, round(short * w / h)) if h <= w else (round(short * h / w), short)
        resized = image.resize((size[1], size[0]), Image.BILINEAR)
        H, W = size
        boxes = [
            (0, 0),
            (0, W - 32),
            (H - 32, 0),
            (H - 32, W - 32),
            (int(round((H - 32) / 2)), int(round((W - 32) / 2))),
        ]
        logits = []
        for top, left in boxes:
            crop = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
            view = (torch.from_numpy(crop).permute(2, 0, 1) - mean) / std
            with torch.no_grad():
                logits.append(model(pixel_values=view[None]).logits[0])
        torch.testing.assert_close(out["logits"][i], sum(logits) / 5, rtol=1e-3, atol=1e-3)


def test_checkpoint_round_trip_pipeline_and_remote_code(tmp_path):
    model = lift_model(seed=2)
    pixels = random_pixels(2)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    eval_image_processor(32).save_pretrained(tmp_path)
    assert any(k.startswith("adaptformer.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.adaptformer_dim == R and loaded.config.classifier_feature == "pooled"
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, expected)
    results = pipeline("image-classification", model=str(tmp_path), device="cpu")(
        Image.new("RGB", (40, 40), (20, 200, 30)), top_k=5
    )
    assert len(results) == 5 and abs(sum(r["score"] for r in results) - 1) < 1e-5
    torch.save({"pixels": pixels, "logits": expected}, tmp_path / "expected.pt")
    result = run_without_the_package(
        f"""
        from transformers import AutoModelForImageClassification
        saved = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(saved["pixels"]).logits, saved["logits"], rtol=1e-6, atol=1e-6)
        print("REMOTE-OK")
        """,
        cwd=tmp_path,
    )
    assert "REMOTE-OK" in result.stdout, result.stdout + result.stderr


def naive_head(clip_dir, prompts):
    """LIFT `init_head_text_feat`: each prompt embedded alone, normalised, averaged per class, mapped through the
    image projection's transpose (text @ proj.t()), normalised."""
    model = VLLTRForImageClassification.from_pretrained(clip_dir, head_type="cosine", id2label={0: "a", 1: "b"})
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    rows = []
    for class_prompts in prompts:
        units = []
        for prompt in class_prompts:
            with torch.no_grad():
                e = model.clip.get_text_features(**tokenizer([prompt], return_tensors="pt")).pooler_output[0]
            units.append(e / e.norm())
        t = sum(units) / len(units)  # (D,)
        w = torch.stack(
            [
                sum(t[d] * model.clip.visual_projection.weight[d, k] for d in range(t.shape[0]))
                for k in range(model.clip.visual_projection.weight.shape[1])
            ]
        )  # fmt: skip  (H,)
        rows.append(w / w.norm())
    return torch.stack(rows).detach()


@pytest.mark.parametrize("mode", ["default", "classname", "ensemble", "descriptor"])
def test_run_lift_each_prompt_mode_then_lift_five_crop(mode, tiny_clip_dir, lt_dataset, tmp_path):
    out = tmp_path / "lift"
    descriptors = {name: [f"a {name} drawn in paint", f"one {name} on noise"] for name in CLASS_NAMES}
    (tmp_path / "descriptors.json").write_text(json.dumps(descriptors))
    extra = ["--descriptors", str(tmp_path / "descriptors.json")] if mode == "descriptor" else []
    argv = ["--model_name_or_path", tiny_clip_dir, "--train_file", lt_dataset["train"], "--class_names",
            lt_dataset["classes"], "--image_root", lt_dataset["root"], "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--learning_rate", "0", "--prompt_mode", mode, *extra, *FAST]  # fmt: skip
    results = run_lift.main(argv)  # learning rate 0: the saved head and adapters are their initialisation
    assert results["train_loss"] > 0
    prompts = {
        "default": [[f"a photo of a {n}."] for n in CLASS_NAMES],
        "classname": [[n] for n in CLASS_NAMES],
        "ensemble": [[t.format(n) for t in IMAGENET_TEMPLATES] for n in CLASS_NAMES],
        "descriptor": [descriptors[n] for n in CLASS_NAMES],
    }[mode]
    weights = load_file(out / "model.safetensors")
    torch.testing.assert_close(weights["classifier.weight"], naive_head(tiny_clip_dir, prompts), rtol=1e-4, atol=1e-5)
    settings = json.loads((out / "training_history.json").read_text())[-1]["settings"]
    hidden, layers, classes = 32, 2, len(CLASS_NAMES)
    r = adaptformer_bottleneck(classes, layers)
    per_layer = 2 * hidden + hidden * r + r + r * hidden + hidden + 1  # LN, down, up, scale
    assert settings["adapter"] == "adaptformer" and settings["adaptformer_dim"] == r == 1
    assert settings["trainable_parameters"] == layers * per_layer + classes * hidden
    assert settings["prompt_mode"] == mode and settings["classifier_feature"] == "pooled"
    report = run_eval.main(
        ["--model_name_or_path", str(out), "--test_file", lt_dataset["test"], "--train_file", lt_dataset["train"],
         "--image_root", lt_dataset["root"], "--output_dir", str(tmp_path / "eval"), "--tta", "lift_five_crop",
         "--many_shot_threshold", "8", "--few_shot_threshold", "4", "--update_model_card", "False", *FAST]
    )  # fmt: skip
    assert report["tta"] == "lift_five_crop" and 0.0 <= report["top1"] <= 1.0
    assert sum(report["per_class"]["train_count"]) == sum(TRAIN_COUNTS)

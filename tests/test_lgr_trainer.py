"""Stage 2 (LGR) trainer: frozen and trained parts, the two learning rates and the decay rule, gradient
accumulation, evaluation with unmixed batches."""

import copy

import pytest
import torch

from modeling_vlltr import VLLTRForImageClassification
from training.data import MixupCutmixCollator, ProcessorTransform, eval_image_processor, train_transform
from training.lgr_config import LGRConfig
from training.lgr_trainer import LGRTrainer
from training.metrics import LongTailMetrics
from training.splits import ImageDataset, class_counts, read_image_list


@pytest.fixture(scope="module")
def classifier(tiny_clip_dir):
    model = VLLTRForImageClassification.from_pretrained(
        tiny_clip_dir, id2label={i: f"c{i}" for i in range(4)}, num_anchor_sentences=3
    )
    model.set_anchor_embeddings(torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module")
def datasets(lt_dataset):
    train = ImageDataset(read_image_list(lt_dataset["train"], lt_dataset["root"]), train_transform(32))
    val = ImageDataset(
        read_image_list(lt_dataset["val"], lt_dataset["root"]), ProcessorTransform(eval_image_processor(32))
    )
    return train, val


def make_trainer(classifier, datasets, tmp_path, mixing=True, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        attention_learning_rate=1e-6,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    args = LGRConfig(**kwargs)
    train, val = datasets
    collator = (
        MixupCutmixCollator(4, args.mixup_alpha, args.cutmix_alpha, args.mixup_prob, args.mixup_switch_prob, 0.1)
        if mixing
        else MixupCutmixCollator(4, 0.0, 0.0, label_smoothing=0.0)
    )
    return LGRTrainer(
        model=copy.deepcopy(classifier),
        args=args,
        train_dataset=train,
        eval_dataset=val,
        data_collator=collator,
        compute_metrics=LongTailMetrics(class_counts(train.labels, 4)),
    )


def test_frozen_and_trained_parts(classifier, datasets, tmp_path):
    trainer = make_trainer(classifier, datasets, tmp_path)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    after = trainer.model.state_dict()
    for name, value in before.items():
        unchanged = torch.equal(value, after[name])
        if name.startswith("clip.") or name.startswith("anchor_"):
            assert unchanged, f"{name} must stay frozen in stage 2"
        elif name.startswith("image_branch."):
            assert not unchanged, f"{name} must be trained"
    # the attention moves, but only at its tiny learning rate
    delta = (after["text_branch.query_proj.weight"] - before["text_branch.query_proj.weight"]).abs().max()
    assert 0 < delta < 1e-5
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and {"loss_image", "loss_text"} <= set(logs[0])


def test_learning_rate_groups_and_weight_decay(classifier, datasets, tmp_path):
    trainer = make_trainer(classifier, datasets, tmp_path)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            expected_lr = 1e-6 if name.startswith("text_branch.") else 1e-2
            assert group["lr"] == pytest.approx(expected_lr), name
            expected_decay = 0.0 if (param.ndim == 1 or name.endswith(".bias")) else 0.05
            assert group["weight_decay"] == expected_decay, name
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert seen == trainable and all(n.startswith(("image_branch.", "text_branch.")) for n in trainable)


def test_training_the_vision_tower(classifier, datasets, tmp_path):
    trainer = make_trainer(classifier, datasets, tmp_path, train_vision_tower=True, max_steps=1)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    after = trainer.model.state_dict()
    assert not torch.equal(before["clip.visual_projection.weight"], after["clip.visual_projection.weight"])
    assert torch.equal(before["clip.text_projection.weight"], after["clip.text_projection.weight"])
    assert torch.equal(before["clip.logit_scale"], after["clip.logit_scale"])


def test_accumulation_equals_the_larger_batch(classifier, datasets, tmp_path):
    runs = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2)):
        trainer = make_trainer(
            classifier, datasets, tmp_path / name, mixing=False, max_steps=1, optim="sgd",
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        )  # fmt: skip
        trainer.train()
        runs[name] = (trainer.state.log_history[0]["loss"], trainer.model.state_dict())
    assert runs["accumulated"][0] == pytest.approx(runs["big"][0], rel=1e-5)
    for key, value in runs["big"][1].items():
        torch.testing.assert_close(runs["accumulated"][1][key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_evaluation_batches_are_never_mixed(classifier, datasets, tmp_path):
    trainer = make_trainer(classifier, datasets, tmp_path)
    batch = next(iter(trainer.get_eval_dataloader()))
    assert batch["labels"].dtype == torch.int64 and batch["labels"].dim() == 1
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    _, val = datasets
    with torch.no_grad():
        pixels = torch.stack([val[i]["pixel_values"] for i in range(len(val))])
        predictions = model(pixels).logits.argmax(-1)
    expected = (predictions == torch.as_tensor(val.labels)).float().mean().item()
    assert metrics["eval_top1"] == pytest.approx(expected)
    assert {"eval_many_top1", "eval_medium_top1", "eval_few_top1", "eval_image_top1", "eval_text_top1"} <= set(metrics)
    train_batch = next(iter(trainer.get_train_dataloader()))
    assert train_batch["labels"].dtype.is_floating_point, "training batches are mixed and smoothed"


def test_default_collator_is_built_from_the_stage_config(classifier, datasets, tmp_path):
    """Without a data_collator, LGRTrainer mixes batches with its own LGRConfig settings (issue: stage settings are
    read by their stage's trainer, not passed by the script)."""
    args = LGRConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", mixup_alpha=0.3, cutmix_alpha=0.0,
        mixup_prob=0.7, mixup_switch_prob=0.2, label_smoothing=0.05,
    )  # fmt: skip
    trainer = LGRTrainer(model=copy.deepcopy(classifier), args=args, train_dataset=datasets[0])
    collator = trainer.data_collator
    assert isinstance(collator, MixupCutmixCollator)
    assert (collator.num_classes, collator.mixup_alpha, collator.cutmix_alpha) == (4, 0.3, 0.0)
    assert (collator.prob, collator.switch_prob, collator.label_smoothing) == (0.7, 0.2, 0.05)
    features = [datasets[0][(i, 100 + i)] for i in range(4)]
    labels = collator(features)["labels"]
    assert labels.shape == (4, 4) and torch.allclose(labels.sum(-1), torch.ones(4))  # soft targets


def test_logit_adjustment_uses_the_training_prior(classifier, datasets, tmp_path):
    trainer = make_trainer(classifier, datasets, tmp_path, logit_adjustment=1.5)
    train, _ = datasets
    counts = class_counts(train.labels, 4).astype(float)  # the long tail 12 / 6 / 3 / 2
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        out = model(pixel_values=batch["pixel_values"])
    # the formula written out: CE(P_I + τ·log(n_c / Σn), y) + CE(P_T, y) on the (soft) targets of the batch
    adjusted = out.image_logits.double() + 1.5 * torch.log(torch.tensor(counts / counts.sum()))
    targets = batch["labels"].double()
    expected = -(targets * adjusted.log_softmax(-1)).sum(-1).mean()
    expected = expected - (targets * out.text_logits.double().log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # τ = 0 is the paper's L_rec, which differs
        assert not torch.isclose(loss, model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss)
    model.eval()  # evaluation loss and predictions are not adjusted
    with torch.no_grad():
        plain = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        torch.testing.assert_close(trainer.compute_loss(model, batch), plain.loss)
    trainer.train()  # and it trains
    assert all("loss" in e for e in trainer.state.log_history[:1])

"""Stage 1 (CVLP) trainer: what it trains and what it leaves alone, the loss it optimises, gradient accumulation over
the whole contrastive window, the teacher's sentence cache, and the stop on a non-finite loss."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from modeling_vlltr import VLLTRModel
from training.corpus import build_class_corpus, tokenize_corpus
from training.cvlp_config import CVLPConfig
from training.cvlp_trainer import CVLPTrainer
from training.data import CVLPCollator, train_transform
from training.losses import class_wise_contrastive_loss, diagonal_distillation_loss, distillation_loss
from training.splits import ImageDataset, read_class_names, read_image_list
from training.stage_trainer import NonFiniteLossError


@pytest.fixture(scope="module")
def stage1_data(tiny_clip_dir, lt_dataset):
    class_names = read_class_names(lt_dataset["classes"])
    corpus = build_class_corpus(class_names, lt_dataset["corpus"])
    tokens = tokenize_corpus(corpus, AutoTokenizer.from_pretrained(tiny_clip_dir))
    samples = read_image_list(lt_dataset["train"], lt_dataset["root"])
    dataset = ImageDataset(samples, train_transform(32, crop_scale=(0.5, 1.0)))
    return corpus, tokens, dataset


def make_trainer(tiny_clip_dir, stage1_data, tmp_path, model=None, **overrides):
    corpus, tokens, dataset = stage1_data
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        warmup_steps=0,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    args = CVLPConfig(**kwargs)
    return CVLPTrainer(
        model=model if model is not None else VLLTRModel.from_pretrained(tiny_clip_dir),
        args=args,
        train_dataset=dataset,  # the default collator: a CVLPCollator over corpus_tokens / sentence_labels
        teacher_model=VLLTRModel.from_pretrained(tiny_clip_dir),
        corpus_tokens=tokens,
        sentence_labels=torch.as_tensor(corpus.labels),
    )


def first_batch(trainer, size: int) -> dict:
    sampler = trainer._get_train_sampler()
    items = [trainer.train_dataset[key] for key, _ in zip(sampler, range(size))]
    return trainer.data_collator(items)


def test_trains_the_student_not_the_teacher(tiny_clip_dir, stage1_data, tmp_path):
    trainer = make_trainer(tiny_clip_dir, stage1_data, tmp_path)
    before = copy.deepcopy(trainer.model.state_dict())
    teacher_before = copy.deepcopy(trainer.teacher.state_dict())
    trainer.train()
    after = trainer.model.state_dict()
    assert not torch.equal(before["clip.logit_scale"], after["clip.logit_scale"]), "logit_scale is learnable"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("clip.vision_model.") for k in changed) and any(
        k.startswith("clip.text_model.") for k in changed
    )
    for name, tensor in trainer.teacher.state_dict().items():
        assert torch.equal(tensor, teacher_before[name]), f"teacher changed: {name}"
    assert all(not k.startswith("teacher") for k in after), "the teacher must not be a submodule of the student"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all({"loss_ccl", "loss_dis", "logit_scale"} <= set(entry) for entry in logs)


def test_loss_is_the_reference_combination(tiny_clip_dir, stage1_data, tmp_path):
    trainer = make_trainer(tiny_clip_dir, stage1_data, tmp_path, distillation_beta=0.3, label_smoothing=0.1)
    batch = first_batch(trainer, 8)
    model, teacher = trainer.model, trainer.teacher
    loss = trainer.compute_loss(model, batch)
    # independently: student and teacher logits from the raw CLIP forward, then the two public losses
    with torch.no_grad():
        keys = ("pixel_values", "input_ids", "attention_mask")
        student = model.clip(**{k: batch[k] for k in keys})
        teach = teacher.clip(**{k: batch[k] for k in keys})
    expected = 0.7 * class_wise_contrastive_loss(student.logits_per_image, batch["labels"], 0.1) + 0.3 * (
        distillation_loss(student.logits_per_image, teach.logits_per_image)
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_paper_distillation_form_shares_the_students_scale(tiny_clip_dir, stage1_data, tmp_path):
    trainer = make_trainer(tiny_clip_dir, stage1_data, tmp_path, distillation_beta=0.5, distillation_form="paper")
    batch = first_batch(trainer, 8)
    model, teacher = trainer.model, trainer.teacher
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        keys = ("pixel_values", "input_ids", "attention_mask")
        student = model.clip(**{k: batch[k] for k in keys})
        teach = teacher.clip(**{k: batch[k] for k in keys})
    scale = model.clip.logit_scale.exp()
    cosines = student.logits_per_image / scale
    teacher_cosines = teach.logits_per_image / teacher.clip.logit_scale.exp()
    expected = 0.5 * class_wise_contrastive_loss(student.logits_per_image, batch["labels"], 0.1) + 0.5 * (
        diagonal_distillation_loss(cosines, teacher_cosines, scale)
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="distillation_form"):
        CVLPConfig(output_dir=str(tmp_path), distillation_form="slides")


def test_without_distillation_no_teacher_is_needed(tiny_clip_dir, stage1_data, tmp_path):
    trainer = make_trainer(tiny_clip_dir, stage1_data, tmp_path, distillation_beta=0.0)
    assert trainer.teacher is None
    batch = first_batch(trainer, 8)
    with torch.no_grad():
        out = trainer.model.clip(**{k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")})
    torch.testing.assert_close(
        trainer.compute_loss(trainer.model, batch).detach(),
        class_wise_contrastive_loss(out.logits_per_image, batch["labels"], 0.1),
    )


def test_teacher_sentence_cache_matches_per_batch_teacher(tiny_clip_dir, stage1_data, tmp_path):
    cached = make_trainer(tiny_clip_dir, stage1_data, tmp_path, teacher_text_cache=True)
    fresh = make_trainer(tiny_clip_dir, stage1_data, tmp_path, teacher_text_cache=False)
    batch = first_batch(cached, 8)
    image_a, text_a = cached._teacher_embeddings(batch)
    image_b, text_b = fresh._teacher_embeddings(batch)
    torch.testing.assert_close(image_a, image_b)
    torch.testing.assert_close(text_a, text_b, rtol=1e-5, atol=1e-5)
    assert cached._teacher_text.shape == (len(stage1_data[0].sentences), 16)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_window_equals_the_larger_batch(tiny_clip_dir, stage1_data, tmp_path):
    """GradCache: two micro-batches of 4 give the loss and gradients of one batch of 8."""
    base = VLLTRModel.from_pretrained(tiny_clip_dir)
    big = make_trainer(tiny_clip_dir, stage1_data, tmp_path, model=copy.deepcopy(base))
    small = make_trainer(
        tiny_clip_dir,
        stage1_data,
        tmp_path,
        model=copy.deepcopy(base),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    batch = first_batch(big, 8)
    halves = [first_batch(small, 8)]  # same draws: split the same 8 items into two collated micro-batches
    items = [small.train_dataset[key] for key, _ in zip(small._get_train_sampler(), range(8))]
    halves = [small.data_collator(items[:4]), small.data_collator(items[4:])]

    big.model.train()
    loss_big = big.compute_loss(big.model, batch)
    loss_big.backward()
    loss_small = small._window_step(small.model, halves)
    torch.testing.assert_close(loss_small, loss_big.detach(), rtol=1e-5, atol=1e-6)
    grads_big, grads_small = _grads(big.model), _grads(small.model)
    assert grads_big.keys() == grads_small.keys() and "clip.logit_scale" in grads_big
    for name in grads_big:
        torch.testing.assert_close(grads_small[name], grads_big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_with_accumulation_logs_the_larger_batch_loss(tiny_clip_dir, stage1_data, tmp_path):
    """Through the whole Trainer: the same first-step loss, and the same weights after the step. SGD, because Adam
    turns the rounding noise of zero gradients (CLIP's key biases cancel in the softmax) into full-size steps."""
    base = VLLTRModel.from_pretrained(tiny_clip_dir)
    runs = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2)):
        trainer = make_trainer(
            tiny_clip_dir,
            stage1_data,
            tmp_path / name,
            model=copy.deepcopy(base),
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.1,
        )
        trainer.train()
        runs[name] = (trainer.state.log_history[0]["loss"], trainer.model.state_dict())
    assert runs["accumulated"][0] == pytest.approx(runs["big"][0], rel=1e-5)
    for key, value in runs["big"][1].items():
        torch.testing.assert_close(runs["accumulated"][1][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_non_finite_loss_stops_with_the_step(tiny_clip_dir, stage1_data, tmp_path):
    trainer = make_trainer(tiny_clip_dir, stage1_data, tmp_path, max_steps=3, save_strategy="steps", save_steps=1)

    from transformers import TrainerCallback

    class PoisonAfterFirstSave(TrainerCallback):  # a diverged parameter, once checkpoint-1 is safely written
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    trainer.model.clip.logit_scale.fill_(float("nan"))

    trainer.add_callback(PoisonAfterFirstSave())
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.train()
    saved = VLLTRModel.from_pretrained(tmp_path / "checkpoint-1")
    assert torch.isfinite(saved.clip.logit_scale), "the last good checkpoint is kept"
    assert not (tmp_path / "checkpoint-2").exists()


def test_evaluate_reports_sentence_retrieval(tiny_clip_dir, stage1_data, tmp_path, lt_dataset):
    from training.data import ProcessorTransform, eval_image_processor

    samples = read_image_list(lt_dataset["val"], lt_dataset["root"])
    eval_dataset = ImageDataset(samples, ProcessorTransform(eval_image_processor(32)))
    trainer = make_trainer(tiny_clip_dir, stage1_data, tmp_path)
    metrics = trainer.evaluate(eval_dataset)
    # recompute: nearest sentence of every evaluation image
    corpus, tokens, _ = stage1_data
    model = trainer.model.eval()
    with torch.no_grad():
        text = F.normalize(model.get_text_features(tokens.input_ids, tokens.attention_mask).pooler_output, dim=-1)
        pixels = torch.stack([eval_dataset[i]["pixel_values"] for i in range(len(eval_dataset))])
        image = F.normalize(model.get_image_features(pixels).pooler_output, dim=-1)
    nearest = torch.as_tensor(corpus.labels)[(image @ text.T).argmax(-1)]
    expected = (nearest == torch.as_tensor(eval_dataset.labels)).float().mean().item()
    assert metrics["eval_image_top1"] == pytest.approx(expected)
    assert 0.0 <= metrics["eval_knn_5"] <= 1.0


def test_default_collator_pairs_each_image_with_a_sentence_of_its_class(tiny_clip_dir, stage1_data, tmp_path):
    trainer = make_trainer(tiny_clip_dir, stage1_data, tmp_path)
    assert isinstance(trainer.data_collator, CVLPCollator)
    batch = first_batch(trainer, 6)
    corpus = stage1_data[0]
    assert corpus.labels[batch["sentence_ids"].numpy()].tolist() == batch["labels"].tolist()

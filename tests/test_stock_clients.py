"""Clients this project did not write, used the way their own examples use them: `Trainer` as in transformers'
`examples/pytorch/image-classification/run_image_classification.py`, `pipeline("image-feature-extraction")`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, make_classifier
from PIL import Image
from safetensors import safe_open
from torchvision.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

from modeling_vlltr import VLLTRForImageClassification
from training.data import eval_image_processor

NUM_LABELS = 3


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """An imagefolder dataset: train/<class>/*.png and validation/<class>/*.png, a colour per class."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("validation", 3)):
        for c in range(NUM_LABELS):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (IMAGE_SIZE + 8, IMAGE_SIZE + 8, 3)) + 90 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def stage2_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("stage2")
    make_classifier(num_labels=NUM_LABELS, num_anchors=3).save_pretrained(path)
    # The processor every script of this package saves. The stock example resizes to its `size` (ignoring
    # `crop_size`), which is the model's input size, as in CLIP's own processor.
    eval_image_processor(IMAGE_SIZE).save_pretrained(path)
    return str(path)


def test_trainer_like_the_stock_image_classification_example(imagefolder, stage2_checkpoint, tmp_path):
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(imagefolder))
    labels = dataset["train"].features["label"].names
    label2id = {label: str(i) for i, label in enumerate(labels)}
    id2label = {str(i): label for i, label in enumerate(labels)}
    model = AutoModelForImageClassification.from_pretrained(
        stage2_checkpoint, num_labels=len(labels), label2id=label2id, id2label=id2label
    )
    image_processor = AutoImageProcessor.from_pretrained(stage2_checkpoint)
    size = image_processor.size.get("shortest_edge") or (image_processor.size["height"], image_processor.size["width"])
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
    val_transforms = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def transform(transforms):
        def apply(batch):
            batch["pixel_values"] = [transforms(image.convert("RGB")) for image in batch["image"]]
            return batch

        return apply

    dataset["train"].set_transform(transform(train_transforms))
    dataset["validation"].set_transform(transform(val_transforms))

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        return {"pixel_values": pixel_values, "labels": torch.tensor([example["label"] for example in examples])}

    seen = []

    def compute_metrics(p):
        seen.append(p.predictions)
        return {"accuracy": float(np.mean(np.argmax(p.predictions, axis=1) == p.label_ids))}

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        remove_unused_columns=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-3,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["validation"],
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )
    trainer.train()
    metrics = trainer.evaluate()

    predictions = seen[-1]
    assert isinstance(predictions, np.ndarray) and predictions.shape == (9, NUM_LABELS)
    model.eval()
    with torch.no_grad():
        batch = collate_fn([dataset["validation"][i] for i in range(9)])
        expected = model(pixel_values=batch["pixel_values"])
    np.testing.assert_allclose(predictions, expected.logits.numpy(), rtol=1e-5, atol=1e-5)
    accuracy = np.mean(expected.logits.argmax(-1).numpy() == batch["labels"].numpy())
    assert metrics["eval_accuracy"] == pytest.approx(accuracy)
    assert expected.image_logits is not None and expected.text_logits is not None  # still on the model's output


# -- DDP and gradient checkpointing without find_unused_parameters ---------------------------------------------------

DDP_SCRIPT = """
import sys

import torch
import torch.distributed as dist

from modeling_vlltr import VLLTRForImageClassification

dist.init_process_group("gloo")
rank = dist.get_rank()
checkpoint = sys.argv[1]
for checkpointing in (False, True):
    model = VLLTRForImageClassification.from_pretrained(checkpoint).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False, the default
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):  # DDP reports parameters that got no gradient at the second step
        pixels = torch.randn(2, 3, 32, 32, generator=generator)
        labels = torch.randint(0, model.config.num_labels, (2,), generator=generator)
        ddp(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = model.clip.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    gathered = [torch.zeros_like(weight) for _ in range(2)]
    dist.all_gather(gathered, weight)
    assert torch.equal(gathered[0], gathered[1]), "the ranks' weights diverged"
    print(f"rank {rank} {model.config.head_type} checkpointing={checkpointing} OK", flush=True)
dist.barrier()  # both ranks are done before either tears gloo down (a rank leaving early aborts the other's teardown)
dist.destroy_process_group()
"""


def test_ddp_and_gradient_checkpointing_without_find_unused_parameters(tmp_path):
    make_classifier().save_pretrained(tmp_path / "lgr")  # the FC head's frozen set is the same (tested in-process)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    torchrun = str(torchrun) if torchrun.exists() else shutil.which("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "lgr")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert proc.stdout.count(" OK") == 4, proc.stdout[-4000:]


@pytest.mark.parametrize("head_type", ["lgr", "fc"])
def test_unused_towers_are_frozen_but_saved_and_checkpointing_keeps_gradients(head_type, tmp_path):
    model = make_classifier(head_type=head_type)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        name
        for name, _ in model.named_parameters()
        if name.startswith(("clip.text_model.", "clip.text_projection.")) or name == "clip.logit_scale"
    }
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "clip.text_projection.weight" in f.keys() and "clip.text_model.final_layer_norm.weight" in f.keys()

    pixels, labels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([1, 3])
    grads = []
    for checkpointing in (False, True):
        model = VLLTRForImageClassification.from_pretrained(tmp_path).train()
        assert not any(p.requires_grad for p in model.clip.text_model.parameters())
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(pixel_values=pixels, labels=labels).loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)

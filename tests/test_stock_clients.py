"""Clients this project did not write, used the way their own examples use them: `Trainer` as in transformers'
`examples/pytorch/image-classification/run_image_classification.py`, `pipeline("image-feature-extraction")`."""

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, make_classifier
from PIL import Image
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
    # The stock example resizes to the processor's `size`, not `crop_size`: give it a processor whose two agree (as
    # openai/clip-vit-base-patch16's do). With the project's evaluation processor (resize 1/0.875, then crop) it
    # feeds 256 px images to a 224 px model, which refuses them naming interpolate_pos_encoding.
    processor = eval_image_processor(IMAGE_SIZE)
    processor.size = {"shortest_edge": IMAGE_SIZE}
    processor.save_pretrained(path)
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

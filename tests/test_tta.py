"""Test-time augmentation in run_eval: `--tta none` is the plain evaluation bit for bit, the views are torchvision's
flips and five / ten crops of the resized image, and the prediction is the view-averaged probability."""

import json

import pytest
import torch
from conftest import make_classifier
from PIL import Image
from torchvision.transforms import v2

from training import run_eval
from training.cli import run_main
from training.data import eval_image_processor
from training.embedding import predict_logits
from training.metrics import ShotThresholds, long_tail_metrics
from training.splits import ImageDataset, read_image_list
from training.tta import MultiViewTransform, predict_logits_tta

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tta_ckpt")
    model = make_classifier(num_labels=4, seed=3)
    model.save_pretrained(path)
    eval_image_processor(32).save_pretrained(path)
    return path, model.eval()


def eval_args(checkpoint, lt_dataset, out, *extra):
    return [
        "--model_name_or_path", str(checkpoint), "--test_file", lt_dataset["test"], "--train_file",
        lt_dataset["train"], "--image_root", lt_dataset["root"], "--output_dir", str(out), "--many_shot_threshold",
        "8", "--few_shot_threshold", "4", "--update_model_card", "False", *FAST, *extra,
    ]  # fmt: skip


def test_tta_none_is_the_plain_evaluation_bit_for_bit(checkpoint, lt_dataset, tmp_path):
    path, model = checkpoint
    plain = run_eval.main(eval_args(path, lt_dataset, tmp_path / "plain"))
    none = run_eval.main(eval_args(path, lt_dataset, tmp_path / "none", "--tta", "none"))
    assert none == plain
    # and both are the model's own prediction on the processor's single view, recomputed here
    processor = eval_image_processor(32)
    samples = read_image_list(lt_dataset["test"], lt_dataset["root"])
    dataset = ImageDataset(samples, lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0])
    out = predict_logits(model, dataset, batch_size=64)
    counts = [12, 6, 3, 2]
    expected = long_tail_metrics(
        out["logits"], dataset.labels, counts, ShotThresholds(8, 4, False), out["image_logits"], out["text_logits"]
    )
    for key in ("top1", "top5", "many_top1", "few_top1", "image_top1", "text_top1"):
        assert none[key] == expected[key], key
    assert json.load(open(tmp_path / "none" / "metrics.json"))["tta"] == "none"


def test_views_are_torchvision_flips_and_crops_of_the_resized_image():
    processor = eval_image_processor(32)  # resize the short side to 36, centre-crop 32
    image = Image.fromarray(torch.randint(0, 255, (30, 47, 3), dtype=torch.uint8).numpy())
    center = processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, 32, 32)
    resized = processor(images=image, do_center_crop=False, return_tensors="pt")["pixel_values"][0]
    assert resized.shape[-2] == 36 and resized.shape[-1] > 36
    flip = MultiViewTransform(processor, "flip")(image)
    assert torch.equal(flip[0], center) and torch.equal(flip[1], center.flip(-1))
    five = MultiViewTransform(processor, "five_crop")(image)
    ten = MultiViewTransform(processor, "ten_crop")(image)
    assert five.shape == (5, 3, 32, 32) and ten.shape == (10, 3, 32, 32)
    # corners by hand: top-left, top-right, bottom-left, bottom-right, then the centre (= the plain view)
    h, w = resized.shape[-2:]
    corners = [
        resized[:, :32, :32],
        resized[:, :32, w - 32 :],
        resized[:, h - 32 :, :32],
        resized[:, h - 32 :, w - 32 :],
    ]
    for k, corner in enumerate(corners):
        assert torch.equal(five[k], corner), k
    assert torch.equal(five[4], center)
    assert torch.equal(ten[:5], five)  # then the five crops of the mirrored image
    assert torch.equal(ten[5:], torch.stack([five[1], five[0], five[3], five[2], five[4]]).flip(-1))
    assert torch.equal(ten, torch.stack(v2.TenCrop(32)(resized)))


def test_the_prediction_averages_probabilities_over_views(checkpoint, lt_dataset):
    _, model = checkpoint
    processor = eval_image_processor(32)
    samples = read_image_list(lt_dataset["test"], lt_dataset["root"])
    dataset = ImageDataset(samples, MultiViewTransform(processor, "five_crop"))
    out = predict_logits_tta(model, dataset, batch_size=5)
    for i in range(len(dataset)):  # naive: one image at a time, one view at a time
        views = dataset[i]["pixel_values"]
        with torch.no_grad():
            outputs = [model(pixel_values=view[None]) for view in views]
        for key in ("logits", "image_logits", "text_logits"):
            mean_prob = sum(getattr(o, key).softmax(-1)[0] for o in outputs) / len(outputs)  # (C,)
            torch.testing.assert_close(out[key][i].exp(), mean_prob, rtol=1e-5, atol=1e-6, msg=key)
    assert out["labels"].tolist() == list(dataset.labels)


def test_ten_crop_run_and_bad_processor(checkpoint, lt_dataset, tmp_path, capfd):
    path, _ = checkpoint
    report = run_eval.main(eval_args(path, lt_dataset, tmp_path / "ten", "--tta", "ten_crop"))
    assert report["tta"] == "ten_crop" and 0.0 <= report["top1"] <= 1.0
    small = tmp_path / "small"  # a processor that resizes below its crop: no crops to take
    small.mkdir()
    for f in path.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config = json.load(open(small / "preprocessor_config.json"))
    config["size"] = {"shortest_edge": 24}
    json.dump(config, open(small / "preprocessor_config.json", "w"))
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_eval.main, "run_eval", eval_args(small, lt_dataset, tmp_path / "bad", "--tta", "five_crop"))
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("run_eval: error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "short side to 24" in lines[0]

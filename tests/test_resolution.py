"""Training at another input size (the paper's 384 px iNaturalist run, here a tiny CLIP at 32 → 48 px): the position
embeddings are resampled once and saved, and every later stage, the evaluation and the saved processor follow."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from modeling_vlltr import VLLTRModel
from training import run_cvlp, run_eval, run_lgr, run_select_anchors
from training.cli import run_main
from training.resolution import resize_image_size

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]


def test_resized_model_equals_clip_interpolating_its_position_embeddings(tiny_clip_dir):
    original = VLLTRModel.from_pretrained(tiny_clip_dir).eval()
    resized = VLLTRModel.from_pretrained(tiny_clip_dir).eval()
    old = original.clip.vision_model.embeddings.position_embedding.weight  # (1 + 4², D)
    assert resize_image_size(resized, 48) and not resize_image_size(resized, 48)
    new = resized.clip.vision_model.embeddings.position_embedding.weight
    assert new.shape == (1 + 6 * 6, old.shape[1])
    torch.testing.assert_close(new[0], old[0])  # the class token's embedding is kept
    # the patch grid: the 4×4 grid (row-major) resampled to 6×6 with timm's / OpenCLIP's kernel (bicubic, antialias)
    grid = old[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(new[1:], expected.permute(0, 2, 3, 1).reshape(36, -1))
    assert resized.config.clip_config.vision_config.image_size == 48
    # a 48 px image runs through the resized model without run-time interpolation, close to CLIP's run-time
    # interpolation of the 32 px embeddings (which uses torch's other bicubic kernel, a = −0.75, so not equal)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = resized.get_image_features(pixels).pooler_output
        interpolated = original.get_image_features(pixels, interpolate_pos_encoding=True).pooler_output
        unresized = original.get_image_features(F.interpolate(pixels, size=(32, 32), mode="bilinear")).pooler_output
    assert (plain - interpolated).abs().max() < 0.2 * (plain - unresized).abs().max()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resize_image_size(resized, 50)


def test_a_48px_run_goes_through_all_four_scripts(tiny_clip_dir, lt_dataset, tmp_path, capsys):
    d, out = lt_dataset, tmp_path
    common = ["--image_root", d["root"], *FAST]
    run_cvlp.main(
        ["--model_name_or_path", tiny_clip_dir, "--train_file", d["train"], "--class_names", d["classes"],
         "--text_corpus", d["corpus"], "--output_dir", str(out / "stage1"), "--image_size", "48", "--max_steps", "2",
         "--per_device_train_batch_size", "8", *common]
    )  # fmt: skip
    weights = load_file(out / "stage1" / "model.safetensors")
    assert weights["clip.vision_model.embeddings.position_embedding.weight"].shape[0] == 1 + 6 * 6
    run_select_anchors.main(
        ["--model_name_or_path", str(out / "stage1"), "--selection_file", d["val"], "--class_names", d["classes"],
         "--text_corpus", d["corpus"], "--num_anchor_sentences", "4", "--output_dir", str(out / "anchors"), *common]
    )  # fmt: skip
    run_lgr.main(
        ["--model_name_or_path", str(out / "anchors"), "--train_file", d["train"], "--output_dir", str(out / "stage2"),
         "--max_steps", "2", "--per_device_train_batch_size", "8", *common]
    )  # fmt: skip
    report = run_eval.main(
        ["--model_name_or_path", str(out / "stage2"), "--test_file", d["test"], "--train_file", d["train"],
         "--output_dir", str(out / "eval"), *common]
    )  # fmt: skip
    assert report
    for stage in ("stage1", "anchors", "stage2"):
        config = json.loads((out / stage / "config.json").read_text())
        assert config["clip_config"]["vision_config"]["image_size"] == 48, stage
        processor = AutoImageProcessor.from_pretrained(out / stage)
        assert processor.crop_size == {"height": 48, "width": 48} and processor.size == {"shortest_edge": 48}, stage
        resized = processor(images=Image.new("RGB", (96, 64)), do_center_crop=False, return_tensors="pt")
        assert resized["pixel_values"].shape[-2:] == (54, 81), stage  # short side int(256 / 224 · 48), then crop 48
    # the final checkpoint is a plain 48 px model: loaded and run at 48 px without run-time interpolation
    model = AutoModelForImageClassification.from_pretrained(out / "stage2", trust_remote_code=True).eval()
    with torch.no_grad():
        assert model(pixel_values=torch.zeros(1, 3, 48, 48)).logits.shape == (1, 4)
    assert json.loads((out / "stage1" / "training_history.json").read_text())[-1]["settings"]["image_size"] == 48

    with pytest.raises(SystemExit):
        run_main(
            run_cvlp.main,
            "run_cvlp",
            ["--model_name_or_path", tiny_clip_dir, "--train_file", d["train"], "--class_names", d["classes"],
             "--text_corpus", d["corpus"], "--output_dir", str(out / "bad"), "--image_size", "50", *common],
        )  # fmt: skip
    assert "--image_size 50 must be a multiple of the patch size (8)" in capsys.readouterr().err

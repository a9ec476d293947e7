"""LoRA adapters through peft (`training/adapters.py`): the trainable-parameter count, merged checkpoints that load
without peft and give the unmerged model's logits, the adapter folder that peft loads, resuming a LoRA run, and the
one-line error for a target layer that does not exist."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import CLASS_NAMES, make_classifier, random_pixels
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel
from training import run_cvlp, run_lgr
from training.adapters import AdapterArguments, add_lora, count_parameters, merged_state_dict
from training.cli import run_main
from training.data import MixupCutmixCollator, eval_image_processor, train_transform
from training.lgr_config import LGRConfig
from training.lgr_trainer import LGRTrainer
from training.splits import ImageDataset, read_image_list

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]


@pytest.fixture(scope="module")
def anchors_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora_anchors")
    model = make_classifier(num_labels=4, num_anchors=3)
    model.config.id2label = dict(enumerate(CLASS_NAMES))
    model.config.label2id = {n: i for i, n in enumerate(CLASS_NAMES)}
    model.save_pretrained(path)
    eval_image_processor(32).save_pretrained(path)
    return path


class _Killed(Exception):
    pass


class _KillAfterSave(TrainerCallback):
    """Stops the run the hard way right after checkpoint-`step` is written (like a SIGKILL, in-process)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Killed


def _lgr_trainer(anchors_dir, lt_dataset, out, max_steps, **overrides):
    model = VLLTRForImageClassification.from_pretrained(anchors_dir)
    add_lora(model, AdapterArguments(peft="lora", lora_r=4), towers=("vision",), seed=0)
    train = ImageDataset(read_image_list(lt_dataset["train"], lt_dataset["root"]), train_transform(32))
    args = LGRConfig(
        output_dir=str(out), use_cpu=True, report_to="none", per_device_train_batch_size=4, max_steps=max_steps,
        save_strategy="steps", save_steps=2, learning_rate=5e-2, seed=0, disable_tqdm=True, logging_steps=1,
        **overrides,
    )  # fmt: skip
    collator = MixupCutmixCollator(4, args.mixup_alpha, args.cutmix_alpha, label_smoothing=0.1)
    return LGRTrainer(model=model, args=args, train_dataset=train, data_collator=collator)


def test_trainable_parameters_are_the_adapters_and_the_head(anchors_dir, lt_dataset, tmp_path, caplog):
    # LoRA on the vision tower, LGRTrainer's freezing, the adapters at their own learning rate
    trainer = _lgr_trainer(anchors_dir, lt_dataset, tmp_path, 1, adapter_learning_rate=3e-3)
    model = trainer.model
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("image_branch.", "text_branch.")))
    vision = model.config.clip_config.vision_config
    width, layers = vision.hidden_size, vision.num_hidden_layers
    lora = layers * 2 * 4 * (width + width)  # q_proj and v_proj per layer: A (r, in) + B (out, r), r = 4
    trainable, total = count_parameters(model)
    assert trainable == head + lora
    assert total == sum(p.numel() for p in make_classifier(num_labels=4).parameters()) + lora
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n and "vision_model" in n or not n.startswith("clip.") for n in trained)
    # the optimizer holds exactly those, the adapters at `learning_rate`
    optimizer = trainer.create_optimizer()
    in_groups = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert sum(p.numel() for p in model.parameters() if id(p) in in_groups) == trainable
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = 3e-3 if ".lora_" in name else 1e-6 if name.startswith("text_branch.") else 5e-2
            assert in_groups[id(param)] == lr, name


def test_stage1_adapts_both_towers():
    model = VLLTRModel(make_classifier(num_labels=4).config)
    add_lora(model, AdapterArguments(peft="lora", lora_r=2, lora_target_modules="q_proj"), towers=("vision", "text"))
    # τ (logit_scale) is not in a tower: add_lora leaves it alone (run_cvlp freezes it with --peft lora)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and n != "clip.logit_scale"]
    assert trained and all(".lora_" in n and ".q_proj." in n for n in trained)
    assert any(n.startswith("clip.text_model.") for n in trained) and any("vision_model" in n for n in trained)


def test_stage2_lora_run_merged_checkpoint_and_adapter_folder(anchors_dir, lt_dataset, tmp_path):
    out = tmp_path / "stage2"
    run_lgr.main(
        ["--model_name_or_path", str(anchors_dir), "--train_file", lt_dataset["train"], "--image_root",
         lt_dataset["root"], "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "8",
         "--learning_rate", "5e-2", "--peft", "lora", "--lora_r", "4", "--save_adapter", "True", *FAST]
    )  # fmt: skip
    weights = load_file(out / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in weights), "a plain VL-LTR checkpoint"
    base = load_file(anchors_dir / "model.safetensors")
    q = "clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], base[q]), "the adapters are merged into the tower"
    k = "clip.vision_model.encoder.layers.0.self_attn.k_proj.weight"
    assert torch.equal(weights[k], base[k]), "layers without an adapter are the base weights"
    history = json.load(open(out / "training_history.json"))
    assert history[-1]["settings"]["peft"] == "lora" and history[-1]["settings"]["trainable_parameters"] > 0

    # the unmerged model: the input checkpoint with the adapter folder, through peft
    unmerged = PeftModel.from_pretrained(VLLTRForImageClassification.from_pretrained(anchors_dir), out / "adapter")
    pixels = random_pixels(4)
    with torch.no_grad():
        reference = unmerged.eval()(pixel_values=pixels)
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size

    # the merged checkpoint in a process where peft cannot even be imported
    script = (
        "import sys, torch; sys.modules['peft'] = None\n"
        "from modeling_vlltr import VLLTRForImageClassification\n"
        f"m = VLLTRForImageClassification.from_pretrained({str(out)!r}).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad(): o = m(pixel_values=x)\n"
        f"torch.save((o.logits, o.image_logits, o.text_logits), {str(tmp_path / 'y.pt')!r})\n"
    )
    torch.save(pixels, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    logits, image_logits, text_logits = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(logits, reference.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(image_logits, reference.image_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(text_logits, reference.text_logits, rtol=0, atol=1e-5)


def test_resume_a_lora_run_from_its_merged_checkpoint(anchors_dir, lt_dataset, tmp_path):
    straight = _lgr_trainer(anchors_dir, lt_dataset, tmp_path / "straight", 4)
    straight.train()
    interrupted = _lgr_trainer(anchors_dir, lt_dataset, tmp_path / "resumed", 4)
    interrupted.add_callback(_KillAfterSave(2))
    with pytest.raises(_Killed):
        interrupted.train()  # killed right after checkpoint-2 (merged weights + adapter/)
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert not any("lora_" in k for k in load_file(checkpoint / "model.safetensors"))
    resumed = _lgr_trainer(anchors_dir, lt_dataset, tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    # a checkpoint of a run without adapters cannot resume a LoRA run: one clear error
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        _lgr_trainer(anchors_dir, lt_dataset, tmp_path / "other", 4).train(resume_from_checkpoint=str(anchors_dir))


@pytest.mark.parametrize("script", ["run_lgr", "run_cvlp"])
def test_unknown_target_module_is_one_line(script, anchors_dir, tiny_clip_dir, lt_dataset, tmp_path, capfd):
    common = [
        "--train_file",
        lt_dataset["train"],
        "--image_root",
        lt_dataset["root"],
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--peft",
        "lora",
        "--lora_target_modules",
        "q_proj,qkv",
        *FAST,
    ]
    if script == "run_lgr":
        argv, main = ["--model_name_or_path", str(anchors_dir), *common], run_lgr.main
    else:
        argv = ["--model_name_or_path", tiny_clip_dir, "--class_names", lt_dataset["classes"], "--text_corpus",
                lt_dataset["corpus"], *common]  # fmt: skip
        main = run_cvlp.main
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, script, argv)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith(f"{script}: error:")]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert "'qkv' matches no layer" in lines[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_merged_state_dict_equals_peft_merge_and_unload():
    model = make_classifier(num_labels=4)
    add_lora(model, AdapterArguments(peft="lora", lora_r=4), towers=("vision",))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()  # B starts at zero: make the update non-trivial
    merged = merged_state_dict(model)

    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    plain = make_classifier(num_labels=4)
    plain.load_state_dict(merged)
    with torch.no_grad():
        x = random_pixels(2)
        torch.testing.assert_close(plain(x).logits, reference(x).logits, rtol=0, atol=1e-5)


def test_stage1_lora_run_saves_a_plain_merged_clip(tiny_clip_dir, lt_dataset, tmp_path):
    out = tmp_path / "stage1"
    run_cvlp.main(
        ["--model_name_or_path", tiny_clip_dir, "--train_file", lt_dataset["train"], "--image_root", lt_dataset["root"],
         "--class_names", lt_dataset["classes"], "--text_corpus", lt_dataset["corpus"], "--output_dir", str(out),
         "--max_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "5e-2", "--peft", "lora",
         "--lora_r", "2", "--save_adapter", "True", *FAST]
    )  # fmt: skip
    weights = load_file(out / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    base = VLLTRModel.from_pretrained(tiny_clip_dir).state_dict()
    for tower in ("vision_model", "text_model"):  # both towers adapted: q/v merged, everything else untouched
        q = f"clip.{tower}.encoder.layers.0.self_attn.q_proj.weight"
        k = f"clip.{tower}.encoder.layers.0.self_attn.k_proj.weight"
        assert not torch.equal(weights[q], base[q]) and torch.equal(weights[k], base[k]), tower
    assert torch.equal(weights["clip.logit_scale"], base["clip.logit_scale"]), "τ frozen with --peft lora"
    assert torch.equal(weights["clip.visual_projection.weight"], base["clip.visual_projection.weight"])
    model = VLLTRModel.from_pretrained(out)  # a plain stage-1 checkpoint, as run_select_anchors reads it
    assert type(model) is VLLTRModel
    adapter = PeftModel.from_pretrained(VLLTRModel.from_pretrained(tiny_clip_dir), out / "adapter").eval()
    x = random_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().get_image_features(x).pooler_output,
            adapter.get_image_features(x).pooler_output,
            rtol=0,
            atol=1e-5,
        )


def test_lora_with_a_trained_tower_is_one_line(anchors_dir, lt_dataset, tmp_path, capfd):
    argv = ["--model_name_or_path", str(anchors_dir), "--train_file", lt_dataset["train"], "--image_root",
            lt_dataset["root"], "--output_dir", str(tmp_path / "out"), "--peft", "lora", "--train_vision_tower",
            "True", *FAST]  # fmt: skip
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_lgr.main, "run_lgr", argv)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("run_lgr: error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "--train_vision_tower" in lines[0]
    with pytest.raises(ValueError, match="--save_adapter needs --peft lora"):
        AdapterArguments(save_adapter=True)

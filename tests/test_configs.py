"""The recipe files in training/configs parse into their script's arguments and hold the reference values."""

import json
from pathlib import Path

import pytest
from transformers import TrainingArguments

from training import run_cvlp, run_lgr, run_select_anchors
from training.adapters import AdapterArguments
from training.arguments import AugmentationArguments, CorpusArguments, DataArguments, ModelArguments
from training.cli import parse_args
from training.cvlp_config import CVLPConfig
from training.lgr_config import LGRConfig
from training.lift_config import LIFTArguments, LIFTAugmentationArguments, LIFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
SCRIPTS = {
    "stage1": (ModelArguments, DataArguments, CorpusArguments, AugmentationArguments, CVLPConfig),
    "anchors": (
        ModelArguments,
        DataArguments,
        CorpusArguments,
        run_select_anchors.AnchorArguments,
        AugmentationArguments,
        TrainingArguments,
    ),  # fmt: skip
    "stage2": (ModelArguments, DataArguments, AugmentationArguments, LGRConfig),
}
# (stage-1 lr, stage-2 lr, stage-2 epochs, fusion α, vision tower trained in stage 2): docs/method.md §1.5, §3.6, §3.7
REFERENCE = {
    "imagenet_lt": (3.5e-5, 1e-3, 50, 0.2, False),
    "places_lt": (1e-5, 5e-5, 50, 0.2, False),
    "inat2018": (3.5e-4, 2e-5, 360, 0.7, True),
}


@pytest.mark.parametrize("dataset", list(REFERENCE))
def test_recipes_parse_and_match_the_reference(dataset, tmp_path):
    parsed = {}
    for stage, types in SCRIPTS.items():
        path = CONFIGS / f"{dataset}_vit_b16_{stage}.json"
        extra = ["--output_dir", str(tmp_path / stage), "--bf16", "False"]  # the recipes ask for bf16 GPUs
        if stage != "stage1":
            extra += ["--model_name_or_path", "prev"]
        parsed[stage] = parse_args(types, [str(path), *extra])
        assert parsed[stage][-1].output_dir == str(tmp_path / stage), "command-line flags follow the file"
    lr1, lr2, epochs2, alpha, train_tower = REFERENCE[dataset]
    stage1, anchors, stage2 = parsed["stage1"][-1], parsed["anchors"][3], parsed["stage2"][-1]
    assert parsed["stage1"][0].model_name_or_path == "openai/clip-vit-base-patch16"
    assert stage1.learning_rate == lr1 and stage1.distillation_beta == 0.5 and stage1.label_smoothing == 0.1
    assert stage1.per_device_train_batch_size * 8 * stage1.gradient_accumulation_steps == 1024
    assert (
        stage2.learning_rate == lr2 and stage2.num_train_epochs == epochs2 and stage2.attention_learning_rate == 1e-6
    )
    assert stage2.train_vision_tower is train_tower and stage2.mixup_alpha == 0.8 and stage2.cutmix_alpha == 1.0
    assert anchors.fusion_alpha == alpha and anchors.num_anchor_sentences == 64
    for args in (stage1, stage2):
        assert args.sampling == "sqrt" and args.weight_decay == 0.05
    for stage in SCRIPTS:
        assert json.loads((CONFIGS / f"{dataset}_vit_b16_{stage}.json").read_text())["bf16"] is True
    if dataset == "inat2018":
        assert stage1.lr_scheduler_kwargs == {"min_lr": 1e-5} and anchors.detach_anchor_norm
        assert anchors.selection_images == "train" and not anchors.require_selection_file
    else:  # scored on the LT validation split: refused without it
        assert anchors.selection_images == "eval" and anchors.require_selection_file
    notes = json.loads((CONFIGS / f"{dataset}_vit_b16_stage1.json").read_text())["_global_batch"]
    assert "128" in notes and "1024" in notes


def test_384px_recipes_are_the_224px_ones_at_384(tmp_path):
    for stage, types in SCRIPTS.items():
        extra = ["--output_dir", str(tmp_path / stage), "--bf16", "False", "--model_name_or_path", "prev"]
        at_384 = parse_args(types, [str(CONFIGS / f"inat2018_vit_b16_384_{stage}.json"), *extra])
        at_224 = parse_args(types, [str(CONFIGS / f"inat2018_vit_b16_{stage}.json"), *extra])
        if stage == "stage1":
            assert at_384[-1].image_size == 384 and at_224[-1].image_size is None
            at_384[-1].image_size = None
        assert at_384 == at_224, stage
        assert "Cost" in json.loads((CONFIGS / f"inat2018_vit_b16_384_{stage}.json").read_text())["_cost"]


# the parameter-efficient recipes (run_cvlp / run_lgr --peft lora) and the LIFT-style peer (run_lift)
PEFT_SCRIPTS = {
    "peft_stage1": (
        ModelArguments,
        DataArguments,
        CorpusArguments,
        AugmentationArguments,
        AdapterArguments,
        CVLPConfig,
    ),
    "peft_stage2": (ModelArguments, DataArguments, AugmentationArguments, AdapterArguments, LGRConfig),
}
LIFT_TYPES = (ModelArguments, DataArguments, LIFTAugmentationArguments, LIFTArguments, LIFTConfig)
# shijxcs/LIFT scripts/run_tab1to4_main_results.sh: 10 epochs, 20 on iNaturalist 2018; CIFAR-100-LT at imbalance ρ
LIFT_EPOCHS = {"imagenet_lt": 10, "places_lt": 10, "inat2018": 20, **{f"cifar100_lt_ir{r}": 10 for r in (100, 50, 10)}}


@pytest.mark.parametrize("dataset", list(REFERENCE))
def test_peft_and_lift_recipes_parse(dataset, tmp_path):
    parsed = {}
    for stage, types in PEFT_SCRIPTS.items():
        extra = ["--output_dir", str(tmp_path / stage), "--bf16", "False"]
        if stage == "peft_stage2":
            extra += ["--model_name_or_path", "prev"]
        parsed[stage] = parse_args(types, [str(CONFIGS / f"{dataset}_vit_b16_{stage}.json"), *extra])
    stage1, stage2 = parsed["peft_stage1"], parsed["peft_stage2"]
    reference1 = parse_args(SCRIPTS["stage1"], [str(CONFIGS / f"{dataset}_vit_b16_stage1.json"), "--output_dir", "x",
                                                "--bf16", "False"])[-1]  # fmt: skip
    reference2 = parse_args(SCRIPTS["stage2"], [str(CONFIGS / f"{dataset}_vit_b16_stage2.json"), "--output_dir", "x",
                                                "--bf16", "False", "--model_name_or_path", "prev"])[-1]  # fmt: skip
    for (adapters, args), reference in ((stage1[-2:], reference1), (stage2[-2:], reference2)):
        assert adapters.peft == "lora" and adapters.target_modules == ["q_proj", "v_proj"] and adapters.save_adapter
        assert args.num_train_epochs == reference.num_train_epochs // 10, "10% of the reference epochs"
        assert args.per_device_train_batch_size * 1 * args.gradient_accumulation_steps == 1024, "one GPU, same batch"
    assert not stage2[-1].train_vision_tower and stage2[-1].adapter_learning_rate > 0


@pytest.mark.parametrize("dataset", list(LIFT_EPOCHS))
def test_lift_recipes_are_lifts_commands(dataset, tmp_path):
    path = CONFIGS / f"{dataset}_vit_b16_lift.json"
    _, data, augment, lift_args, lift = parse_args(
        LIFT_TYPES, [str(path), "--output_dir", str(tmp_path), "--bf16", "0"]
    )
    assert lift_args.adapter == "adaptformer" and lift_args.adapter_dim is None  # LIFT's bottleneck rule
    assert lift_args.prompt_mode == "default" and lift_args.classifier_feature == "pooled"
    assert lift_args.cosine_scale == 25.0
    assert lift.num_train_epochs == LIFT_EPOCHS[dataset] and lift.logit_adjustment == 1.0
    assert lift.optim == "sgd" and lift.optim_args == "momentum=0.9" and lift.learning_rate == 0.01
    assert lift.weight_decay == 5e-4 and lift.decay_all_parameters and lift.lr_schedule_per_epoch
    assert lift.lr_scheduler_type == "cosine" and lift.warmup_steps == 0 and not lift.dataloader_drop_last
    assert lift.per_device_train_batch_size * lift.gradient_accumulation_steps == 128
    assert lift.mixup_alpha == lift.cutmix_alpha == lift.label_smoothing == 0.0 and lift.sampling == "instance"
    assert not augment.rand_augment and augment.random_erasing == 0.0 and augment.augmentation == "torchvision"
    if dataset.startswith("cifar100_lt_ir"):
        assert data.long_tail_imbalance == float(dataset.rsplit("ir", 1)[1]) and data.dataset_name
    else:
        assert data.long_tail_imbalance is None
    assert "not run here" in json.loads(path.read_text())["_reported"]


def test_every_recipe_file_is_covered():
    names = {p.name for p in CONFIGS.glob("*.json")}
    expected = {f"{d}_vit_b16_{s}.json" for d in REFERENCE for s in (*SCRIPTS, *PEFT_SCRIPTS)}
    expected |= {f"{d}_vit_b16_lift.json" for d in LIFT_EPOCHS}
    assert names == expected | {f"inat2018_vit_b16_384_{s}.json" for s in SCRIPTS}
    assert run_cvlp.main and run_lgr.main

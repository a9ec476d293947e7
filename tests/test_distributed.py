"""Multi-process training on this machine's CPU (gloo), launched the way a user launches it.

With the same global batch and seed, one optimizer step of a 2-process run (`torchrun`, `accelerate launch`) gives
the loss, the logged loss terms and the weights of a 1-process run (`python -m`): the contrastive loss of stage 1
sees the whole gathered batch and its gradient is not scaled by DDP's averaging (SGD, so a wrong scale shows in the
weights). Gradient accumulation across processes and activation checkpointing give the same step; bf16 autocast
stays close. Each process gets a disjoint share of the sampler's draws, and together they are the global draw
sequence. The accelerate configs for GPU nodes parse as intended.

All launches run once, a few at a time, in a module fixture; each test reads its runs' outputs.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_lt_dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel
from training.corpus import build_class_corpus, tokenize_corpus
from training.cvlp_config import CVLPConfig
from training.cvlp_trainer import CVLPTrainer
from training.data import CVLPCollator, LongTailSampler, MixupCutmixCollator, eval_image_processor, train_transform
from training.lgr_config import LGRConfig
from training.lgr_trainer import LGRTrainer
from training.splits import ImageDataset, read_class_names, read_image_list

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs" / "accelerate"
# 36 images: an epoch is 4 global batches of 8 (1 × 8 or 2 × 4), then 4 draws dropped (drop_last)
TRAIN_COUNTS = [14, 10, 6, 6]
ONE_STEP = [
    "--max_steps", "1", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--use_cpu",
    "--report_to", "none", "--disable_tqdm", "True", "--seed", "0", "--dataloader_num_workers", "0",
    "--optim", "sgd", "--warmup_steps", "0", "--crop_scale_min", "0.5",
]  # fmt: skip
STAGE1_TERMS = ("loss_ccl", "loss_dis", "logit_scale")
STAGE2_TERMS = ("loss_image", "loss_text")


def _executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python():
    return [sys.executable]


def torchrun():
    return [_executable("torchrun"), "--standalone", "--nproc_per_node", "2"]


def accelerate_launch():
    # docs/method.md §7: `--cpu --num_processes 2` silently runs one process; --multi_gpu without a GPU gives 2 on gloo
    return [
        _executable("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]  # fmt: skip


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # two cores: one thread per process; conftest has set the offline flags, HF_HOME and VLLTR_CACHE
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _run(name: str, argv: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
        )
        rc, log = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        output = e.stdout or ""
        rc, log = "timeout", output.decode(errors="replace") if isinstance(output, bytes) else output
    (out / "launch.log").write_text(log or "")
    return {"name": name, "rc": rc, "log": log or "", "out": out}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_lt_dataset(tmp_path_factory.mktemp("dist_data"), train_counts=TRAIN_COUNTS)


@pytest.fixture(scope="module")
def anchors_dir(tiny_clip_dir, tmp_path_factory):
    """A stage-2 starting checkpoint: the tiny CLIP with random anchors and the evaluation image processor."""
    path = tmp_path_factory.mktemp("dist_anchors")
    model = VLLTRForImageClassification.from_pretrained(
        tiny_clip_dir, id2label={i: f"c{i}" for i in range(len(TRAIN_COUNTS))}, num_anchor_sentences=3
    )
    model.set_anchor_embeddings(torch.randn(len(TRAIN_COUNTS), 3, 16, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(path)
    eval_image_processor(32).save_pretrained(path)
    return str(path)


SHARD_SCRIPT = '''
"""Dumps each process's training batches, as the (index, seed) draws, from the dataloader the Trainers build."""
import json
import sys

import torch

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel
from training.cvlp_config import CVLPConfig
from training.cvlp_trainer import CVLPTrainer
from training.splits import ImageDataset, read_image_list
from training.lgr_config import LGRConfig
from training.lgr_trainer import LGRTrainer

clip_dir, anchors_dir, train_file, image_root, out_dir = sys.argv[1:6]


class DrawRecorder(ImageDataset):
    """The training split, returning the draw's key instead of the image: only the sampling is under test."""

    def __getitem__(self, key):
        return {"key": list(key)}


def collate(features):
    return {"keys": torch.tensor([f["key"] for f in features], dtype=torch.int64)}


dataset = DrawRecorder(read_image_list(train_file, image_root), transform=None)
common = dict(use_cpu=True, report_to="none", per_device_train_batch_size=4, disable_tqdm=True)
trainers = {
    "cvlp": CVLPTrainer(
        model=VLLTRModel.from_pretrained(clip_dir),
        args=CVLPConfig(output_dir=out_dir + "/cvlp", distillation_beta=0.0, seed=0, **common),
        train_dataset=dataset,
        data_collator=collate,
    ),
    "lgr": LGRTrainer(
        model=VLLTRForImageClassification.from_pretrained(anchors_dir),
        args=LGRConfig(output_dir=out_dir + "/lgr", sampling="class", seed=1, **common),
        train_dataset=dataset,
        data_collator=collate,
    ),
}
result = {}
for name, trainer in trainers.items():
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)  # what Trainer.train does at each epoch
        epochs.append([batch["keys"].tolist() for batch in loader])
    result[name] = epochs
args = trainers["cvlp"].args
result.update(rank=args.process_index, world_size=args.world_size)
with open(f"{out_dir}/rank{args.process_index}.json", "w") as f:
    json.dump(result, f)
'''


@pytest.fixture(scope="module")
def runs(tiny_clip_dir, anchors_dir, data, tmp_path_factory):
    """Every launch of this file, run concurrently (3 at a time) once; name -> {rc, log, out}."""
    root = tmp_path_factory.mktemp("dist_runs")
    stage1 = [
        "-m", "training.run_cvlp", "--model_name_or_path", tiny_clip_dir, "--train_file", data["train"],
        "--image_root", data["root"], "--class_names", data["classes"], "--text_corpus", data["corpus"],
        "--learning_rate", "1e-2", *ONE_STEP,
    ]  # fmt: skip
    stage2 = [
        "-m", "training.run_lgr", "--model_name_or_path", anchors_dir, "--train_file", data["train"],
        "--image_root", data["root"], "--learning_rate", "1e-1", "--attention_learning_rate", "1e-1",
        "--mixup_alpha", "0", "--cutmix_alpha", "0", "--label_smoothing", "0", *ONE_STEP,
    ]  # fmt: skip
    batch = lambda per_device, accumulation=1: [  # noqa: E731
        "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", str(accumulation),
    ]  # fmt: skip
    script = root / "dump_shards.py"
    script.write_text(SHARD_SCRIPT)
    jobs = {
        # stage 1: global batch 8
        "s1_ref": python() + stage1 + batch(8),
        "s1_torchrun": torchrun() + stage1 + batch(4),
        "s1_accelerate": accelerate_launch() + stage1 + batch(4),
        "s1_accum_ckpt": torchrun() + stage1 + batch(2, 2) + ["--activation_checkpointing"],
        "s1_bf16": torchrun() + stage1 + batch(4) + ["--bf16"],
        # stage 2 (frozen vision tower, the default), then with the vision tower trained
        "s2_ref": python() + stage2 + batch(8),
        "s2_torchrun": torchrun() + stage2 + batch(4),
        "s2_bf16": torchrun() + stage2 + batch(4) + ["--bf16"],
        "s2_tower_ref": python() + stage2 + batch(8) + ["--train_vision_tower"],
        "s2_tower_accum_ckpt": torchrun() + stage2 + batch(2, 2) + ["--train_vision_tower", "--activation_checkpointing"],
        # stage 2 with LoRA adapters in the vision tower (--peft lora): checkpoints hold the merged weights
        "s2_lora_ref": python() + stage2 + batch(8) + ["--peft", "lora", "--lora_r", "2"],
        "s2_lora_torchrun": torchrun() + stage2 + batch(4) + ["--peft", "lora", "--lora_r", "2"],
        "shards": torchrun() + [str(script), tiny_clip_dir, anchors_dir, data["train"], data["root"]],
    }  # fmt: skip
    argvs = {}
    for name, argv in jobs.items():
        out = root / name
        argvs[name] = argv + [str(out)] if name == "shards" else argv + ["--output_dir", str(out)]
    order = sorted(jobs, key=lambda n: n.endswith("_ref"))  # the 2-process launches first: they take longest
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, name, argvs[name], root / name) for name in order}
        return {name: future.result() for name, future in futures.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def finished(run: dict) -> Path:
    assert run["rc"] == 0, f"{run['name']} failed (exit {run['rc']}):\n{run['log'][-4000:]}"
    return run["out"]


def first_log(run: dict) -> dict:
    state = json.loads((finished(run) / "checkpoint-1" / "trainer_state.json").read_text())
    return state["log_history"][0]


def weights(run: dict) -> dict[str, torch.Tensor]:
    return load_file(finished(run) / "checkpoint-1" / "model.safetensors")


def processes(run: dict) -> tuple[int, int]:
    """(world size the run recorded, number of per-process RNG states in its checkpoint)."""
    out = finished(run)
    history = json.loads((out / "training_history.json").read_text())
    return history[-1]["settings"]["world_size"], len(list((out / "checkpoint-1").glob("rng_state*.pth")))


def assert_same_step(run: dict, ref: dict, initial: dict[str, torch.Tensor], terms: tuple[str, ...]) -> None:
    """Same first-step loss, loss terms and weights (to 1e-5) as the 1-process reference, after an SGD step large
    enough that a gradient scaled by the number of processes would be 1e-3 or more off."""
    log, ref_log = first_log(run), first_log(ref)
    assert abs(log["loss"] - ref_log["loss"]) <= 1e-5, (log, ref_log)
    for term in terms:
        assert abs(log[term] - ref_log[term]) <= 1e-5, (term, log, ref_log)
    after, ref_after = weights(run), weights(ref)
    assert after.keys() == ref_after.keys()
    moved = {k: (ref_after[k].float() - initial[k].float()).abs().max().item() for k in initial if k in ref_after}
    assert max(moved.values()) > 1e-3, "the reference step is too small to show a wrongly scaled gradient"
    diff = {k: (after[k].float() - ref_after[k].float()).abs().max().item() for k in after}
    worst = max(diff, key=diff.get)
    assert diff[worst] <= 1e-5, f"{worst} differs by {diff[worst]:.3g} (its step: {moved.get(worst, 0):.3g})"


@pytest.fixture(scope="module")
def stage1_initial(tiny_clip_dir):
    return VLLTRModel.from_pretrained(tiny_clip_dir).state_dict()


@pytest.fixture(scope="module")
def stage2_initial(anchors_dir):
    return VLLTRForImageClassification.from_pretrained(anchors_dir).state_dict()


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------------------------------


def test_stage1_torchrun_matches_one_process(runs, stage1_initial):
    assert processes(runs["s1_ref"]) == (1, 1) and processes(runs["s1_torchrun"]) == (2, 2)
    assert_same_step(runs["s1_torchrun"], runs["s1_ref"], stage1_initial, STAGE1_TERMS)


def test_stage1_accelerate_launch_runs_two_processes_and_matches(runs, stage1_initial):
    assert processes(runs["s1_accelerate"]) == (2, 2), "accelerate launch did not run 2 processes"
    assert_same_step(runs["s1_accelerate"], runs["s1_ref"], stage1_initial, STAGE1_TERMS)


def test_stage1_accumulation_across_processes_with_activation_checkpointing(runs, stage1_initial):
    """2 processes × 2 micro-batches of 2 (GradCache over the gathered window, DDP without unused-parameter search
    because checkpointing is on) give the step of one batch of 8."""
    assert processes(runs["s1_accum_ckpt"]) == (2, 2)
    assert_same_step(runs["s1_accum_ckpt"], runs["s1_ref"], stage1_initial, STAGE1_TERMS)


def test_stage1_bf16_autocast(runs):
    log, ref = first_log(runs["s1_bf16"]), first_log(runs["s1_ref"])
    assert log["loss"] != ref["loss"], "--bf16 changed nothing: autocast did not run"
    assert log["loss"] == pytest.approx(ref["loss"], rel=2e-2)
    assert log["grad_norm"] == pytest.approx(ref["grad_norm"], rel=5e-2)
    assert all(torch.isfinite(v).all() for v in weights(runs["s1_bf16"]).values())


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------------------------------


def test_stage2_torchrun_matches_one_process(runs, stage2_initial):
    assert processes(runs["s2_ref"]) == (1, 1) and processes(runs["s2_torchrun"]) == (2, 2)
    assert_same_step(runs["s2_torchrun"], runs["s2_ref"], stage2_initial, STAGE2_TERMS)


def test_stage2_lora_torchrun_matches_one_process(runs, stage2_initial):
    assert processes(runs["s2_lora_ref"]) == (1, 1) and processes(runs["s2_lora_torchrun"]) == (2, 2)
    assert_same_step(runs["s2_lora_torchrun"], runs["s2_lora_ref"], stage2_initial, STAGE2_TERMS)
    merged = weights(runs["s2_lora_torchrun"])
    assert merged.keys() == stage2_initial.keys(), "a plain VL-LTR checkpoint, adapters merged"
    assert (finished(runs["s2_lora_torchrun"]) / "checkpoint-1" / "adapter" / "adapter_model.safetensors").is_file()


def test_stage2_trained_tower_accumulation_and_activation_checkpointing(runs, stage2_initial):
    assert processes(runs["s2_tower_accum_ckpt"]) == (2, 2)
    assert_same_step(runs["s2_tower_accum_ckpt"], runs["s2_tower_ref"], stage2_initial, STAGE2_TERMS)
    trained = weights(runs["s2_tower_ref"])
    assert not torch.equal(trained["clip.visual_projection.weight"], stage2_initial["clip.visual_projection.weight"])


def test_stage2_bf16_autocast(runs):
    log, ref = first_log(runs["s2_bf16"]), first_log(runs["s2_ref"])
    assert log["loss"] != ref["loss"], "--bf16 changed nothing: autocast did not run"
    assert log["loss"] == pytest.approx(ref["loss"], rel=2e-2)
    assert all(torch.isfinite(v).all() for v in weights(runs["s2_bf16"]).values())


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing really recomputes (in process, counting an encoder layer's MLP runs)
# ----------------------------------------------------------------------------------------------------------------------


def _count_layer_calls(trainer, towers: tuple[str, ...]) -> dict[str, int]:
    """Trains and counts the runs of the first encoder layer's MLP in each tower. The count wraps the MLP's
    `forward`: a forward hook is not called again when the backward recomputes the layer."""
    calls = dict.fromkeys(towers, 0)
    for tower in towers:
        mlp = getattr(trainer.model.clip, tower).encoder.layers[0].mlp

        def counted(*args, _forward=mlp.forward, _tower=tower, **kwargs):
            calls[_tower] += 1
            return _forward(*args, **kwargs)

        mlp.forward = counted
    trainer.train()
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_checkpointing_recomputes_the_trained_layers(
    tiny_clip_dir, anchors_dir, data, tmp_path, checkpointing
):
    common = dict(
        use_cpu=True, report_to="none", per_device_train_batch_size=8, max_steps=1, save_strategy="no",
        disable_tqdm=True, activation_checkpointing=checkpointing,
    )  # fmt: skip
    train = ImageDataset(read_image_list(data["train"], data["root"]), train_transform(32, crop_scale=(0.5, 1.0)))
    corpus = build_class_corpus(read_class_names(data["classes"]), data["corpus"])
    tokens = tokenize_corpus(corpus, AutoTokenizer.from_pretrained(tiny_clip_dir))
    stage1 = CVLPTrainer(
        model=VLLTRModel.from_pretrained(tiny_clip_dir),
        args=CVLPConfig(output_dir=str(tmp_path / "s1"), distillation_beta=0.0, **common),
        train_dataset=train,
        data_collator=CVLPCollator(tokens, corpus.labels),
    )
    passes = 2 if checkpointing else 1  # the forward, then its recomputation in the backward
    assert _count_layer_calls(stage1, ("vision_model", "text_model")) == {"vision_model": passes, "text_model": passes}

    for train_tower in (False, True):
        stage2 = LGRTrainer(
            model=VLLTRForImageClassification.from_pretrained(anchors_dir),
            args=LGRConfig(output_dir=str(tmp_path / f"s2_{train_tower}"), train_vision_tower=train_tower, **common),
            train_dataset=train,
            data_collator=MixupCutmixCollator(4, 0.0, 0.0, label_smoothing=0.0),
        )
        calls = _count_layer_calls(stage2, ("vision_model", "text_model"))
        # a frozen tower builds no graph, so there is nothing to recompute; the text tower is not run in stage 2
        assert calls == {"vision_model": passes if train_tower else 1, "text_model": 0}, train_tower


# ----------------------------------------------------------------------------------------------------------------------
# The sampler's shares, from the dataloaders the Trainers build under torchrun
# ----------------------------------------------------------------------------------------------------------------------


def test_each_process_gets_a_disjoint_share_of_the_global_draws(runs, data):
    out = finished(runs["shards"])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    labels = [s.label for s in read_image_list(data["train"], data["root"])]
    for name, mode, seed in (("cvlp", "sqrt", 0), ("lgr", "class", 1)):
        sampler = LongTailSampler(labels, mode=mode, seed=seed)
        sequences = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            draws = [list(d) for d in sampler]  # the global draw sequence, (index, seed)
            shares = [r[name][epoch] for r in ranks]
            assert [len(s) for s in shares] == [4, 4], "36 draws: 4 steps of 2 × 4, the last 4 draws dropped"
            seen = []
            for step, (batch0, batch1) in enumerate(zip(*shares)):
                assert len(batch0) == len(batch1) == 4
                assert batch0 + batch1 == draws[8 * step : 8 * step + 8], (name, epoch, step)
                seen += batch0 + batch1
            keys = [tuple(d) for share in shares for batch in share for d in batch]
            assert len(set(keys)) == len(keys) == 32, "the shares overlap"
            assert sorted(keys) == sorted(tuple(d) for d in draws[:32])
            sequences.append(seen)
        assert sequences[0] != sequences[1], "the draws must change with the epoch"


# ----------------------------------------------------------------------------------------------------------------------
# Accelerate configs for GPU nodes
# ----------------------------------------------------------------------------------------------------------------------


def test_accelerate_configs_parse_as_intended(tiny_clip_dir):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, prepare_multi_gpu_env

    expected = {
        "ddp_8gpu_bf16.yaml": (DistributedType.MULTI_GPU, "bf16"),
        "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, None),  # precision: the JSON's "auto", from --bf16
    }
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    envs = {}
    for name, (distributed_type, precision) in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert (config.distributed_type, config.mixed_precision) == (distributed_type, precision), name
        assert (config.num_machines, config.num_processes, config.use_cpu) == (1, 8, False), name
        if name != "deepspeed_zero2.yaml":  # the DeepSpeed launcher itself needs deepspeed installed
            args = launch_command_parser().parse_args(
                ["--config_file", str(CONFIGS / name), "-m", "training.run_cvlp", "--output_dir", "x"]
            )
            args = _validate_launch_command(args)[0]
            assert args.num_processes == 8
            envs[name] = prepare_multi_gpu_env(args)
    assert envs["ddp_8gpu_bf16.yaml"]["ACCELERATE_MIXED_PRECISION"] == "bf16"
    deepspeed = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    ds_json = json.loads((REPO / deepspeed["deepspeed_config_file"]).read_text())  # relative to the repo root
    assert ds_json["zero_optimization"]["stage"] == 2
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):  # fmt: skip
        assert ds_json[key] == "auto", key  # filled from the training arguments
    assert ds_json["bf16"]["enabled"] == "auto" and "optimizer" not in ds_json and "scheduler" not in ds_json

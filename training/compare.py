"""VL-LTR beside its peers and its own ablations, on one dataset, over seeds.

    python -m training.compare --output_dir compare_output                     # what `make compare` runs (world)
    python -m training.compare --data digits --output_dir compare_digits       # the demo's long-tailed digits
    python -m training.world --output_dir world_s3 --seed 3 --num_classes 40 && python -m training.compare \
        --train_file world_s3/train.txt --test_file world_s3/test.txt --selection_file world_s3/val.txt \
        --image_root world_s3 --class_names world_s3/classes.txt --text_corpus world_s3/corpus.json \
        --output_dir compare_world_s3
    python -m training.compare --seeds 1 --methods zero_shot,vlltr --output_dir compare_smoke
    python -m training.compare --clip openai/clip-vit-base-patch16 --train_file train.txt --test_file test.txt \
        --selection_file val.txt --image_root ROOT --class_names classes.txt --text_corpus corpus.json \
        --output_dir compare_mydata

Every method is a real run of this package's scripts (`run_cvlp`, `run_select_anchors`, `run_lgr`, `run_eval`, each
through its `main(argv)`), once per seed; a step several methods share (the stage-1 model of VL-LTR, the FC head,
the KNN head, Cut Off and Random) runs once per seed and its seconds count for each method that uses it. Each run's
`metrics.json` and `predictions.npz` stay under `OUTPUT_DIR/seed_S/`; `results.json` holds every run's numbers and
seed, `table.md` the mean ± standard deviation over seeds next to the paper's ablation numbers with a verdict on
each of the paper's claims, `compare.png` the per-method bars with each seed's value, and `per_class_accuracy.png`
the per-class accuracy (mean over seeds) against training images.

Without data flags it uses the embedded world of `training.world` (`--data digits`: the demo's long-tailed digits),
built once with `--data_seed` (a user's data is fixed), and a stand-in CLIP pre-trained on the world's pool once per
seed (a user's pretrained CLIP is not: the seeds vary it), with schedules shorter than the demo's (world: stage 1 3
epochs, stage 2 and the linear probes 4; digits 20 / 30 / 30), chosen to bring every method over 3 seeds near 25
minutes on 2 CPU cores; the defaults of `--stage1_epochs` etc. are those short schedules, not the paper's. Data flags
naming a folder written by `python -m training.world` (its `--image_root`) get the same stand-in per seed unless
`--clip` is given. On a world, `results.json` (`world`, `world_per_seed`) and `table.md` also hold what the world
lets one measure (`training.world_measures`): zero-shot by class name and by the averaged visual descriptions, the
plain linear probe's many- and few-shot top-1, the share of visual sentences among the anchors AnSS, Random and Cut
Off keep beside their share in the corpus, and among each test image's top-3 attended anchors in VL-LTR; and the
top-1 of `--new_classes` classes per seed held out of VL-LTR's training and added from text alone
(`measure_new_classes`).
"""

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel
from transformers.utils import logging
from transformers.utils.logging import tqdm

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel

from . import add_classes, run_cvlp, run_eval, run_lgr, run_lift, run_select_anchors
from .arguments import CorpusArguments, DataArguments
from .cli import UsageError, load_checked, parse_args, run_main, shot_thresholds
from .corpus import load_corpus
from .data import ProcessorTransform, eval_image_processor
from .embedding import embed_images, embed_texts
from .io_utils import atomic_write, atomic_write_npz, atomic_write_text, save_pretrained_to
from .metrics import (
    TOP1_GROUPS,
    ShotThresholds,
    group_top1,
    long_tail_metrics,
    plot_per_class_accuracy,
    write_metrics_json,
)
from .splits import load_labelled_split
from .threads import use_one_thread
from .world_measures import (
    anchor_shares,
    explanation_visual_share,
    load_world,
    premise,
    premise_predictions,
)

logger = logging.get_logger(__name__)

# The paper's ablation (Tian et al. 2022, ablation table; ImageNet-LT, CLIP ResNet-50, top-1 %), as reported there
# and listed in docs/method.md §5.2. These are the paper's numbers, printed beside the measured ones, never measured.
PAPER_SOURCE = "paper, ImageNet-LT, CLIP ResNet-50 (docs/method.md §5.2)"
PAPER_ABLATION = {
    "vlltr": 70.1,
    "no_pretrain": 62.8,
    "no_clip": 46.8,
    "no_dis": 66.2,
    "fc": 62.1,
    "knn": 63.9,
    "cutoff": 69.7,
}
# The paper's claims, as (text, method expected better, method expected worse).
CLAIMS = (
    ("CLIP weights help", "vlltr", "no_clip"),
    ("pre-training (CVLP) helps", "vlltr", "no_pretrain"),
    ("L_dis helps", "vlltr", "no_dis"),
    ("LGR > FC head", "vlltr", "fc"),
    ("LGR > KNN head", "vlltr", "knn"),
    ("AnSS ≥ Cut Off", "vlltr", "cutoff"),
)
RULE = (
    "a claim 'holds' when mean(better) − mean(worse) > std(better) + std(worse) (sample std over seeds), is "
    "'contradicted' when the reverse difference exceeds that sum, and is 'within spread' otherwise; with one seed "
    "there is no spread and no verdict"
)


@dataclass
class CompareArguments:
    """The methods to compare, their seeds and short schedules."""

    output_dir: str = field(default="compare_output", metadata={"help": "Where every run and the results go."})
    methods: str = field(default="all", metadata={"help": "Comma-separated method names, or 'all'."})
    seeds: int = field(default=3, metadata={"help": "Number of seeds; seed s runs with --seed first_seed + s."})
    first_seed: int = field(default=0, metadata={"help": "The first seed."})
    clip: str | None = field(
        default=None, metadata={"help": "The CLIP to start from (Hub name or folder); default: the demo's stand-in."}
    )
    test_file: str | None = field(default=None, metadata={"help": "The split every method is evaluated on."})
    test_split: str | None = field(default=None, metadata={"help": "The same, as a 🤗 dataset split name."})
    selection_file: str | None = field(
        default=None, metadata={"help": "Anchor-selection images; default: 50 training images per class."}
    )
    selection_split: str | None = field(default=None, metadata={"help": "The same, as a 🤗 dataset split name."})
    many_shot_threshold: int | None = field(
        default=None, metadata={"help": "Many-shot boundary (default 100; digits 50)."}
    )
    few_shot_threshold: int | None = field(
        default=None, metadata={"help": "Few-shot boundary (default 20; digits 15)."}
    )
    # Shorter than the demo's 30 / 50 so that the 13 methods × 3 seeds fit in about 20 minutes on 2 CPU cores.
    stage1_epochs: float | None = field(
        default=None, metadata={"help": "Stage-1 epochs (default: world 3, digits and your data 20; reference 50)."}
    )
    stage2_epochs: float | None = field(
        default=None, metadata={"help": "Stage-2 (LGR / FC head) epochs (default: world 4, digits 30; reference 50)."}
    )
    linear_epochs: float | None = field(default=None, metadata={"help": "Linear-probe epochs (world 4, digits 30)."})
    lift_epochs: float | None = field(
        default=None,
        metadata={"help": "LIFT epochs; default 10%% of stage-1 + stage-2 epochs (LIFT's cost), at least 1."},
    )
    batch_size: int = field(default=64, metadata={"help": "Per-device batch size of every training run."})
    stage1_learning_rate: float = field(default=5e-4, metadata={"help": "Stage-1 learning rate (the demo's)."})
    stage2_learning_rate: float = field(default=3e-3, metadata={"help": "Stage-2 learning rate (the demo's)."})
    linear_learning_rate: float = field(default=1e-2, metadata={"help": "Linear-probe learning rate."})
    num_anchor_sentences: int = field(default=16, metadata={"help": "M anchors per class (the demo's 16)."})
    knn_k: int = field(default=5, metadata={"help": "K of the KNN head."})
    logit_adjustment_tau: float = field(default=1.0, metadata={"help": "τ of the logit-adjusted linear probe."})
    data: str = field(
        default="world",
        metadata={"help": "Without data flags: 'world' (training.world) or 'digits' (the demo's digits)."},
    )
    data_seed: int = field(default=0, metadata={"help": "Without data flags: the seed the data is built with."})
    standin_epochs: int = field(default=40, metadata={"help": "Digits only: stand-in CLIP pre-training epochs."})
    standin_steps: int = field(default=800, metadata={"help": "World only: stand-in CLIP pre-training steps."})
    new_classes: int = field(
        default=3,
        metadata={
            "help": "World only: classes held out of training per seed (drawn with the seed) and added from text "
            "alone after VL-LTR is trained on the rest (0: not measured)."
        },
    )
    jobs: int | None = field(
        default=None,
        metadata={
            "help": "Seeds run at once, each in its own process (default: one per CPU when every seed pre-trains its "
            "own stand-in CLIP, else 1)."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace what --output_dir holds."})


# ----------------------------------------------------------------------------------------------------------------------
# The runs: each step calls a script's main(argv) once per seed; shared steps are cached for the seed
# ----------------------------------------------------------------------------------------------------------------------


def _argv_of(obj) -> list[str]:
    """The command-line flags that reproduce the non-default fields of an argument dataclass."""
    argv = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not MISSING else None
        if value is None or value == default:
            continue
        argv += [f"--{f.name}", str(value)]
    return argv


class Runner:
    """Runs the steps of the methods for one seed; a step shared by several methods runs once and is remembered with
    the seconds it took."""

    def __init__(self, ctx: "Context", seed: int):
        self.ctx, self.seed = ctx, seed
        self.root = ctx.out / f"seed_{seed}"
        self.done: dict[str, tuple[Path, float]] = {}
        self._clip: str | None = None

    @property
    def clip(self) -> str:
        """The CLIP every method of this seed starts from: `--clip`, or a stand-in pre-trained with this seed (its
        pre-training is not counted in any method's seconds: a user brings a pretrained CLIP)."""
        if self._clip is None:
            if self.ctx.pretrain is None:
                self._clip = self.ctx.clip
            else:
                folder, took = self.step("standin_clip", lambda out: self.ctx.pretrain(out, self.seed))
                self.standin_seconds, self._clip = took, str(folder)
        return self._clip

    def step(self, tag: str, work: Callable[[Path], object]) -> tuple[Path, float]:
        """Runs `work(folder)` once for this seed; returns the folder and the seconds it took (its own, not its
        inputs')."""
        if tag not in self.done:
            folder = self.root / tag
            if folder.exists():
                shutil.rmtree(folder)
            start = time.time()
            work(folder)
            self.done[tag] = (folder, time.time() - start)
        return self.done[tag]

    # -- the scripts, with the seed and the data flags of this comparison
    def common(self) -> list[str]:
        c = self.ctx
        return ["--seed", str(self.seed), "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "50",
                "--save_strategy", "no", "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "64",
                *c.data_argv]  # fmt: skip

    def stage1(self, start: str, beta: float, tag: str, extra: list[str] = ()) -> tuple[Path, float]:
        c = self.ctx
        return self.step(tag, lambda out: run_cvlp.main(
            ["--model_name_or_path", start, "--output_dir", str(out), "--num_train_epochs", str(c.args.stage1_epochs),
             "--per_device_train_batch_size", str(c.args.batch_size), "--learning_rate",
             str(c.args.stage1_learning_rate), "--distillation_beta", str(beta), *c.corpus_argv, *c.augment, *extra,
             *self.common()]
        ))  # fmt: skip

    def select(self, model: Path | str, tag: str, extra: list[str]) -> tuple[Path, float]:
        c = self.ctx
        return self.step(tag, lambda out: run_select_anchors.main(
            ["--model_name_or_path", str(model), "--output_dir", str(out), "--num_anchor_sentences",
             str(c.args.num_anchor_sentences), *c.selection_argv, *c.corpus_argv, *extra, *self.common()]
        ))  # fmt: skip

    def stage2(
        self, init: Path, tag: str, epochs: float, learning_rate: float, extra: list[str]
    ) -> tuple[Path, float]:
        c = self.ctx
        return self.step(tag, lambda out: run_lgr.main(
            ["--model_name_or_path", str(init), "--output_dir", str(out), "--num_train_epochs", str(epochs),
             "--per_device_train_batch_size", str(c.args.batch_size), "--learning_rate", str(learning_rate),
             *c.augment, *extra, *self.common()]
        ))  # fmt: skip

    def evaluate(self, model: Path, tag: str, extra: list[str] = ()) -> tuple[Path, float]:
        c = self.ctx
        return self.step(tag, lambda out: run_eval.main(
            ["--model_name_or_path", str(model), "--output_dir", str(out), "--update_model_card", "False",
             *c.test_argv, *c.threshold_argv, *extra, *self.common()]
        ))  # fmt: skip

    # -- the pipelines the methods are made of
    def vlltr_from(
        self, stage1: tuple[Path, float], tag: str, strategy: str = "anss", stage2_extra: list[str] = ()
    ) -> list[tuple[Path, float]]:
        """Anchor selection on a stage-1 model, stage 2 (with `stage2_extra` flags), evaluation."""
        anchors = self.select(stage1[0], f"{tag}_anchors", ["--anchor_selection", strategy])
        lgr = self.stage2(
            anchors[0], f"{tag}_stage2", self.ctx.args.stage2_epochs, self.ctx.args.stage2_learning_rate, stage2_extra
        )
        return [stage1, anchors, lgr, self.evaluate(lgr[0], f"{tag}_eval")]

    def full_stage1(self) -> tuple[Path, float]:
        return self.stage1(self.clip, 0.5, "stage1")

    def linear_probe(self, tag: str = "linear_ce", extra: list[str] = ()) -> list[tuple[Path, float]]:
        """FC head on the starting CLIP, frozen tower, instance-balanced sampling, cross-entropy (plain unless
        `extra` says otherwise); the FC initialisation is shared by the probes of a seed."""
        a = self.ctx.args
        init = self.select(self.clip, "linear_init", ["--head_type", "fc"])
        probe = self.stage2(init[0], tag, a.linear_epochs, a.linear_learning_rate, [*PLAIN_PROBE, *extra])
        return [init, probe, self.evaluate(probe[0], f"{tag}_eval")]


# The linear probes' training: instance-balanced sampling, no mixing, no label smoothing.
PLAIN_PROBE = ["--sampling", "instance", "--mixup_alpha", "0", "--cutmix_alpha", "0", "--label_smoothing", "0"]


@dataclass
class Method:
    """One row of the comparison. `run(runner)` runs (or reuses) the steps of one seed and returns them, the last
    being a folder with `metrics.json` and `predictions.npz`. Adding a method is one `register(Method(...))`."""

    name: str
    label: str
    run: Callable[[Runner], list[tuple[Path, float]]]
    description: str = ""
    paper_top1: float | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _zero_shot(r: Runner) -> list[tuple[Path, float]]:
    return [r.step("zero_shot_eval", lambda out: zero_shot_eval(r.ctx, out, r.clip))]


def _no_clip(r: Runner) -> list[tuple[Path, float]]:
    init = r.step("random_clip", lambda out: save_random_init(r.clip, out, r.seed))
    return [init, *r.vlltr_from(r.stage1(str(init[0]), 0.0, "random_stage1"), "no_clip")]


def _fc(r: Runner) -> list[tuple[Path, float]]:
    stage1 = r.full_stage1()
    init = r.select(stage1[0], "fc_init", ["--head_type", "fc"])
    head = r.stage2(init[0], "fc_stage2", r.ctx.args.stage2_epochs, r.ctx.args.stage2_learning_rate, [])
    return [stage1, init, head, r.evaluate(head[0], "fc_eval")]


def _knn(r: Runner) -> list[tuple[Path, float]]:
    stage1 = r.full_stage1()
    return [stage1, r.evaluate(stage1[0], "knn_eval", ["--knn", str(r.ctx.args.knn_k)])]


def _linear_la(r: Runner) -> list[tuple[Path, float]]:
    """The linear probe trained with the logit-adjusted loss CE(z + τ·log π, y) (Menon et al., ICLR 2021):
    `run_lgr --logit_adjustment τ` on the FC head; its predictions are the plain logits z."""
    return r.linear_probe("linear_la", ["--logit_adjustment", str(r.ctx.args.logit_adjustment_tau)])


def _lift(r: Runner) -> list[tuple[Path, float]]:
    """`run_lift` from the starting CLIP: AdaptFormer in the image tower, a cosine head from the class-name prompts,
    logit-adjusted CE, `--lift_epochs` (10% of VL-LTR's stage-1 + stage-2 epochs by default), then `run_eval`."""
    c = r.ctx
    lift = r.step("lift", lambda out: run_lift.main(
        ["--model_name_or_path", r.clip, "--output_dir", str(out), "--num_train_epochs", str(c.lift_epochs),
         "--per_device_train_batch_size", str(c.args.batch_size), *c.augment, *r.common()]
    ))  # fmt: skip
    return [lift, r.evaluate(lift[0], "lift_eval")]


def _vlltr_lora(r: Runner) -> list[tuple[Path, float]]:
    """VL-LTR with LoRA adapters in both stages (`--peft lora`): stage 1 adapts both towers, stage 2 the image tower
    (its adapters merged into the saved checkpoints), the same schedules and anchors as `vlltr`."""
    lora = ["--peft", "lora"]
    return r.vlltr_from(r.stage1(r.clip, 0.5, "stage1_lora", lora), "vlltr_lora", stage2_extra=lora)


for _method in (
    Method("zero_shot", "Zero-shot CLIP (80 prompts)", _zero_shot, "the starting CLIP, prompt ensembling"),
    Method("linear_ce", "Linear probe, CE", lambda r: r.linear_probe(),
           "frozen starting CLIP + linear layer, cross-entropy, instance-balanced sampling"),
    Method("linear_la", "Linear probe, logit adjustment", _linear_la,
           "the linear probe trained with the logit-adjusted loss (run_lgr --logit_adjustment τ)"),
    Method("lift", "LIFT (AdaptFormer, cosine head, LA)", _lift,
           "run_lift: AdaptFormer image tower, cosine head from prompts, logit-adjusted CE, 10% of VL-LTR's epochs"),
    Method("vlltr_lora", "VL-LTR with LoRA adapters", _vlltr_lora, "run_cvlp and run_lgr with --peft lora"),
    Method("vlltr", "VL-LTR", lambda r: r.vlltr_from(r.full_stage1(), "vlltr"), "stage 1 (β = 0.5), AnSS, LGR"),
    Method("no_pretrain", "  w/o CVLP pre-training", lambda r: r.vlltr_from((r.clip, 0.0), "no_pretrain"),
           "anchors and stage 2 from the starting CLIP"),
    Method("no_clip", "  w/o CLIP weights", _no_clip, "random init of the same architecture, stage 1 with β = 0"),
    Method("no_dis", "  w/o L_dis", lambda r: r.vlltr_from(r.stage1(r.clip, 0.0, "stage1_no_dis"), "no_dis"),
           "stage 1 with --distillation_beta 0"),
    Method("fc", "  FC head", _fc, "stage 1, then run_select_anchors --head_type fc and run_lgr"),
    Method("knn", "  KNN head", _knn, "stage 1, then run_eval --knn K over the training images"),
    Method("cutoff", "  Cut Off anchors", lambda r: r.vlltr_from(r.full_stage1(), "cutoff", "cutoff"),
           "--anchor_selection cutoff"),
    Method("random", "  Random anchors", lambda r: r.vlltr_from(r.full_stage1(), "random", "random"),
           "--anchor_selection random"),
):  # fmt: skip
    _method.paper_top1 = PAPER_ABLATION.get(_method.name)
    register(_method)


# ----------------------------------------------------------------------------------------------------------------------
# Methods that are not a run_eval of a checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def _save_predictions(out: Path, labels: np.ndarray, logits: np.ndarray) -> None:
    atomic_write_npz(
        out / "predictions.npz", {"labels": labels, "logits": logits, "predictions": logits.argmax(axis=1)}
    )


def _write_eval(out: Path, logits: np.ndarray, labels: np.ndarray, counts: np.ndarray, ctx: "Context", head: str):
    """metrics.json and predictions.npz in run_eval's layout."""
    metrics = long_tail_metrics(logits, labels, counts, ctx.thresholds)
    per_class = metrics.pop("per_class_top1")
    report = {"head": head, "num_test_images": int(len(labels)), **metrics,
              "per_class": {"train_count": counts.tolist(), "top1": per_class}}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_json(out / "metrics.json", report)
    _save_predictions(out, labels, logits)


@torch.no_grad()
def zero_shot_eval(ctx: "Context", out: Path, clip: str) -> None:
    """Zero-shot CLIP: each class is the normalised mean embedding of its 80 prompts (CLIP's prompt ensembling)."""
    model = load_checked("--clip", VLLTRModel.from_pretrained, clip).eval()
    tokenizer = load_checked("--clip", AutoTokenizer.from_pretrained, clip)
    class_names = ctx.train.class_names
    corpus, tokens = load_corpus(
        CorpusArguments(text_corpus="templates"), class_names, tokenizer, model.config.clip_config.text_config
    )
    text = F.normalize(embed_texts(model, tokens, desc="Zero-shot prompts"), dim=-1)  # (N_t, D)
    labels = torch.as_tensor(corpus.labels)
    classes = F.normalize(torch.stack([text[labels == c].mean(0) for c in range(len(class_names))]), dim=-1)  # (C, D)
    processor = eval_image_processor(model.config.clip_config.vision_config.image_size)
    test = ctx.test.dataset(ProcessorTransform(processor))
    image = F.normalize(embed_images(model, test, desc="Zero-shot images"), dim=-1)  # (N, D)
    logits = (model.clip.logit_scale.exp() * image @ classes.T).double().numpy()  # (N, C)
    _write_eval(out, logits, np.asarray(ctx.test.labels), ctx.train.class_counts, ctx, "zero-shot")


def save_random_init(clip: str, out: Path, seed: int) -> None:
    """The starting CLIP's architecture with random weights (seeded), saved with its tokenizer and image processor:
    the 'no CLIP weights' ablation starts the whole pipeline from it."""
    config = load_checked("--clip", CLIPConfig.from_pretrained, clip)
    torch.manual_seed(seed)
    tokenizer = load_checked("--clip", AutoTokenizer.from_pretrained, clip)
    try:
        image_processor = AutoImageProcessor.from_pretrained(clip)
    except (OSError, ValueError):
        image_processor = eval_image_processor(config.vision_config.image_size)
    for part in (CLIPModel(config), tokenizer, image_processor):
        save_pretrained_to(part, out)


# ----------------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    args: CompareArguments
    out: Path
    clip: str
    data_argv: list[str]
    corpus_argv: list[str]
    test_argv: list[str]
    selection_argv: list[str]
    threshold_argv: list[str]
    augment: list[str]
    thresholds: ShotThresholds
    train: object
    test: object
    note: str
    pretrain: Callable[[Path, int], object] | None = None  # the stand-in's pre-training (folder, seed), per seed
    world_root: str | None = None  # a training.world folder: its measurements are taken

    @property
    def lift_epochs(self) -> float:
        a = self.args
        return a.lift_epochs if a.lift_epochs is not None else max(1, round(0.1 * (a.stage1_epochs + a.stage2_epochs)))


def _with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag`'s value replaced (or the flag appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@torch.no_grad()
def measure_world_seed(runner: Runner, zero_shot) -> dict:
    """What the world lets one measure for one seed (`training.world_measures`), from the runs this seed made: the
    premise from its starting CLIP (`zero_shot`: its `premise_predictions`; and the plain linear probe's many- and
    few-shot top-1), the visual share of the anchors AnSS, Random and Cut Off kept, and of each test image's top-3
    attended anchors in VL-LTR's checkpoint."""
    ctx = runner.ctx
    world = load_world(ctx.world_root)
    names = ctx.train.class_names
    row = {"seed": runner.seed, **premise(runner.clip, ctx.world_root, ctx.args.test_file, names, zero_shot)}
    if "linear_ce_eval" in runner.done:
        metrics = json.loads((runner.done["linear_ce_eval"][0] / "metrics.json").read_text())
        row["linear_many_top1"], row["linear_few_top1"] = metrics["many_top1"], metrics["few_top1"]
    folders = {k: runner.done[t][0] for k, t in WORLD_ANCHORS.items() if t in runner.done}
    if folders:
        shares = anchor_shares(folders, names, _flag(ctx.corpus_argv, "--text_corpus"), world["visual_of"])
        row.update({f"anchor_visual_share_{k}": v for k, v in shares.items()})
    if "vlltr_stage2" in runner.done:
        model = VLLTRForImageClassification.from_pretrained(runner.done["vlltr_stage2"][0]).eval()
        test = ctx.test.dataset(
            ProcessorTransform(eval_image_processor(model.config.clip_config.vision_config.image_size))
        )
        explained = explanation_visual_share(model, test, world["visual_of"], top_k=3)
        row["explanations_visual_share_top3"] = explained["visual_share_top_anchors"]
        row["explanations_visual_share_top3_correct"] = explained["visual_share_top_anchors_correct"]
    return row


def measure_new_classes(runner: Runner, zero_shot) -> dict:
    """Classes that arrive after training, added from text alone (`training.add_classes`), for one seed: the
    `--new_classes` classes drawn with the seed are held out of every split, VL-LTR is trained on the others (stage 1,
    AnSS, stage 2 with this comparison's schedules, from the seed's starting CLIP), and the held-out classes are added
    twice: from their descriptions alone (`--use_templates False`) and from their name's 80 prompt templates plus
    their descriptions (the script's default). Each grown model is scored on the full test split; beside them,
    chance and the starting CLIP's zero-shot top-1 on the same images by the class names and by the same
    descriptions, all classes competing (`zero_shot`: the seed's `premise_predictions`)."""
    from .demo_new_class import held_out_splits, predict_split

    ctx = runner.ctx
    names = list(ctx.train.class_names)
    rng = np.random.default_rng(runner.seed)
    held = sorted(rng.choice(len(names), size=ctx.args.new_classes, replace=False).tolist())
    corpus_file = _flag(ctx.corpus_argv, "--text_corpus")
    train_file = _flag(ctx.data_argv, "--train_file")
    selection_file = _flag(ctx.selection_argv, "--selection_file")
    data = {"class_names": names, "corpus": corpus_file, "root": ctx.world_root, "train": train_file,
            "val": selection_file or train_file, "test": ctx.args.test_file}  # fmt: skip
    folder = runner.root / "new_classes"
    folder.mkdir(parents=True, exist_ok=True)
    splits = held_out_splits(data, held, folder)
    kept_ctx = replace(
        ctx,
        data_argv=_with_flag(_with_flag(ctx.data_argv, "--train_file", splits["train9"]), "--class_names",
                             splits["classes9"]),
        corpus_argv=_with_flag(ctx.corpus_argv, "--text_corpus", splits["corpus9"]),
        selection_argv=["--selection_file", splits["val9"]] if selection_file else [],
        test_argv=["--test_file", splits["test9"]],
    )  # fmt: skip
    kept = Runner(kept_ctx, runner.seed)
    kept.root, kept._clip = folder, runner.clip
    steps = kept.vlltr_from(kept.full_stage1(), "kept")
    trained = steps[2][0]  # the stage-2 checkpoint on the kept classes, evaluated on their test images in steps[3]
    scored = np.load(steps[3][0] / "predictions.npz")
    before = float((scored["predictions"] == scored["labels"]).mean())
    new_labels = np.array(splits["new_labels"])
    row = {"new_classes": splits["new_classes"], "new_class_chance": 1.0 / len(names),
           "new_class_others_top1_before": before}  # fmt: skip
    for tag, templates in (("descriptions", "False"), ("name_and_descriptions", "True")):
        grown, _ = kept.step(f"added_from_{tag}", lambda out, templates=templates: add_classes.main(
            ["--model_name_or_path", str(trained), "--class_names", splits["new_names"], "--text_corpus",
             splits["new_corpus"], "--use_templates", templates, "--output_dir", str(out), "--report_to", "none"]
        ))  # fmt: skip
        predictions, labels = predict_split(grown, splits["test10"], ctx.world_root)
        is_new = np.isin(labels, new_labels)
        row[f"new_class_added_from_{tag}_top1"] = float((predictions[is_new] == labels[is_new]).mean())
        row[f"new_class_others_change_{tag}"] = float((predictions[~is_new] == labels[~is_new]).mean()) - before
    labels, predicted = zero_shot
    is_new = np.isin(labels, held)
    for key in ("name", "all_descriptions"):
        row[f"new_class_zero_shot_by_{key}_top1"] = float((predicted[key][is_new] == labels[is_new]).mean())
    return row


# anchor strategies measured -> the run_select_anchors step of that method
WORLD_ANCHORS = {"anss": "vlltr_anchors", "random": "random_anchors", "cutoff": "cutoff_anchors"}
WORLD_ROWS = {
    "chance": "chance",
    "zero_shot_by_name_top1": "zero-shot by class name (80 templates)",
    "zero_shot_by_visual_descriptions_top1": "zero-shot by averaged visual descriptions",
    "zero_shot_by_all_descriptions_top1": "zero-shot by averaged descriptions (all)",
    "linear_many_top1": "linear probe (CE), many-shot classes",
    "linear_few_top1": "linear probe (CE), few-shot classes",
    "anchor_visual_share_corpus_descriptions": "visual share: the descriptions",
    "anchor_visual_share_corpus_candidates": "visual share: the candidates (80 templates + descriptions)",
    "anchor_visual_share_anss": "visual share: anchors kept by AnSS",
    "anchor_visual_share_random": "visual share: anchors kept by Random",
    "anchor_visual_share_cutoff": "visual share: anchors kept by Cut Off",
    "explanations_visual_share_top3": "visual share: each test image's top-3 attended anchors (VL-LTR)",
    "explanations_visual_share_top3_correct": "the same, correctly classified test images",
    "new_class_chance": "classes added from text alone: chance",
    "new_class_added_from_descriptions_top1": "classes added from text alone: from their descriptions",
    "new_class_added_from_name_and_descriptions_top1": "classes added from text alone: from name templates + descriptions",
    "new_class_zero_shot_by_name_top1": "classes added from text alone: zero-shot by class name (same images)",
    "new_class_zero_shot_by_all_descriptions_top1": "classes added from text alone: zero-shot by their descriptions",
    "new_class_others_change_descriptions": "classes added from text alone: change on the other classes (points)",
}


def world_summary(rows: list[dict]) -> dict:
    """Mean and sample std over seeds of every measured quantity, with each seed's value."""
    keys = [k for k in WORLD_ROWS if any(k in r for r in rows)]
    return {k: dict(zip(("mean", "std"), _summary([r.get(k) for r in rows])), per_seed=[r.get(k) for r in rows])
            for k in keys}  # fmt: skip


def world_markdown(summary: dict, seeds: int) -> str:
    lines = ["The world's measurements (%, " + ("mean ± sample std over seeds" if seeds > 1 else "one seed")
             + "; visual_sentences.json is read here only):", "", "| quantity | value |", "|---|---|"]  # fmt: skip
    for key, value in summary.items():
        lines.append(f"| {WORLD_ROWS[key]} | {_fmt(value['mean'], value['std'], seeds)} |")
    return "\n".join(lines) + "\n"


def _summary(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _fmt(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def verdicts(summary: dict, seeds: int) -> list[dict]:
    """The paper's claims checked on the measured overall top-1 (see RULE)."""
    rows = []
    for text, better, worse in CLAIMS:
        if better not in summary or worse not in summary:
            continue
        (mb, sb), (mw, sw) = summary[better]["overall"], summary[worse]["overall"]
        diff, spread = mb - mw, sb + sw
        if seeds < 2:
            verdict = "no verdict (one seed)"
        elif diff > spread:
            verdict = "holds"
        elif -diff > spread:
            verdict = "contradicted"
        else:
            verdict = "within spread"
        paper = None
        if better in PAPER_ABLATION and worse in PAPER_ABLATION:
            paper = round(PAPER_ABLATION[better] - PAPER_ABLATION[worse], 1)
        rows.append({"claim": text, "better": better, "worse": worse, "difference": diff, "spread": spread,
                     "verdict": verdict, "paper_difference": paper})  # fmt: skip
    return rows


def markdown_table(summary: dict, seconds: dict, seeds: list[int], claims: list[dict], note: str) -> str:
    n = len(seeds)
    spread = "mean ± sample std over" if n > 1 else "one run,"
    lines = [
        f"Top-1 (%), {spread} seeds {', '.join(map(str, seeds))}. {note}",
        "",
        "| method | paper's top-1 † | overall | many | medium | few | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        method = METHODS[name]
        paper = f"{method.paper_top1:.1f}" if method.paper_top1 is not None else "—"
        cells = [_fmt(*row[g], n) for g in TOP1_GROUPS]
        secs = f"{np.mean(seconds[name]):.0f}"
        lines.append(f"| {method.label.strip()} (`{name}`) | {paper} | " + " | ".join(cells) + f" | {secs} |")
    if claims:
        lines += ["", f"The paper's claims here ({RULE}):", "",
                  "| claim | measured difference | seeds' spread | paper's difference | verdict |", "|---|---|---|---|---|"]  # fmt: skip
        for c in claims:
            paper = f"{c['paper_difference']:+.1f}" if c["paper_difference"] is not None else "—"
            lines.append(f"| {c['claim']} | {100 * c['difference']:+.1f} | {100 * c['spread']:.1f} | {paper} | "
                         f"{c['verdict']} |")  # fmt: skip
    lines += ["", f"† The numbers the paper reports ({PAPER_SOURCE}), not runs of this code. Seconds count every step "
              "a method needs, including a stage 1 it shares with others."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_bars(summary: dict, per_seed: dict, path: Path) -> None:
    """Per-method bars (mean overall top-1) with each seed's value as a dot and the sample std as an error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: matplotlib is slow to import
    from matplotlib.figure import Figure

    names = list(summary)
    figure = Figure(figsize=(max(6, 0.8 * len(names) + 2), 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    x = np.arange(len(names))
    means = [100 * summary[n]["overall"][0] for n in names]
    stds = [100 * summary[n]["overall"][1] for n in names]
    axes.bar(x, means, yerr=stds, capsize=4, color="#8fb3d9", label="mean ± std")
    for i, name in enumerate(names):
        values = [100 * v for v in per_seed[name]["overall"]]
        axes.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, s=12, color="k",
                     zorder=3, label="one seed" if i == 0 else None)  # fmt: skip
    axes.set_xticks(x, names, rotation=30, ha="right")
    axes.set_ylabel("overall top-1 (%)")
    axes.set_title("Methods over seeds")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def _parse_methods(text: str) -> list[str]:
    if text == "all":
        return list(METHODS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UsageError(
            f"--methods: unknown method(s) {', '.join(unknown) or '(none)'}; known: {', '.join(METHODS)}."
        )
    return names


def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--output_dir {out} is not empty; pass --overwrite_output_dir or choose another folder.")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


# Schedules short enough for every method over 3 seeds in about 25 minutes on 2 CPU cores, not the paper's. The world's
# training split (~2,600 images) is six times the digits', so it gets fewer epochs.
DIGITS_SCHEDULE = {"stage1_epochs": 20, "stage2_epochs": 30, "linear_epochs": 30}
WORLD_SCHEDULE = {"stage1_epochs": 3, "stage2_epochs": 4, "linear_epochs": 4}


def _schedule(args: CompareArguments, schedule: dict) -> None:
    for name, value in schedule.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _schedule_note(args: CompareArguments) -> str:
    return (f"shortened schedules (stage 1 {args.stage1_epochs:g} epochs, stage 2 {args.stage2_epochs:g}, linear "
            f"probe {args.linear_epochs:g}), not the paper's.")  # fmt: skip


def _pretrain_world(data: dict, steps: int, out: Path, seed: int) -> str:
    from .world import pretrain_world_clip

    return pretrain_world_clip(data, out, seed, steps=steps)


def _pretrain_digits(data: dict, epochs: int, out: Path, seed: int) -> str:
    from . import demo

    return demo.pretrain_standin_clip(data, out, seed, epochs=epochs)


def build_context(args: CompareArguments, data_args: DataArguments, corpus_args: CorpusArguments) -> Context:
    out = Path(args.output_dir)
    user_data = data_args.train_file is not None or data_args.dataset_name is not None
    pretrain, world_root = None, None
    augment = ["--hflip", "0", "--crop_scale_min", "0.6", "--rand_augment", "False", "--random_erasing", "0"]
    if user_data:
        if args.test_file is None and args.test_split is None:
            raise UsageError("Give the split to evaluate on: --test_file (or --test_split with --dataset_name).")
        is_world = data_args.image_root is not None and (Path(data_args.image_root) / "world.json").is_file()
        if args.clip is None and not is_world:
            raise UsageError("With your own data, give the CLIP to start from: --clip NAME_OR_FOLDER.")
        if corpus_args.text_corpus is None:
            raise UsageError("Give the class descriptions: --text_corpus (a JSON file, a folder, or 'templates').")
        defaults = ShotThresholds()
        if is_world:  # a folder written by `python -m training.world`: its measurements, and its stand-in per seed
            world_root = data_args.image_root
            data = {"root": world_root, "pool_captions": str(Path(world_root) / "pool_captions.json")}
            _schedule(args, WORLD_SCHEDULE)
            note = (f"Data: the world in {world_root}; "
                    + ("--clip " + args.clip if args.clip else "a stand-in CLIP pre-trained on its pool per seed")
                    + "; " + _schedule_note(args))  # fmt: skip
        else:
            _schedule(args, DIGITS_SCHEDULE)
            note, augment = "Your data, the schedules given by the --*_epochs flags.", []
        if args.clip is None:
            pretrain = partial(_pretrain_world, data, args.standin_steps)
        clip = args.clip
    else:  # the embedded world (or the demo's long-tailed digits) and a stand-in CLIP per seed
        from . import demo

        logger.warning(f"No data flags: the demo's data (--data {args.data}) and a stand-in CLIP, short schedules.")
        data = demo.build_data(args.data, out / "data", seed=args.data_seed)
        if args.clip is None:
            pretrain = (partial(_pretrain_world, data, args.standin_steps) if args.data == "world"
                        else partial(_pretrain_digits, data, args.standin_epochs))  # fmt: skip
        clip = args.clip
        data_args = DataArguments(train_file=data["train"], image_root=data["root"], class_names=data["classes"])
        corpus_args = CorpusArguments(text_corpus=data["corpus"])
        args.test_file, args.selection_file = data["test"], data["val"]
        _schedule(args, WORLD_SCHEDULE if args.data == "world" else DIGITS_SCHEDULE)
        defaults = demo.SETTINGS[args.data].thresholds
        what = ("the embedded world (training.world, default arguments)" if args.data == "world"
                else f"the demo's long-tailed digits (imbalance {demo.IMBALANCE})")  # fmt: skip
        if args.data == "world":
            world_root = data["root"]
        note = (f"Data: {what}, seed {args.data_seed} (shared by the seeds: a user's data is fixed); "
                + (f"--clip {args.clip}" if args.clip else "a stand-in CLIP pre-trained per seed") + "; "
                + _schedule_note(args))  # fmt: skip
    thresholds = shot_thresholds(defaults, args.many_shot_threshold, args.few_shot_threshold)
    train = load_labelled_split(data_args, data_args.train_file, data_args.train_split, "training split")
    if train is None:
        raise UsageError("Give the training images: --train_file or --dataset_name.")
    test = load_labelled_split(data_args, args.test_file, args.test_split, "test split", class_names=train.class_names)
    test_argv = ["--test_file", args.test_file] if args.test_file else ["--test_split", args.test_split]
    if args.selection_file or args.selection_split:
        selection_argv = (["--selection_file", args.selection_file] if args.selection_file
                          else ["--selection_split", args.selection_split])  # fmt: skip
    else:
        selection_argv = []  # run_select_anchors takes the first 50 training images per class
    data_argv = _argv_of(data_args)
    if data_args.class_names is None:
        # the scripts read the class names from the data; pin them so every run sees the same order
        names_file = out / "class_names.txt"
        atomic_write_text(names_file, "\n".join(train.class_names) + "\n")
        data_argv += ["--class_names", str(names_file)]
    threshold_argv = ["--many_shot_threshold", str(thresholds.many), "--few_shot_threshold", str(thresholds.few)]
    return Context(args, out, clip, data_argv, _argv_of(corpus_args), test_argv, selection_argv, threshold_argv,
                   augment, thresholds, train, test, note, pretrain, world_root)  # fmt: skip


def seed_jobs(args: CompareArguments, ctx: Context, seeds: int) -> int:
    """How many seeds run at once: `--jobs`, or by default one per CPU when every seed trains its own stand-in CLIP
    (small, one thread each), else one."""
    if args.jobs is not None:
        return max(1, min(args.jobs, seeds))
    return max(1, min(seeds, os.cpu_count() or 1)) if ctx.pretrain is not None else 1


def _seed_worker_init(threads: int) -> None:
    if not os.environ.get("OMP_NUM_THREADS"):
        if threads == 1:
            use_one_thread()
        else:
            torch.set_num_threads(threads)


def run_seed(ctx: Context, seed: int, methods: list[str], bar=None) -> dict:
    """Every method for one seed (its stand-in CLIP first, when there is one): each run's top-1 groups, folder and
    seconds, the seconds per method, the stand-in's pre-training seconds and the world's measurements."""
    runner = Runner(ctx, seed)
    runner.clip  # noqa: B018 (the seed's stand-in is pre-trained here, outside every method's seconds)
    runs, seconds = [], {}
    for name in methods:
        if bar is not None:
            bar.set_postfix(method=name, seed=seed)
        steps = METHODS[name].run(runner)
        evaluated = steps[-1][0]
        metrics = json.loads((Path(evaluated) / "metrics.json").read_text())
        took = sum(s for _, s in steps)
        seconds[name] = took
        runs.append({
            "method": name, "seed": seed, "seconds": round(took, 1), "folder": str(evaluated),
            "steps": [str(p) for p, _ in steps],
            "step_seconds": [round(t, 1) for _, t in steps],
            **group_top1(metrics),
            "per_class_top1": metrics["per_class"]["top1"],
        })  # fmt: skip
        if bar is not None:
            bar.update()
    return {
        "runs": runs,
        "seconds": seconds,
        "standin_seconds": round(runner.standin_seconds, 1) if ctx.pretrain is not None else None,
        "world": _world_row(runner) if ctx.world_root is not None else None,
    }


def _world_row(runner: Runner) -> dict:
    ctx = runner.ctx
    zero_shot = premise_predictions(runner.clip, ctx.world_root, ctx.args.test_file, ctx.train.class_names)
    row = measure_world_seed(runner, zero_shot)
    if ctx.args.new_classes > 0:
        row.update(measure_new_classes(runner, zero_shot))
    return row


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, data_args, corpus_args = parse_args((CompareArguments, DataArguments, CorpusArguments), argv)
    methods = _parse_methods(args.methods)
    if args.data not in ("world", "digits"):
        raise UsageError(f"--data must be 'world' or 'digits', got {args.data!r}.")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}.")
    if args.clip is not None:
        load_checked("--clip", CLIPConfig.from_pretrained, args.clip, tokenizer=True)
    out = Path(args.output_dir)
    _prepare_output_dir(out, args.overwrite_output_dir)
    start = time.time()
    ctx = build_context(args, data_args, corpus_args)
    if ctx.world_root is not None and not 0 <= args.new_classes <= len(ctx.train.class_names) - 2:
        raise UsageError(
            f"--new_classes must be between 0 and {len(ctx.train.class_names) - 2} (the number of classes minus two: "
            f"VL-LTR trains on the rest), got {args.new_classes}."
        )
    seeds = [args.first_seed + s for s in range(args.seeds)]
    print(ctx.note, flush=True)

    jobs = seed_jobs(args, ctx, len(seeds))
    runs, seconds, world_rows, standin_seconds = [], {m: [] for m in methods}, [], []
    with tqdm(total=len(seeds) * len(methods), desc="Comparing", unit="run") as bar:
        if jobs == 1:
            results = []
            for seed in seeds:
                results.append(run_seed(ctx, seed, methods, bar))
        else:
            # Each seed in its own process (spawned, so nothing of this process's thread pools is inherited), at
            # one intra-op thread each unless the CLIP is large: seeds are independent, and on a small stand-in
            # two single-threaded processes use two cores where one two-threaded process cannot.
            logger.warning(f"Running {len(seeds)} seeds {jobs} at a time, each in its own process (--jobs).")
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_seed_worker_init,
                                     initargs=(max(1, (os.cpu_count() or 1) // jobs),)) as pool:  # fmt: skip
                futures = [pool.submit(run_seed, ctx, seed, methods) for seed in seeds]
                for future in as_completed(futures):
                    future.result()
                    bar.update(len(methods))
                results = [f.result() for f in futures]
    for result in results:
        runs += result["runs"]
        for name in methods:
            seconds[name].append(result["seconds"][name])
        if result["standin_seconds"] is not None:
            standin_seconds.append(result["standin_seconds"])
        if result["world"] is not None:
            world_rows.append(result["world"])

    per_seed = {m: {g: [r[g] for r in runs if r["method"] == m] for g in TOP1_GROUPS} for m in methods}
    summary = {m: {g: _summary(per_seed[m][g]) for g in TOP1_GROUPS} for m in methods}
    claims = verdicts(summary, len(seeds))
    table = markdown_table(summary, seconds, seeds, claims, ctx.note)
    world = world_summary(world_rows) if world_rows else None
    if world is not None:
        table += "\n" + world_markdown(world, len(seeds))
    atomic_write_text(out / "table.md", table)
    plot_bars(summary, per_seed, out / "compare.png")
    counts = ctx.train.class_counts
    per_class = {
        m: np.nanmean(np.array([[np.nan if v is None else v for v in r["per_class_top1"]] for r in runs
                                if r["method"] == m], dtype=float), axis=0)
        for m in methods
    }  # fmt: skip
    plot_per_class_accuracy(per_class, counts, out / "per_class_accuracy.png", ctx.thresholds,
                            title="Per-class top-1 (mean over seeds) against training images")  # fmt: skip
    results = {
        "command": "python -m training.compare " + " ".join(argv),
        "seeds": seeds,
        "note": ctx.note,
        "clip": ctx.clip,
        "train_counts": dict(zip(ctx.train.class_names, counts.tolist())),
        "thresholds": {"many": ctx.thresholds.many, "few": ctx.thresholds.few},
        "paper_source": PAPER_SOURCE,
        "rule": RULE,
        "methods": {
            m: {
                "label": METHODS[m].label.strip(),
                "description": METHODS[m].description,
                "paper_top1": METHODS[m].paper_top1,
                **{
                    g: {"mean": summary[m][g][0], "std": summary[m][g][1], "per_seed": per_seed[m][g]}
                    for g in TOP1_GROUPS
                },
                "seconds_mean": float(np.mean(seconds[m])),
            }
            for m in methods
        },  # fmt: skip
        "claims": claims,
        "shared_by_the_seeds": "the data" + ("" if ctx.pretrain is not None else " and the starting CLIP (--clip)"),
        "standin_clip_seconds": standin_seconds,
        "world": world,
        "world_per_seed": world_rows,
        "runs": runs,
        "total_seconds": round(time.time() - start, 1),
    }
    write_metrics_json(out / "results.json", results)  # NaN (a shot group without classes) becomes null
    print("\n" + table)
    print(f"Wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'compare.png'} and "
          f"{out / 'per_class_accuracy.png'} in {results['total_seconds']:.0f} s.")  # fmt: skip
    return results


if __name__ == "__main__":
    run_main(main, "training.compare")

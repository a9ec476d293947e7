"""The whole VL-LTR pipeline on real long-tailed images, on a laptop, with no downloads, against the baselines a
practitioner would otherwise use.

    python -m training.demo --output_dir demo_output                 # what `make demo` runs (the embedded world)
    python -m training.demo --output_dir demo_digits --data digits   # the long-tailed handwritten digits
    python -m training.demo --output_dir demo_vitb --clip openai/clip-vit-base-patch16   # with a real CLIP

1. A long-tailed dataset, written as image files, split lists, class names and a JSON text corpus (the formats a
   user brings), with a class-balanced test split, a small balanced selection split for anchor selection, an
   exponentially long-tailed training split and a disjoint pool: by default the embedded world of `training.world`
   (made-up class names that say nothing, descriptions that name the attributes, docs/world.md); with `--data
   digits`, scikit-learn's handwritten digits (1,797 real 8×8 scans shipped with the package).
2. A stand-in for a pretrained CLIP (the Hub is unreachable here): a small `CLIPModel` pre-trained CLIP-style on
   image-caption pairs from the pool and saved as a normal CLIP folder. `--clip NAME` uses that CLIP instead; every
   later step is the same code.
3. Stage 1, anchor selection, stage 2 and evaluation through the entry points of the CLI scripts.
4. Baselines and peers on the same splits: zero-shot CLIP with the 80 class prompts, CLIP fine-tuned with a plain
   linear classifier and cross-entropy, the LIFT-style peer (`run_lift`: AdaptFormer image tower, cosine head,
   logit-adjusted loss, 10% of VL-LTR's epochs), and VL-LTR with LoRA adapters in both stages (`--peft lora`).
5. One table (overall / many / medium / few top-1 and the seconds each method took), on the world its premise and
   how visual the kept and the attended anchors are (`training.world_measures`), `results.json`,
   `per_class_accuracy.png`, the anchor report and the final checkpoint with its model card; then the stock
   `pipeline("image-classification")` on a few test images.
"""

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, CLIPModel, pipeline
from transformers.utils import logging
from transformers.utils.logging import tqdm

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification, VLLTRModel

from . import run_cvlp, run_eval, run_lgr, run_lift, run_select_anchors
from .arguments import CorpusArguments, DataArguments
from .cli import UsageError, load_new_head, run_main
from .corpus import load_corpus
from .data import ProcessorTransform, eval_image_processor, train_transform
from .embedding import embed_images, embed_texts
from .io_utils import atomic_write_json, atomic_write_text
from .metrics import TOP1_GROUPS, ShotThresholds, group_top1, long_tail_metrics, plot_per_class_accuracy
from .splits import ImageDataset, load_labelled_split, read_image_list
from .standin_clip import build_char_tokenizer, contrastive_step, save_clip_folder, small_clip_config
from .threads import configure_threads, use_one_thread
from .world import WorldArguments, build_world, pretrain_world_clip
from .world_measures import anchor_shares, explanation_visual_share, load_world, pct, premise

logger = logging.get_logger(__name__)

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# A few sentences on the shape of each digit: the "class descriptions" a user would bring (e.g. from Wikipedia).
DESCRIPTIONS = {
    "zero": ["A zero is one closed oval loop.", "A zero is a tall ring with a hole in the middle.",
             "A zero has no straight strokes at all."],
    "one": ["A one is a single vertical stroke.", "A one is a thin straight line.",
            "A one may have a short flag at its top."],
    "two": ["A two has a curved top and a flat base.", "A two bends right, then runs down to the left.",
            "A two ends in a horizontal stroke at the bottom."],
    "three": ["A three has two bumps open to the left.", "A three looks like two stacked curves.",
              "A three has no closed loop."],
    "four": ["A four has a vertical stroke and a crossbar.", "A four has a diagonal meeting the crossbar.",
             "A four is made of straight lines."],
    "five": ["A five has a flat top stroke and a round belly.", "A five has a short vertical line at the top left.",
             "A five's lower half curves like a hook."],
    "six": ["A six has a closed loop at the bottom.", "A six has a curved stroke rising to the top.",
            "A six looks like a nine turned upside down."],
    "seven": ["A seven has a flat top bar.", "A seven has a long diagonal going down to the left.",
              "A seven has no loop and no curve."],
    "eight": ["An eight has two stacked loops.", "An eight looks like a snowman.",
              "An eight crosses itself in the middle."],
    "nine": ["A nine has a closed loop at the top.", "A nine has a tail going straight down.",
             "A nine looks like a six turned upside down."],
}  # fmt: skip
CAPTIONS = ["a photo of the digit {name}.", "a handwritten {name}.", "the number {digit} written by hand.",
            "a scan of a handwritten {digit}.", "a small picture of a {name}.", "the digit {digit}."]  # fmt: skip

MAX_PER_CLASS, IMBALANCE, TEST_PER_CLASS, SELECTION_PER_CLASS = 100, 20, 25, 10
THRESHOLDS = ShotThresholds(many=50, few=15)  # the standard 100 / 20 scaled to a 100-image head class


# ----------------------------------------------------------------------------------------------------------------------
# 1. The long-tailed digits
# ----------------------------------------------------------------------------------------------------------------------


def build_digits(root: Path, seed: int) -> dict:
    """Writes the splits as 32×32 PNG scans with list files, class names and a JSON corpus. The training split has
    an exponential profile n_c = 100·20^(−r/9) over a seeded order of the classes (imbalance ratio 20)."""
    from sklearn.datasets import load_digits  # scikit-learn is the demo's own extra (`pip install .[demo]`)

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(10)  # which digit is the head class, which the tail
    counts = {int(c): round(MAX_PER_CLASS * IMBALANCE ** (-r / 9)) for r, c in enumerate(order)}
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": [], "pool": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        sizes = {"test": TEST_PER_CLASS, "val": SELECTION_PER_CLASS, "train": counts[c]}
        parts = {"test": idx[:25], "val": idx[25:35], "train": idx[35 : 35 + counts[c]], "pool": idx[35 + counts[c] :]}
        assert sum(sizes.values()) <= len(idx), "not enough scans"
        for split, indices in parts.items():
            for i in indices:
                rel = f"images/{i:04d}.png"
                scan = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                Image.fromarray(scan, mode="L").resize((32, 32), Image.BILINEAR).save(root / rel)
                splits[split].append((rel, c))
    paths = {"root": str(root)}
    for split, rows in splits.items():
        rows.sort()
        paths[split] = str(root / f"{split}.txt")
        atomic_write_text(paths[split], "".join(f"{rel} {c}\n" for rel, c in rows))
    paths["classes"] = str(root / "classes.txt")
    atomic_write_text(paths["classes"], "\n".join(CLASS_NAMES) + "\n")
    paths["corpus"] = str(root / "corpus.json")
    atomic_write_json(paths["corpus"], DESCRIPTIONS)
    paths["train_counts"] = [counts[c] for c in range(10)]
    paths["class_names"] = list(CLASS_NAMES)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# 2. The stand-in for a pretrained CLIP
# ----------------------------------------------------------------------------------------------------------------------


def pretrain_standin_clip(data: dict, out: Path, seed: int, epochs: int = 40, batch_size: int = 64) -> str:
    """CLIP-style contrastive pre-training of a small CLIPModel on (pool image, caption) pairs; saved as a CLIP
    folder (weights, tokenizer, image processor)."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    model = CLIPModel(small_clip_config(image_size=32, patch_size=4, width=64, layers=3, heads=4, projection_dim=64))
    configure_threads(model.config)
    pool = load_labelled_split(DataArguments(image_root=data["root"]), data["pool"], None, "pool", CLASS_NAMES)
    # Light crops only, drawn by torchvision: the stand-in is not part of VL-LTR, and its contrastive start sits on
    # a plateau (loss ln(batch)) it leaves only after a few hundred steps; with timm's crops (the VL-LTR default since
    # the reference augmentation) seed 0 never left it and the stand-in stayed at chance.
    transform = train_transform(
        32, crop_scale=(0.6, 1.0), hflip=0.0, rand_augment=False, random_erasing=0.0, augmentation="torchvision"
    )
    dataset = pool.dataset(transform)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(dataset) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    with tqdm(total=steps, desc="Stand-in CLIP pre-training", unit="step") as bar:
        for _ in range(epochs):
            order = rng.permutation(len(dataset))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                rows = order[start : start + batch_size]
                items = [dataset[(int(i), int(rng.integers(2**62)))] for i in rows]
                captions = [
                    CAPTIONS[rng.integers(len(CAPTIONS))].format(name=CLASS_NAMES[x["labels"]], digit=x["labels"])
                    for x in items
                ]
                text = tokenizer(captions, padding=True, return_tensors="pt")
                pixels = torch.stack([x["pixel_values"] for x in items])
                contrastive_step(model, optimizer, schedule, bar, pixel_values=pixels, **text)
    save_clip_folder(model.eval(), tokenizer, out)
    return str(out)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Baselines
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def zero_shot_logits(clip_path: str, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot CLIP: each class is the normalised mean embedding of its 80 prompts (CLIP's prompt ensembling)."""
    model = VLLTRModel.from_pretrained(clip_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    names = data["class_names"]
    corpus, tokens = load_corpus(
        CorpusArguments(text_corpus="templates"), names, tokenizer, model.config.clip_config.text_config
    )
    text = F.normalize(embed_texts(model, tokens, desc="Zero-shot prompts"), dim=-1)
    labels = torch.as_tensor(corpus.labels)
    classes = F.normalize(torch.stack([text[labels == c].mean(0) for c in range(len(names))]), dim=-1)
    processor = eval_image_processor(model.config.clip_config.vision_config.image_size)
    split = load_labelled_split(DataArguments(image_root=data["root"]), data["test"], None, "test", class_names=names)
    test = split.dataset(ProcessorTransform(processor))
    image = F.normalize(embed_images(model, test, desc="Zero-shot images"), dim=-1)
    logits = model.clip.logit_scale.exp() * image @ classes.T
    return logits.numpy(), test.labels


# ----------------------------------------------------------------------------------------------------------------------
# The datasets, and what the world lets one measure
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A dataset of the demo and the schedules that keep `make demo` within about 6 minutes on 2 CPU cores."""

    title: str
    short: str
    thresholds: ShotThresholds
    test_per_class: int
    stage1_epochs: float
    stage2_epochs: float
    linear_epochs: float
    lift_epochs: float
    pretrain: Callable


SETTINGS = {
    # the world's training split is ~2,600 images (200 down to 2 over 60 classes), six times the digits': fewer epochs
    "world": Setting("The embedded world (training.world): made-up class names, descriptions that name attributes",
                     "Embedded world", ShotThresholds(), 30, 4, 6, 4, 1, pretrain_world_clip),
    "digits": Setting("Long-tailed digits from scikit-learn's load_digits (real 8×8 scans)", "Long-tailed digits",
                      THRESHOLDS, TEST_PER_CLASS, 30, 50, 30, 8, pretrain_standin_clip),
}  # fmt: skip


def build_data(kind: str, root: Path, seed: int) -> dict:
    """The demo's dataset under `root`: the world with its default arguments, or the digits; seeded."""
    if kind == "world":
        return build_world(WorldArguments(output_dir=str(root), seed=seed))
    return build_digits(root, seed)


def world_measurements(clip: str, data: dict, out: Path, final: Path, common: list[str], linear: dict) -> dict:
    """The world's premise (zero-shot by name and by visual descriptions; the linear baseline's few- against
    many-shot top-1, from its `group_top1` row `linear`), the visual share of the anchors AnSS, Random and Cut Off
    keep from the same stage-1 model (beside the corpus's), and of each test image's top-3 attended anchors in the
    final VL-LTR checkpoint."""
    world = load_world(data["root"])
    names = data["class_names"]
    measured = {"premise": premise(clip, data["root"], data["test"], names)}
    measured["premise"]["linear_many_top1"], measured["premise"]["linear_few_top1"] = linear["many"], linear["few"]
    folders = {"anss": out / "anchors"}
    for strategy in ("random", "cutoff"):
        folders[strategy] = out / f"anchors_{strategy}"
        run_select_anchors.main(
            ["--model_name_or_path", str(out / "stage1"), "--selection_file", data["val"], "--text_corpus",
             data["corpus"], "--num_anchor_sentences", "16", "--anchor_selection", strategy, "--output_dir",
             str(folders[strategy]), *common]
        )  # fmt: skip
    measured["anchor_visual_share"] = anchor_shares(folders, names, data["corpus"], world["visual_of"])
    model = VLLTRForImageClassification.from_pretrained(final).eval()
    processor = eval_image_processor(model.config.clip_config.vision_config.image_size)
    test = ImageDataset(read_image_list(data["test"], data["root"]), ProcessorTransform(processor))
    measured["explanations"] = explanation_visual_share(model, test, world["visual_of"], top_k=3)
    return measured


def world_table(m: dict) -> str:
    """The world measurements as Markdown (top-1 and shares in %)."""
    p, a, e = m["premise"], m["anchor_visual_share"], m["explanations"]
    return "\n".join([
        "| premise | top-1 (%) |", "|---|---|",
        f"| chance | {pct(p['chance'])} |",
        f"| zero-shot by class name (80 templates) | {pct(p['zero_shot_by_name_top1'])} |",
        f"| zero-shot by averaged visual descriptions | {pct(p['zero_shot_by_visual_descriptions_top1'])} |",
        f"| zero-shot by averaged descriptions (all) | {pct(p['zero_shot_by_all_descriptions_top1'])} |",
        f"| linear baseline, many-shot classes | {pct(p['linear_many_top1'])} |",
        f"| linear baseline, few-shot classes | {pct(p['linear_few_top1'])} |",
        "", "| visual sentences among | share (%) |", "|---|---|",
        f"| the descriptions | {pct(a['corpus_descriptions'])} |",
        f"| the candidates (80 templates + descriptions) | {pct(a['corpus_candidates'])} |",
        f"| anchors kept by AnSS | {pct(a['anss'])} |",
        f"| anchors kept by Random | {pct(a['random'])} |",
        f"| anchors kept by Cut Off | {pct(a['cutoff'])} |",
        f"| each test image's top-{e['top_k']} attended anchors (VL-LTR) | {pct(e['visual_share_top_anchors'])} |",
        f"| the same, correctly classified images | {pct(e['visual_share_top_anchors_correct'])} |",
    ])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------------


def _banner(step: str, text: str) -> None:
    print(f"\n=== [{step}] {text} ===", flush=True)


def _check_output_dir(out: Path, manifest: dict, overwrite: bool) -> None:
    """An output folder may hold an earlier run of this same demo (same arguments), which is replaced; anything else
    is refused unless --overwrite_output_dir."""
    if not out.exists() or not any(out.iterdir()):
        return
    previous = out / "demo_manifest.json"
    same = previous.is_file() and json.loads(previous.read_text()) == manifest
    if not same and not overwrite:
        held = "a different demo run" if previous.is_file() else "files that are not a demo run"
        raise UsageError(
            f"--output_dir {out} already holds {held}; pass --overwrite_output_dir to replace it or choose another "
            f"folder."
        )
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _row(metrics: dict, seconds: float) -> dict:
    return {**group_top1(metrics), "seconds": seconds}


def _table(rows: dict[str, dict]) -> str:
    def pct(v):
        return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"

    lines = ["| method | overall | many | medium | few | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(pct(r[k]) for k in TOP1_GROUPS)
              + f" | {r['seconds']:.0f} |" for name, r in rows.items()]  # fmt: skip
    return "\n".join(lines)


@contextmanager
def _timed(seconds: dict[str, float], name: str):
    """Adds the wall time of the block to `seconds[name]` (a method's runs may be split over several blocks)."""
    start = time.time()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.time() - start


def _vlltr_stages(data_name: str, clip: str, data: dict, out: Path, tag: str, final: Path, peft: list[str],
                  augment: list[str], common: list[str]) -> None:  # fmt: skip
    """Stage 1, AnSS, stage 2: the demo's VL-LTR (`peft` empty) or VL-LTR with LoRA in both stages."""
    setting = SETTINGS[data_name]
    run_cvlp.main(
        ["--model_name_or_path", clip, "--train_file", data["train"], "--text_corpus", data["corpus"],
         "--output_dir", str(out / f"{tag}stage1"), "--num_train_epochs", str(setting.stage1_epochs),
         "--per_device_train_batch_size", "64", "--learning_rate", "5e-4", *peft, *augment, *common]
    )  # fmt: skip
    run_select_anchors.main(
        ["--model_name_or_path", str(out / f"{tag}stage1"), "--selection_file", data["val"], "--text_corpus",
         data["corpus"], "--num_anchor_sentences", "16", "--output_dir", str(out / f"{tag}anchors"), *common]
    )  # fmt: skip
    run_lgr.main(
        ["--model_name_or_path", str(out / f"{tag}anchors"), "--train_file", data["train"], "--output_dir",
         str(final), "--num_train_epochs", str(setting.stage2_epochs), "--per_device_train_batch_size", "64",
         "--learning_rate", "3e-3", *peft, *augment, *common]
    )  # fmt: skip


def _linear_and_lora(data_name: str, clip: str, data: dict, out: Path, augment: list[str], common: list[str],
                     evaluate: list[str], seed: int) -> tuple[dict, dict, dict[str, float]]:  # fmt: skip
    """The two baselines that need no result of VL-LTR's: CLIP fine-tuned with a plain linear classifier and
    cross-entropy, and VL-LTR with LoRA adapters in both stages; returns their metrics and seconds. The demo runs
    them in a second process beside VL-LTR when the CLIP is its small stand-in."""
    setting, seconds = SETTINGS[data_name], {}
    # vision tower + linear head, no mixing, no smoothing, instance-balanced sampling, the stage-2 trainer (FC head)
    with _timed(seconds, "linear"):
        torch.manual_seed(seed)  # the new head's initialisation, the same in this process or a second one
        linear_start = out / "baseline_linear_init"
        config = VLLTRConfig.from_pretrained(clip, id2label=dict(enumerate(data["class_names"])), head_type="fc")
        load_new_head(VLLTRForImageClassification.from_pretrained, clip, config=config).save_pretrained(linear_start)
        run_lgr.main(
            ["--model_name_or_path", str(linear_start), "--train_file", data["train"], "--output_dir",
             str(out / "baseline_linear"), "--num_train_epochs", str(setting.linear_epochs),
             "--per_device_train_batch_size", "64", "--learning_rate", "5e-4", "--train_vision_tower", "True",
             "--sampling", "instance", "--mixup_alpha", "0", "--cutmix_alpha", "0", "--label_smoothing", "0",
             *augment, *common]
        )  # fmt: skip
        linear = run_eval.main(
            ["--model_name_or_path", str(out / "baseline_linear"), "--output_dir", str(out / "eval_linear"),
             *evaluate]
        )  # fmt: skip
    # VL-LTR with LoRA adapters in both stages (the text and image towers in stage 1, the image tower in stage 2),
    # the same schedules and anchors count as VL-LTR.
    with _timed(seconds, "vlltr_lora"):
        _vlltr_stages(data_name, clip, data, out, "lora_", out / "vlltr-lora", ["--peft", "lora"], augment, common)
        lora = run_eval.main(
            ["--model_name_or_path", str(out / "vlltr-lora"), "--output_dir", str(out / "eval_lora"), *evaluate]
        )
    return linear, lora, seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument(
        "--data",
        choices=list(SETTINGS),
        default="world",
        help="The embedded world (training.world, the default) or the long-tailed digits.",
    )
    parser.add_argument("--clip", default=None, help="A CLIP checkpoint (Hub name or folder) instead of the stand-in.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--push_to_hub", action="store_true", help="Publish the final checkpoint (with its card).")
    parser.add_argument("--hub_model_id", default=None)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id org/name (the repository to create or update).")
    if args.clip is not None:
        try:  # fail now, not after building the data
            VLLTRConfig.from_pretrained(args.clip)
        except (OSError, ValueError) as e:
            raise UsageError(f"--clip {args.clip}: {str(e).strip().splitlines()[0]}") from None
    out = Path(args.output_dir)
    setting = SETTINGS[args.data]
    manifest = {"demo": f"vlltr {args.data}-lt", "seed": args.seed, "clip": args.clip}
    _check_output_dir(out, manifest, args.overwrite_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo_manifest.json", manifest)
    torch.manual_seed(args.seed)
    timings, start = {}, time.time()

    _banner("1/6", setting.title)
    data = build_data(args.data, out / "data", args.seed)
    names, thresholds_ = data["class_names"], setting.thresholds
    counts = np.array(data["train_counts"])
    groups = thresholds_.group_of(counts)
    print(f"{len(names)} classes, training images per class {counts.max()} down to {counts.min()} (imbalance "
          f"{counts.max() // counts.min()}:1)")  # fmt: skip
    print(f"shot groups (many > {thresholds_.many}, few < {thresholds_.few}): "
          + ", ".join(f"{g}: {int((groups == g).sum())} classes" for g in ("many", "medium", "few")))  # fmt: skip
    timings["data"] = time.time() - start

    _banner("2/6", "CLIP" + (f": {args.clip}" if args.clip else ": stand-in, pre-trained on the disjoint pool"))
    clip = args.clip or setting.pretrain(data, out / "standin_clip", args.seed)
    timings["clip"] = time.time() - start - sum(timings.values())

    fast = ["--seed", str(args.seed), "--report_to", "none", "--logging_steps", "20", "--save_strategy", "no",
            "--dataloader_num_workers", "0", "--image_check", "full"]  # fmt: skip
    augment = ["--hflip", "0", "--crop_scale_min", "0.6", "--rand_augment", "False", "--random_erasing", "0"]
    common = ["--image_root", data["root"], "--class_names", data["classes"], *fast]

    _banner("3/6", "VL-LTR stage 1, anchor selection, stage 2 (the run_* entry points)")
    seconds: dict[str, float] = {}  # per method, its own runs

    thresholds = ["--many_shot_threshold", str(thresholds_.many), "--few_shot_threshold", str(thresholds_.few)]
    evaluate = ["--test_file", data["test"], "--train_file", data["train"], *thresholds, *common]
    side, side_pool = None, None
    if args.clip is None and (os.cpu_count() or 1) > 1:
        # The stand-in is small and runs on one thread: the baselines that need nothing of VL-LTR's train in a
        # second process (spawned: nothing of this one's thread pools is inherited) on the other core meanwhile.
        print("(the linear baseline and VL-LTR with LoRA train meanwhile in a second process)")
        use_one_thread()  # two processes on the cores: each on one thread, or each is the other's busy neighbour
        side_pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=use_one_thread
        )
        side = side_pool.submit(_linear_and_lora, args.data, clip, data, out, augment, common, evaluate, args.seed)
    try:
        final = out / f"vlltr-{args.data}-lt"
        with _timed(seconds, "vlltr"):
            _vlltr_stages(args.data, clip, data, out, "", final, [], augment, common)
        timings["vlltr"] = time.time() - start - sum(timings.values())

        _banner("4/6", "Evaluation and baselines on the same splits")
        hub = ["--push_to_hub", "--hub_model_id", args.hub_model_id] if args.push_to_hub else []
        with _timed(seconds, "vlltr"):
            vlltr = run_eval.main(
                ["--model_name_or_path", str(final), "--output_dir", str(out / "eval"), "--dataset_tag", f"{args.data}-lt",
                 "--explain", "8", *evaluate, *hub]
            )  # fmt: skip

        with _timed(seconds, "zero_shot"):
            zs_logits, zs_labels = zero_shot_logits(clip, data)
            zero_shot = long_tail_metrics(zs_logits, zs_labels, counts, thresholds_)
        # The LIFT-style peer with its defaults (AdaptFormer in every layer, cosine head from "a photo of a {}.",
        # logit-adjusted CE τ 1, SGD 0.01): 10% of the demo's VL-LTR epochs (stage 1 + stage 2), as LIFT's 10 are of
        # the paper's 100.
        with _timed(seconds, "lift"):
            run_lift.main(
                ["--model_name_or_path", clip, "--train_file", data["train"], "--output_dir", str(out / "lift"),
                 "--num_train_epochs", str(setting.lift_epochs), "--per_device_train_batch_size", "64", *augment,
                 *common]
            )  # fmt: skip
            lift = run_eval.main(
                ["--model_name_or_path", str(out / "lift"), "--output_dir", str(out / "eval_lift"), *evaluate]
            )
        if side is not None:
            linear, vlltr_lora, side_seconds = side.result()
            side_pool.shutdown()
    except BaseException:
        if side_pool is not None:  # stop the second process too: the run has failed
            for process in list(getattr(side_pool, "_processes", {}).values()):
                process.terminate()
            side_pool.shutdown(wait=False, cancel_futures=True)
        raise
    if side is None:
        linear, vlltr_lora, side_seconds = _linear_and_lora(
            args.data, clip, data, out, augment, common, evaluate, args.seed
        )
    seconds.update(side_seconds)
    timings["baselines_and_peers"] = time.time() - start - sum(timings.values())

    _banner("5/6", "Results")
    rows = {
        "Zero-shot CLIP (80 prompts)": _row(zero_shot, seconds["zero_shot"]),
        "CLIP + linear classifier, CE": _row(linear, seconds["linear"]),
        "LIFT (AdaptFormer, cosine head, LA)": _row(lift, seconds["lift"]),
        "VL-LTR": _row(vlltr, seconds["vlltr"]),
        "VL-LTR with LoRA adapters": _row(vlltr_lora, seconds["vlltr_lora"]),
    }
    per_class = {
        "Zero-shot CLIP": np.asarray(zero_shot["per_class_top1"], dtype=float),
        "CLIP + linear, CE": np.asarray(linear["per_class"]["top1"], dtype=float),
        "LIFT-style": np.asarray(lift["per_class"]["top1"], dtype=float),
        "VL-LTR": np.asarray(vlltr["per_class"]["top1"], dtype=float),
        "VL-LTR + LoRA": np.asarray(vlltr_lora["per_class"]["top1"], dtype=float),
    }
    table = _table(rows)
    print(table)
    print(f"(one run, seed {args.seed}; seconds: each method's own runs, the stand-in CLIP excluded; `make compare` "
          "gives the mean ± std over seeds, beside the paper's ablation)")  # fmt: skip
    print(f"VL-LTR branches alone, overall top-1: image {100 * vlltr['image_top1']:.1f}, "
          f"text {100 * vlltr['text_top1']:.1f}")  # fmt: skip
    plot_per_class_accuracy(per_class, counts, out / "per_class_accuracy.png", thresholds_,
                            title=f"{setting.short}: per-class top-1 against training images")  # fmt: skip
    measured = {}
    if args.data == "world":
        _banner("5/6", "The world's premise and how visual the anchors are (visual_sentences.json, for measurement)")
        measured = world_measurements(clip, data, out, final, common, _row(linear, 0))
        print(world_table(measured))
    shutil.copy(out / "anchors" / "anchor_report.md", out / "anchor_report.md")
    timings["total"] = time.time() - start
    results = {
        "command": "python -m training.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "clip": args.clip or "stand-in (pre-trained by the demo)",
        "data": args.data,
        "train_counts": dict(zip(names, counts.tolist())),
        "thresholds": {"many": thresholds_.many, "few": thresholds_.few, "inclusive": thresholds_.inclusive},
        "test_images": int(len(zs_labels)),
        "methods": {name: row for name, row in rows.items()},
        "vlltr_branches": {"image_top1": vlltr["image_top1"], "text_top1": vlltr["text_top1"]},
        "per_class_top1": {name: values.tolist() for name, values in per_class.items()},
        "table_markdown": table,
        **({"world": measured, "world_table_markdown": world_table(measured)} if measured else {}),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n" + (f"\n{world_table(measured)}\n" if measured else ""))

    _banner("6/6", f"pipeline('image-classification') on the final checkpoint {final}")
    classifier = pipeline("image-classification", model=str(final), device="cpu")
    test_rows = [line.split() for line in Path(data["test"]).read_text().splitlines()][:: setting.test_per_class * 2][
        :5
    ]
    for rel, label in test_rows:
        predictions = classifier(str(Path(data["root"]) / rel), top_k=3)
        shown = ", ".join(f"{p['label']} {p['score']:.2f}" for p in predictions)
        print(f"{rel} (a {names[int(label)]}): {shown}")
    print(f"Why these classes? {out / 'eval' / 'explanations.md'} and {out / 'eval' / 'explanations.png'}: the "
          "anchor sentences a few correct and wrong predictions attended to.")  # fmt: skip
    print(f"\nWrote {out / 'results.md'}, {out / 'results.json'}, {out / 'per_class_accuracy.png'}, "
          f"{out / 'anchor_report.md'} and the checkpoint {final} (model card: {final / 'README.md'}) in {timings['total']:.0f} s.")  # fmt: skip
    return results


if __name__ == "__main__":
    run_main(main, "training.demo")

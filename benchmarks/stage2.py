"""Stage-2 (LGR) training step with the vision tower frozen (ImageNet-LT / Places-LT recipe): our
`VLLTRForImageClassification` forward with mixed soft labels + backward, the model frozen by `LGRTrainer` and the
loss from `LGRTrainer.compute_loss`, against the floor: a linear classifier on the same frozen tower (tower forward
under no_grad + Linear + cross-entropy on the same soft labels + backward).

    python -m benchmarks.stage2
"""

import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from training.lgr_config import LGRConfig
from training.lgr_trainer import LGRTrainer

from . import common
from .inference import build_classifier


def mixed_labels(batch: int, num_classes: int, smoothing: float = 0.1, lam: float = 0.7) -> torch.Tensor:
    """Soft targets as the Mixup collator makes them: λ·y + (1 − λ)·y_flipped of label-smoothed one-hot rows."""
    labels = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(2))
    off = smoothing / num_classes
    one_hot = torch.full((batch, num_classes), off).scatter_(1, labels[:, None], 1.0 - smoothing + off)
    return lam * one_hot + (1.0 - lam) * one_hot.flip(0)  # (B, C)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    device = common.setup(args)
    num_classes = args.num_classes

    model = build_classifier(num_classes, device)
    with tempfile.TemporaryDirectory() as output_dir:
        config = LGRConfig(output_dir=output_dir, use_cpu=device.type == "cpu", report_to="none", disable_tqdm=True)
        trainer = LGRTrainer(model=model, args=config)  # freezes the towers and logit_scale as in a real run
    model = trainer.model
    model.train()  # as Trainer.training_step does; a frozen tower builds no graph
    pixels = common.random_pixels(args.batch, device)
    labels = mixed_labels(args.batch, num_classes).to(device)
    inputs = {"pixel_values": pixels, "labels": labels}
    trainable = [q for q in model.parameters() if q.requires_grad]

    classifier = nn.Linear(common.PROJECTION_DIM, num_classes).to(device)  # the floor's head

    def ours():
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        return loss.detach()

    def floor():
        with torch.no_grad():
            image_embeds = model.clip.get_image_features(pixel_values=pixels).pooler_output  # (B, D)
        loss = F.cross_entropy(classifier(image_embeds), labels)
        loss.backward()
        return loss.detach()

    def reset_ours():
        model.zero_grad(set_to_none=True)  # the optimizer's zero_grad: the step allocates the gradients

    ours_side = common.Side(ours, reset_ours)
    floor_side = common.Side(floor, lambda: classifier.zero_grad(set_to_none=True))
    timings = common.time_sides(args, ours_side, floor_side, device)
    ours_peak = common.peak_memory_mb(ours_side, device)
    floor_peak = common.peak_memory_mb(floor_side, device)

    branch = model.text_branch
    cache = (branch.anchor_mean, branch.anchor_inv_std, branch.anchor_gram, branch.anchor_mask_bias)
    resident = {
        "clip_vision": common.tensors_mb(model.clip.vision_model, model.clip.visual_projection),
        "clip_text_unused": common.tensors_mb(model.clip.text_model, model.clip.text_projection),
        "ours_head": common.tensors_mb(model.image_branch, *model.text_branch.parameters()),
        "ours_anchors_and_mask": common.tensors_mb(model.anchor_text_embeds, model.anchor_mask),
        "ours_anchor_statistics_cache": common.tensors_mb(*cache),
        "floor_head": common.tensors_mb(classifier),
    }
    common.emit(
        "stage-2 step, frozen tower",
        timings,
        1.10,
        ours_peak,
        floor_peak,
        1.10,
        batch=args.batch,
        note=(
            f"ImageNet-LT size: C = {num_classes}, M = {common.NUM_ANCHORS}, ViT-B/16 at 224 px, random weights. "
            "Ours: LGRTrainer.compute_loss (VLLTRForImageClassification forward with Mixup/label-smoothed soft "
            "targets, L_rec = CE(P_I) + CE(P_T)) + backward, tower, text tower and logit_scale frozen by LGRTrainer; "
            f"{sum(q.numel() for q in trainable):,} trainable parameters (MLP and anchor attention). Floor: "
            "get_image_features under no_grad + nn.Linear(512, C) + F.cross_entropy on the same soft targets + "
            "backward. No optimizer step on either side; gradients are set to None before each step, so their "
            "allocation counts in the peak. B = 16 as in the inference cases."
        ),
        device=device,
        num_classes=num_classes,
        resident_mb=resident,
    )


if __name__ == "__main__":
    main()

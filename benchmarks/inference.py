"""Inference: `VLLTRForImageClassification` forward (eval, no_grad) against the CLIP vision tower + projection
(`CLIPModel.get_image_features`) of the same model, at ImageNet-LT (C = 1000) or iNaturalist (C = 8142) size.

    python -m benchmarks.inference --num-classes 1000
    python -m benchmarks.inference --num-classes 8142
"""

import torch

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification

from . import common

BOUNDS = {1000: (1.05, 1.10), 8142: (1.15, 1.25)}  # (time, memory) bounds of the issue


def build_classifier(num_classes: int, device) -> VLLTRForImageClassification:
    config = VLLTRConfig(
        clip_config=common.vit_b16_clip_config(),
        id2label={i: f"class_{i}" for i in range(num_classes)},
        num_anchor_sentences=common.NUM_ANCHORS,
    )
    model = VLLTRForImageClassification(config)
    generator = torch.Generator().manual_seed(1)
    anchors = torch.randn(num_classes, common.NUM_ANCHORS, common.PROJECTION_DIM, generator=generator)  # V (C, M, D)
    mask = torch.ones(num_classes, common.NUM_ANCHORS, dtype=torch.bool)
    mask[::7, 48:] = False  # some classes with fewer than M sentences, so the padding path runs
    model.set_anchor_embeddings(anchors, mask)
    del anchors
    return model.to(device)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    device = common.setup(args)
    num_classes = args.num_classes
    time_bound, memory_bound = BOUNDS.get(num_classes, (1.15, 1.25))

    model = build_classifier(num_classes, device).eval()
    pixels = common.random_pixels(args.batch, device)

    @torch.no_grad()
    def ours():
        return model(pixel_values=pixels).logits

    @torch.no_grad()
    def floor():
        return model.clip.get_image_features(pixel_values=pixels).pooler_output

    ours_side, floor_side = common.Side(ours), common.Side(floor)
    timings = common.time_sides(args, ours_side, floor_side, device)
    ours_peak = common.peak_memory_mb(ours_side, device)
    floor_peak = common.peak_memory_mb(floor_side, device)

    text_branch = model.text_branch
    cache = (
        text_branch.anchor_mean,
        text_branch.anchor_inv_std,
        text_branch.anchor_gram,
        text_branch.anchor_mask_bias,
    )
    resident = {
        "clip_vision": common.tensors_mb(model.clip.vision_model, model.clip.visual_projection),
        "clip_text_unused": common.tensors_mb(model.clip.text_model, model.clip.text_projection),
        "head": common.tensors_mb(model.image_branch, *model.text_branch.parameters()),
        "anchors_and_mask": common.tensors_mb(model.anchor_text_embeds, model.anchor_mask),
        "anchor_statistics_cache": common.tensors_mb(*cache),
    }
    common.emit(
        f"inference, C = {num_classes}",
        timings,
        time_bound,
        ours_peak,
        floor_peak,
        memory_bound,
        batch=args.batch,
        note=(
            f"ViT-B/16 at 224 px, random weights, M = {common.NUM_ANCHORS} anchors, eval + no_grad. Ours: "
            "VLLTRForImageClassification(pixel_values).logits (tower, P_I, P_T, fusion); floor: "
            "model.clip.get_image_features on the same weights and pixels. B = 16 keeps a step near 5.5 s on one "
            "core; the head's cost per image falls with B (V is read once per batch). Peak = tensor memory "
            "allocated during one step above what was resident (model, anchors and the anchor-statistics cache, "
            "filled in warm-up; see resident_mb)."
        ),
        device=device,
        num_classes=num_classes,
        resident_mb=resident,
    )


if __name__ == "__main__":
    main()

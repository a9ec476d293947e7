"""Anchor selection (AnSS): scoring a corpus of N sentences through `training.anchors.embed_and_select_anchors`
(strategy "anss": embed every sentence with the stage-1 text tower, score its L_lin against the selection images,
keep the M lowest per class), against the floor: one text-tower pass over the same N sentences
(`CLIPModel.get_text_features`, same batches, outputs discarded). Time at N; peak memory at N and 10·N.

    python -m benchmarks.anchor_selection --sentences 1000
"""

import torch

from modeling_vlltr import VLLTRConfig, VLLTRModel
from training.anchors import embed_and_select_anchors
from training.corpus import TokenizedCorpus

from . import common


def make_corpus(num_sentences: int, num_classes: int, length: int, seed: int = 0):
    """N sentences of `length` tokens, grouped by class in label order (as `build_class_corpus` lists them)."""
    input_ids, attention_mask = common.random_sentences(num_sentences, length, seed=seed)
    labels = torch.arange(num_sentences) * num_classes // num_sentences  # (N,), contiguous classes
    return TokenizedCorpus(input_ids, attention_mask, 0), labels


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--sentences", type=int, default=1000, help="N (memory is also measured at 10·N)")
    p.add_argument("--classes", type=int, default=10, help="classes of the corpus (fixed as N grows)")
    p.add_argument("--length", type=int, default=8, help="tokens per sentence, SOT and EOT included")
    p.add_argument("--images-per-class", type=int, default=20, help="selection images per class (ImageNet-LT val)")
    p.add_argument("--batch", type=int, default=256, help="text batch size (run_select_anchors' default)")
    p.add_argument(
        "--chunk-sentences",
        type=int,
        default=512,
        help="embed_and_select_anchors' chunk_sentences (default there 8192): below N, so both N span several chunks",
    )
    args = p.parse_args(argv)
    device = common.setup(args, common.LONG_REPEATS, common.QUICK_LONG_REPEATS)  # a round is ~15 s at N = 1000

    model = VLLTRModel(VLLTRConfig(clip_config=common.vit_b16_clip_config())).to(device).eval()
    num_classes, num_images = args.classes, args.classes * args.images_per_class
    g = torch.Generator().manual_seed(4)
    image_embeds = torch.randn(num_images, common.PROJECTION_DIM, generator=g).to(device)  # E_I of the selection set
    image_labels = torch.arange(num_images) // args.images_per_class

    def sides(num_sentences: int):
        tokens, labels = make_corpus(num_sentences, num_classes, args.length)

        def ours():
            return embed_and_select_anchors(
                model,
                tokens,
                labels,
                image_embeds,
                image_labels,
                num_classes,
                common.NUM_ANCHORS,
                "anss",
                batch_size=args.batch,
                chunk_sentences=args.chunk_sentences,
                show_progress=False,
            )

        @torch.no_grad()
        def floor():
            for start in range(0, num_sentences, args.batch):
                rows = slice(start, start + args.batch)
                model.clip.get_text_features(
                    input_ids=tokens.input_ids[rows].to(device), attention_mask=tokens.attention_mask[rows].to(device)
                )

        return common.Side(ours), common.Side(floor)

    n = args.sentences
    ours_side, floor_side = sides(n)
    timings = common.time_sides(args, ours_side, floor_side, device)
    ours_peak, floor_peak = common.peak_memory_mb(ours_side, device), common.peak_memory_mb(floor_side, device)
    ours_side_10n, floor_side_10n = sides(10 * n)
    ours_peak_10n = common.peak_memory_mb(ours_side_10n, device)
    floor_peak_10n = common.peak_memory_mb(floor_side_10n, device)
    common.log(
        f"peak MiB at N = {n}: ours {ours_peak:.1f}, floor {floor_peak:.1f}; at 10N: ours {ours_peak_10n:.1f}, floor {floor_peak_10n:.1f}"
    )

    output_mb = (
        num_classes * common.NUM_ANCHORS * (common.PROJECTION_DIM * 4 + 8 + 1) / common.MB
    )  # anchors, indices, mask
    common.emit(
        "anchor selection",
        timings,
        1.15,
        ours_peak,
        floor_peak,
        1.10,
        batch=args.batch,
        note=(
            f"N = {n} sentences of {args.length} tokens in {num_classes} classes (the class count stays fixed as N "
            f"grows), M = {common.NUM_ANCHORS}, {num_images} random selection-image embeddings, text batch "
            f"{args.batch}; ViT-B/16 text tower, random weights. Ours: embed_and_select_anchors(..., 'anss'); "
            f"floor: model.clip.get_text_features over the same batches, outputs discarded. chunk_sentences = "
            f"{args.chunk_sentences} (default 8192): ours holds one chunk of whole classes (~chunk x D floats), so its "
            "peak stops growing once N passes the chunk; a small chunk shows that within the CPU budget (at the "
            "default, N >= 8192 would be needed; 16 MiB of chunk). memory_ratio = ours' "
            "peak at 10·N over ours' peak at N ('flat': bound 1.10); ours/floor peaks at N are ours_peak_mb and "
            "floor_peak_mb, at 10·N the *_10n fields. The O(N) part of ours (scores, labels and sort keys, about 40 "
            "bytes a sentence) is counted in the peak, not subtracted. The output (anchors (C, M, D), indices, "
            f"mask: {output_mb:.1f} MiB) depends on C, not N."
        ),
        device=device,
        memory_ratio=ours_peak_10n / ours_peak,
        sentences=n,
        ours_peak_mb_10n=round(ours_peak_10n, 1),
        floor_peak_mb_10n=round(floor_peak_10n, 1),
        memory_ratio_vs_floor=round(ours_peak / floor_peak, 3),
        memory_ratio_vs_floor_10n=round(ours_peak_10n / floor_peak_10n, 3),
        resident_mb={"text_tower": common.tensors_mb(model.clip.text_model, model.clip.text_projection)},
    )


if __name__ == "__main__":
    main()

"""What training and evaluating at 384 px costs against 224 px, counted rather than timed: the FLOPs of one CLIP
ViT-B/16 vision-tower forward per image (torch's `FlopCounterMode`, on the meta device, so it takes a second on any
machine) and the tokens per image. The text tower's cost does not change with the image size.

    python -m benchmarks.resolution_cost              # prints one JSON line
"""

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel

from .common import VISION


def vision_forward_flops(image_size: int) -> int:
    config = CLIPVisionConfig(**{**VISION, "image_size": image_size})
    with torch.device("meta"):
        model = CLIPVisionModel(config).eval()
        pixels = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(pixel_values=pixels)
    return counter.get_total_flops()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=int, default=224)
    p.add_argument("--size", type=int, default=384)
    args = p.parse_args(argv)
    patch = VISION["patch_size"]
    base, size = vision_forward_flops(args.base), vision_forward_flops(args.size)
    result = {
        "case": f"vision tower forward, {args.size} vs {args.base} px (ViT-B/16)",
        "tokens_per_image": {
            str(args.base): (args.base // patch) ** 2 + 1,
            str(args.size): (args.size // patch) ** 2 + 1,
        },
        "gflops_per_image": {str(args.base): round(base / 1e9, 2), str(args.size): round(size / 1e9, 2)},
        "flops_ratio": round(size / base, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Test-time augmentation for `run_eval`: several views of each test image, their probabilities averaged.

The evaluation transform (`eval_image_processor`, saved with every checkpoint) resizes the short side to
`int(256 / 224 · image_size)` (256 for 224) and centre-crops `image_size`. The views:

- `none`: that single view (today's evaluation, the same code path);
- `flip`: that view and its horizontal mirror (2 views);
- `five_crop`: torchvision `FiveCrop(image_size)` on the *resized* image (the processor with its centre crop turned
  off): the four corners and the centre, which is exactly the `none` view (5 views);
- `ten_crop`: torchvision `TenCrop(image_size)`: those five and the five crops of the mirrored image (10 views);
- `lift_five_crop`: LIFT's test-time ensemble (shijxcs/LIFT `trainer.py`, `tte` with `tte_mode` "fivecrop"): the
  short side resized to `image_size + 24` (torchvision `Resize`, bilinear, as LIFT; not the processor's resize), the
  five `FiveCrop(image_size)` crops, no flip, each normalised with the processor's mean and std (5 views).

A processor whose resize already gives `image_size` (no margin to crop) makes the five crops coincide.

Averaging: for `lift_five_crop` the raw outputs are averaged over the views, as LIFT averages its head's logits
(`output.view(B, n_crops, -1).mean(dim=1)` in `Trainer.test`). For the other modes every output (`logits`, `image_logits`, `text_logits`) is turned into probabilities (softmax), averaged
over the views and returned as log-probabilities. For the LGR head, `softmax(logits)` is the fused probability
`α·softmax(P_I) + (1 − α)·softmax(P_T)`, so the reported prediction is the view-averaged fused probability; the
per-branch numbers average each branch's own probability (LIFT's test-time ensemble averages the same way).
"""

import torch
from torchvision.transforms import v2
from transformers.utils.logging import tqdm

from .data import eval_collator

TTA_MODES = ("none", "flip", "five_crop", "ten_crop", "lift_five_crop")
NUM_VIEWS = {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10, "lift_five_crop": 5}
LIFT_EXPAND = 24  # LIFT's `expand`: the resize before its five crops is image_size + 24 (248 for 224)
# What is averaged over the views: "probabilities" (log of the mean softmax) or "logits" (the mean of the raw outputs)
VIEW_AVERAGE = {mode: "logits" if mode == "lift_five_crop" else "probabilities" for mode in TTA_MODES}


def _size_field(size, key: str):
    """A field of a processor's `size` / `crop_size`, a dict or a `SizeDict` (transformers 5)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _crop_size(image_processor) -> tuple[int, int]:
    """(height, width) of the processor's final view: its centre crop, or its resize when it does not crop."""
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None)
        if _size_field(size, "height") and _size_field(size, "width"):
            return int(_size_field(size, "height")), int(_size_field(size, "width"))
    edge = _size_field(getattr(image_processor, "size", None), "shortest_edge")
    if not edge:
        raise ValueError(f"{type(image_processor).__name__} has neither crop_size nor size: cannot make crops.")
    return int(edge), int(edge)


class MultiViewTransform:
    """One PIL image -> `(V, 3, H, W)` views for `mode` (see the module docstring). Picklable for workers."""

    def __init__(self, image_processor, mode: str):
        if mode not in TTA_MODES:
            raise ValueError(f"--tta must be one of {TTA_MODES}, got {mode!r}.")
        self.image_processor = image_processor
        self.mode = mode
        if mode in ("five_crop", "ten_crop"):
            size = _crop_size(image_processor)
            edge = _size_field(getattr(image_processor, "size", None), "shortest_edge")
            if edge and int(edge) < min(size):
                raise ValueError(
                    f"--tta {mode}: the image processor resizes the short side to {edge}, below its {size[0]}x{size[1]} "
                    f"crop; use --tta flip, or a processor that resizes above the crop size."
                )
            self.crops = v2.FiveCrop(size) if mode == "five_crop" else v2.TenCrop(size)
        if mode == "lift_five_crop":
            size = _crop_size(image_processor)
            self.lift_views = v2.Compose([v2.Resize(min(size) + LIFT_EXPAND), v2.FiveCrop(size)])
            self.normalize = v2.Compose(
                [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(image_processor.image_mean, image_processor.image_std)]
            )  # fmt: skip

    def __call__(self, image) -> torch.Tensor:
        if self.mode == "lift_five_crop":  # LIFT: Resize, FiveCrop, then ToTensor + Normalize on each crop
            views = [self.normalize(crop) for crop in self.lift_views(image.convert("RGB"))]
        elif self.mode in ("none", "flip"):
            view = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, H, W)
            views = [view] if self.mode == "none" else [view, view.flip(-1)]
        else:
            # resize + normalise without the centre crop: normalisation is per pixel, so cropping afterwards gives
            # the same pixels as cropping first
            resized = self.image_processor(images=image, do_center_crop=False, return_tensors="pt")["pixel_values"][0]
            height, width = _crop_size(self.image_processor)
            if resized.shape[-2] < height or resized.shape[-1] < width:
                raise ValueError(
                    f"--tta {self.mode}: the image processor resizes to {tuple(resized.shape[-2:])}, smaller than the "
                    f"{height}x{width} crops; use --tta flip or a processor that resizes above the crop size."
                )
            views = list(self.crops(resized))  # FiveCrop: tl, tr, bl, br, centre; TenCrop: + those of the mirror
        return torch.stack(views)  # (V, 3, H, W)


def average_view_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """log(mean_v softmax(logits[:, v])) for `(B, V, C)` logits -> `(B, C)`, computed in log space."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, V, C)
    return torch.logsumexp(log_probs, dim=1) - torch.log(torch.tensor(float(logits.shape[1])))  # (B, C)


def predict_logits_tta(
    model, dataset, batch_size: int = 64, num_workers: int = 0, desc: str = "", average: str = "probabilities"
) -> dict:
    """Like `embedding.predict_logits`, for a dataset whose transform is a `MultiViewTransform`: each batch of
    `(B, V, 3, H, W)` views goes through the model as `B·V` images and each output is averaged over the views:
    `average="probabilities"` by `average_view_log_probabilities`, `"logits"` as the plain mean of the outputs
    (LIFT's; `VIEW_AVERAGE` gives each mode's). Returns CPU tensors `logits`, `image_logits`, `text_logits` (None
    for the FC / cosine head), `labels`."""
    if average not in ("probabilities", "logits"):
        raise ValueError(f"average must be 'probabilities' or 'logits', got {average!r}.")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=eval_collator
    )
    device = next(model.parameters()).device
    parts: dict[str, list] = {"logits": [], "image_logits": [], "text_logits": [], "labels": []}
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not desc, unit="batch", leave=False):
            views = batch["pixel_values"]  # (B, V, 3, H, W)
            num_images, num_views = views.shape[:2]
            out = model(pixel_values=views.flatten(0, 1).to(device))  # B·V images
            for key in ("logits", "image_logits", "text_logits"):
                value = getattr(out, key)
                if value is not None:
                    value = value.float().cpu().view(num_images, num_views, -1)  # (B, V, C)
                    mean = value.mean(1) if average == "logits" else average_view_log_probabilities(value)  # (B, C)
                    parts[key].append(mean)
            parts["labels"].append(batch["labels"])
    return {k: torch.cat(v) if v else None for k, v in parts.items()}


__all__ = [
    "LIFT_EXPAND",
    "NUM_VIEWS",
    "TTA_MODES",
    "VIEW_AVERAGE",
    "MultiViewTransform",
    "average_view_log_probabilities",
    "predict_logits_tta",
]

"""Changing a CLIP ViT's input resolution once, for good (e.g. 224 → 384 px, the paper's best iNaturalist run).

The absolute position embeddings of the patch grid are resampled with timm's `resample_abs_pos_embed` (bicubic, the
class token's embedding kept as is: what timm and OpenCLIP do when loading a ViT at another size), the embedding
module is resized to the new number of positions and the config's `vision_config.image_size` updated. Saved after
that, the checkpoint is a plain model of the new size: no `interpolate_pos_encoding` at run time, and every later
stage (anchor selection, stage 2, evaluation, the saved image processor) reads the new size from the config.
"""

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


def resize_image_size(model, image_size: int) -> bool:
    """Sets the input size of `model` (a `VLLTRModel` / `VLLTRForImageClassification` with a ViT vision tower) to
    `image_size` × `image_size`. Returns False when it already has that size, True when it was resized.

    Raises `ValueError` when `image_size` is not a positive multiple of the patch size."""
    vision_config = model.config.clip_config.vision_config
    embeddings = model.clip.vision_model.embeddings
    patch_size = embeddings.patch_size
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(f"--image_size {image_size} must be a positive multiple of the patch size ({patch_size}).")
    old_size = embeddings.image_size
    if image_size == old_size:
        return False
    from timm.layers import resample_abs_pos_embed  # here: timm is slow to import and only a resize needs it

    old_grid, new_grid = old_size // patch_size, image_size // patch_size
    weight = embeddings.position_embedding.weight  # (1 + old_grid², D)
    with torch.no_grad():
        resized = resample_abs_pos_embed(
            weight.detach().float().unsqueeze(0),  # (1, 1 + old_grid², D)
            new_size=(new_grid, new_grid),
            old_size=(old_grid, old_grid),
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=True,
            verbose=False,
        )[0].to(weight.dtype)  # (1 + new_grid², D)
    position_embedding = nn.Embedding(resized.shape[0], resized.shape[1], device=weight.device, dtype=weight.dtype)
    position_embedding.weight.data.copy_(resized)
    position_embedding.weight.requires_grad_(weight.requires_grad)
    embeddings.position_embedding = position_embedding
    embeddings.image_size = image_size
    embeddings.num_patches = new_grid**2
    embeddings.num_positions = new_grid**2 + 1
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=weight.device).expand((1, -1))
    for config in {id(c): c for c in (vision_config, model.clip.config.vision_config, embeddings.config)}.values():
        config.image_size = image_size
    logger.info(
        f"Resized the vision tower from {old_size} to {image_size} px: position embeddings resampled bicubically from "
        f"a {old_grid}×{old_grid} to a {new_grid}×{new_grid} grid."
    )
    return True


__all__ = ["resize_image_size"]

"""Embedding a tokenised corpus and an image set with a (stage-1) model, in batches, with a progress bar."""

from collections.abc import Iterator

import torch
from transformers.utils.logging import tqdm

from .corpus import TokenizedCorpus
from .data import eval_collator


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def iter_text_embeddings(
    model, tokens: TokenizedCorpus, batch_size: int = 256, start: int = 0, end: int | None = None, desc: str = ""
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yields `(rows, E_T)` for consecutive batches of sentences `start..end` (raw projected text embeddings, float32
    on the model's device). Padding is trimmed to the longest sentence of each batch."""
    end = len(tokens.input_ids) if end is None else end
    device = _model_device(model)
    with torch.no_grad(), tqdm(total=end - start, desc=desc, disable=not desc, unit="sent", leave=False) as bar:
        for i in range(start, end, batch_size):
            rows = slice(i, min(i + batch_size, end))
            mask = tokens.attention_mask[rows]
            length = int(mask.sum(-1).max())
            embeds = model.get_text_features(
                input_ids=tokens.input_ids[rows, :length].to(device), attention_mask=mask[:, :length].to(device)
            ).pooler_output
            bar.update(rows.stop - rows.start)
            yield rows, embeds.float()


def embed_texts(model, tokens: TokenizedCorpus, batch_size: int = 256, desc: str = "") -> torch.Tensor:
    """E_T (N, D) for every sentence, on the model's device."""
    return torch.cat([e for _, e in iter_text_embeddings(model, tokens, batch_size, desc=desc)])


def embed_images(model, dataset, batch_size: int = 64, num_workers: int = 0, desc: str = "") -> torch.Tensor:
    """E_I (N, D) for every image of `dataset` (an `ImageDataset` with the evaluation transform)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=eval_collator
    )
    device = _model_device(model)
    parts = []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not desc, unit="batch", leave=False):
            parts.append(model.get_image_features(batch["pixel_values"].to(device)).pooler_output.float())
    return torch.cat(parts)


def predict_logits(model, dataset, batch_size: int = 64, num_workers: int = 0, desc: str = "") -> dict:
    """Runs a `VLLTRForImageClassification` over `dataset` (evaluation transform) and returns the stacked
    `logits`, `image_logits`, `text_logits` (None for the FC head) and `labels` as CPU tensors."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=eval_collator
    )
    device = _model_device(model)
    parts: dict[str, list] = {"logits": [], "image_logits": [], "text_logits": [], "labels": []}
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not desc, unit="batch", leave=False):
            out = model(pixel_values=batch["pixel_values"].to(device))
            for key in ("logits", "image_logits", "text_logits"):
                value = getattr(out, key)
                if value is not None:
                    parts[key].append(value.float().cpu())
            parts["labels"].append(batch["labels"])
    return {k: torch.cat(v) if v else None for k, v in parts.items()}


def class_text_embeddings(model, tokenizer, prompts: list[list[str]], batch_size: int = 256) -> torch.Tensor:
    """For each class c, the mean over its prompts `prompts[c]` of the normalised text embedding E_T / ‖E_T‖, not
    normalised again: `(num_classes, D)` float32 on the model's device (LIFT's `init_head_text_feat` before the
    projection step). Prompts are embedded in batches of `batch_size`, padded to the longest of the batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("class_text_embeddings needs at least one prompt for every class.")
    flat = [prompt for class_prompts in prompts for prompt in class_prompts]
    device = _model_device(model)
    max_length = min(77, getattr(tokenizer, "model_max_length", 77))
    parts = []
    with torch.no_grad():
        for i in tqdm(range(0, len(flat), batch_size), desc="Prompts", unit="batch", leave=False):
            enc = tokenizer(
                flat[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            embeds = model.clip.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            ).pooler_output  # E_T (b, D)
            parts.append(torch.nn.functional.normalize(embeds.float(), dim=-1))
    unit = torch.cat(parts)  # (P, D), class-major
    counts = torch.tensor([len(p) for p in prompts], device=device)  # (C,)
    owner = torch.repeat_interleave(torch.arange(len(prompts), device=device), counts)  # class of each prompt (P,)
    sums = torch.zeros(len(prompts), unit.shape[1], device=device).index_add_(0, owner, unit)  # (C, D)
    return sums / counts[:, None].to(sums.dtype)


def cosine_head_weights(model, text_embeds: torch.Tensor) -> torch.Tensor:
    """The initial rows w_c of a cosine head from each class's text embedding t_c `(C, D)` (`class_text_embeddings`),
    in the space of the feature the head classifies (`config.classifier_feature`): `projected` w_c = t_c / ‖t_c‖;
    `pooled` (LIFT) w_c = t_c·W / ‖t_c·W‖ with W `(D, H)` the weight of `visual_projection` (E_I = W·f), which is
    LIFT's `text_features @ image_encoder.proj.t()` (OpenAI CLIP's `proj` is Wᵀ). `(C, config.classifier_input_dim)`."""
    text_embeds = text_embeds.float()
    if model.config.classifier_feature == "pooled":
        text_embeds = text_embeds @ model.clip.visual_projection.weight.detach().float()  # (C, D) @ (D, H) -> (C, H)
    return torch.nn.functional.normalize(text_embeds, dim=-1)


def prompt_embeddings(
    model, tokenizer, class_names: list[str], templates: list[str], batch_size: int = 256
) -> torch.Tensor:
    """The normalised text embedding of each class's prompts, averaged over `templates` and normalised again
    (CLIP's zero-shot prompt ensemble; one template is the plain prompt): `(num_classes, D)` float32 on the model's
    device."""
    prompts = [[template.format(name) for template in templates] for name in class_names]
    return torch.nn.functional.normalize(class_text_embeddings(model, tokenizer, prompts, batch_size), dim=-1)

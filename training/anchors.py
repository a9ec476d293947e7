"""AnSS (anchor sentence selection): score every sentence by its L_lin, keep M anchors per class, write a report."""

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .corpus import ClassCorpus, TokenizedCorpus
from .embedding import iter_text_embeddings

logger = logging.get_logger(__name__)

STRATEGIES = ("anss", "cutoff", "random")


# --- scoring and selection


def _name_ids(ids: Sequence[int], limit: int = 20) -> str:
    ids = sorted(int(i) for i in ids)
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


@torch.no_grad()
def score_sentences(
    text_embeds: torch.Tensor,
    text_labels: torch.Tensor,
    image_embeds: torch.Tensor,
    image_labels: torch.Tensor,
    logit_scale: float | torch.Tensor,
    chunk_size: int | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """L_lin of each sentence against a fixed selection image set (the paper's AnSS score; lower = more visual).

    For sentence t of class c, with s_k = exp(logit_scale)·cos(t, img_k) over **all** selection images k and n_c the
    number of selection images of class c (docs/method.md §2.1, official `engine.py` `select_sent`):

        score(t) = −Σ_k 1[y_k = c] / n_c · log_softmax(s)_k

    i.e. the text → image term of L_ccl for one sentence, without label smoothing (the code scores without it).

    Args:
        text_embeds (`torch.Tensor` of shape `(N_t, D)`): raw stage-1 sentence embeddings (normalised here).
        text_labels (`torch.Tensor` of shape `(N_t,)`): class id of each sentence.
        image_embeds (`torch.Tensor` of shape `(N_i, D)`): raw stage-1 embeddings of the selection images.
        image_labels (`torch.Tensor` of shape `(N_i,)`): class id of each selection image.
        logit_scale (`float` or 0-dim `torch.Tensor`): the stage-1 temperature in log space, like
            `CLIPModel.logit_scale`; the logits are scaled by exp(logit_scale).
        chunk_size (`int`, *optional*): sentences scored at once; by default the largest chunk with
            chunk_size · N_i ≤ 2**24 similarities, so memory does not grow with the corpus.
        show_progress (`bool`, *optional*, defaults to `False`): show a progress bar over the chunks.

    Returns:
        `torch.Tensor` of shape `(N_t,)`, float32 on the CPU. The work runs on `text_embeds`' device, in float32.
    """
    text_embeds, image_embeds = torch.as_tensor(text_embeds), torch.as_tensor(image_embeds)
    device = text_embeds.device
    text_labels = torch.as_tensor(text_labels, device=device).long().reshape(-1)  # (N_t,)
    image_labels = torch.as_tensor(image_labels, device=device).long().reshape(-1)  # (N_i,)
    if text_embeds.dim() != 2 or image_embeds.dim() != 2 or text_embeds.shape[1] != image_embeds.shape[1]:
        raise ValueError(
            f"text_embeds (N_t, D) and image_embeds (N_i, D) must share D, got {tuple(text_embeds.shape)} and "
            f"{tuple(image_embeds.shape)}"
        )
    if text_labels.shape[0] != text_embeds.shape[0] or image_labels.shape[0] != image_embeds.shape[0]:
        raise ValueError(
            f"need one label per embedding: {text_labels.shape[0]} text labels for {text_embeds.shape[0]} sentences, "
            f"{image_labels.shape[0]} image labels for {image_embeds.shape[0]} images"
        )
    num_images = image_embeds.shape[0]
    all_labels = torch.cat([text_labels, image_labels])  # (N_t + N_i,)
    if all_labels.numel() and all_labels.min() < 0:
        raise ValueError("text_labels and image_labels must be non-negative class ids")
    num_classes = int(all_labels.max()) + 1 if all_labels.numel() else 0
    images_per_class = torch.bincount(image_labels, minlength=num_classes)  # (C,) n_c
    missing = torch.unique(text_labels[images_per_class[text_labels] == 0])
    if missing.numel():
        raise ValueError(f"no selection image for the sentences' classes {_name_ids(missing.tolist())}")

    if chunk_size is None:
        chunk_size = max(1, 2**24 // max(num_images, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = math.exp(float(logit_scale))
    text_unit = F.normalize(text_embeds.float(), dim=-1)  # (N_t, D)
    image_unit = F.normalize(image_embeds.to(device=device, dtype=torch.float32), dim=-1)  # (N_i, D)
    scores = torch.empty(text_embeds.shape[0], dtype=torch.float32)  # (N_t,)
    starts = range(0, text_embeds.shape[0], chunk_size)
    for start in tqdm(starts, desc="Scoring sentences", disable=not show_progress):
        stop = start + chunk_size
        labels = text_labels[start:stop]  # (B,)
        logits = scale * text_unit[start:stop] @ image_unit.t()  # (B, N_i) s_k
        log_probs = F.log_softmax(logits, dim=-1)  # (B, N_i), softmax over the whole selection set
        positives = labels[:, None] == image_labels[None, :]  # (B, N_i) 1[y_k = c]
        score = -log_probs.masked_fill(~positives, 0.0).sum(dim=-1) / images_per_class[labels]  # (B,)
        scores[start:stop] = score.cpu()
    return scores


def _class_start_offsets(sorted_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(sorted_labels, minlength=num_classes)  # (C,)
    return torch.cumsum(counts, dim=0) - counts  # (C,) position of each class's first sentence in the sorted order


def _check_selection(text_labels, num_classes: int, num_anchors: int, strategy: str) -> torch.Tensor:
    """Checks the arguments of an anchor selection; returns the sentence labels as a flat int64 CPU tensor. Classes
    with fewer than M sentences are padded (logged); a class with no sentence is an error."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown anchor selection strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    text_labels = torch.as_tensor(text_labels).cpu().long().reshape(-1)  # (N_t,)
    if text_labels.numel() and (text_labels.min() < 0 or text_labels.max() >= num_classes):
        raise ValueError(f"text_labels must lie in [0, {num_classes})")
    sentences_per_class = torch.bincount(text_labels, minlength=num_classes)  # (C,)
    empty = (sentences_per_class == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"no sentence for the classes {_name_ids(empty.tolist())}")
    short = (sentences_per_class < num_anchors).nonzero().flatten()
    if short.numel():
        logger.warning(f"{short.numel()} classes have fewer than {num_anchors} sentences; padded: {_name_ids(short)}")
    return text_labels


def select_anchors(
    scores: torch.Tensor | None,
    text_labels: torch.Tensor,
    num_classes: int,
    num_anchors: int,
    strategy: str = "anss",
    seed: int = 0,
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Picks M = `num_anchors` anchor sentences per class.

    Strategies (docs/method.md §2.2-2.3):
    * `"anss"` (the paper's AnSS): the M sentences of lowest score (L_lin), in ascending score order; ties keep
      corpus order (stable sort).
    * `"cutoff"` (the paper's "Cut Off"): the first M sentences of each class in corpus order. With the reference
      corpus (80 templates, then Wikipedia) these are 64 prompt templates.
    * `"random"`: M sentences drawn without replacement, from a `torch.Generator` seeded with `seed`, listed in corpus
      order. The draw depends only on `seed` and the corpus, but does not reproduce the official code's `randperm`
      stream.

    A class with fewer than M sentences keeps all of them and is padded (the official code's `pad_sequence` + key
    padding mask; it never fires there, as every class has 80 templates). A class with no sentence is an error.

    Args:
        scores (`torch.Tensor` of shape `(N_t,)`, *optional*): `score_sentences` output; needed only for `"anss"`.
        text_labels (`torch.Tensor` of shape `(N_t,)`): class id of each sentence, in [0, `num_classes`).

    Returns:
        `indices` (`torch.LongTensor` of shape `(C, M)`): positions in the sentence list, −1 where padded.
        `mask` (`torch.BoolTensor` of shape `(C, M)`): True for real anchors (a prefix of each row).
    """
    text_labels = _check_selection(text_labels, num_classes, num_anchors, strategy)  # (N_t,)
    num_sentences = text_labels.shape[0]

    # rank the sentences within each class by a key, then sort by class; the stable sorts keep corpus order on ties
    if strategy == "anss":
        if scores is None:
            raise ValueError('strategy "anss" needs the sentence scores')
        key = torch.as_tensor(scores).detach().cpu().double().reshape(-1)  # (N_t,)
        if key.shape[0] != num_sentences:
            raise ValueError(f"scores must have shape ({num_sentences},), got {tuple(key.shape)}")
        if not torch.isfinite(key).all():
            raise ValueError("scores contain NaN or infinite values")
    elif strategy == "random":
        key = torch.rand(num_sentences, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        key = torch.zeros(num_sentences, dtype=torch.float64)  # cutoff: corpus order
    order = torch.sort(key, stable=True).indices  # (N_t,)
    order = order[torch.sort(text_labels[order], stable=True).indices]  # (N_t,) by class, then by key
    sorted_labels = text_labels[order]  # (N_t,)
    rank = torch.arange(num_sentences) - _class_start_offsets(sorted_labels, num_classes)[sorted_labels]  # (N_t,)
    keep = rank < num_anchors
    indices = torch.full((num_classes, num_anchors), -1, dtype=torch.long)  # (C, M)
    indices[sorted_labels[keep], rank[keep]] = order[keep]
    mask = indices >= 0  # (C, M)
    if strategy == "random":  # list the drawn sentences in corpus order, padding (-1 → +inf) last
        positions = torch.where(mask, indices, torch.iinfo(torch.long).max)  # (C, M)
        indices = torch.where(mask, positions.sort(dim=1).values, -1)  # (C, M); the mask is a prefix, unchanged
    return indices, mask


BALANCE_ADVICE = (
    "the prompt templates compete with the descriptions for the M anchors of each class: --use_templates False "
    "selects from the descriptions alone, --num_anchor_sentences sets M"
)


def description_counts(text_labels, indices, mask, from_template) -> tuple[np.ndarray, np.ndarray]:
    """Per class, how many of its own descriptions (sentences that are not prompt templates) were kept as anchors,
    and how many it has: two (C,) integer arrays."""
    text_labels = np.asarray(torch.as_tensor(text_labels).cpu()).reshape(-1)  # (N_t,)
    own = ~np.asarray(from_template, dtype=bool)  # (N_t,)
    indices, mask = np.asarray(torch.as_tensor(indices).cpu()), np.asarray(torch.as_tensor(mask).cpu())  # (C, M)
    total = np.bincount(text_labels[own], minlength=indices.shape[0])
    kept = np.array([int(own[indices[c][mask[c]]].sum()) for c in range(indices.shape[0])], dtype=np.int64)
    return kept, total


def description_summary(kept: np.ndarray, total: np.ndarray, class_names: Sequence[str]) -> str:
    """One sentence on the descriptions kept over all classes, naming (a few of) the classes that keep none."""
    none = [class_names[c] for c in range(len(class_names)) if total[c] > 0 and kept[c] == 0]
    text = f"{int(kept.sum())} of the {int(total.sum())} own descriptions kept as anchors"
    if none:
        named = ", ".join(repr(name) for name in none[:5]) + (", ..." if len(none) > 5 else "")
        text += f"; {len(none)} class(es) keep none of theirs ({named})"
    return text


def anchor_report(
    class_names: Sequence[str],
    sentences: Sequence[str],
    text_labels: torch.Tensor,
    scores: torch.Tensor | None,
    indices: torch.Tensor,
    mask: torch.Tensor,
    num_worst: int = 5,
    from_template=None,
) -> str:
    """A Markdown report of the selection: per class, the kept anchors and the `num_worst` highest-scoring sentences
    that were not kept, with their L_lin scores (like the paper's "lion" example: visual sentences score low).

    Without `scores` (cutoff / random selection) it lists the kept anchors without numbers and no worst sentences.
    With `from_template` ((N_t,) bool: which sentences are prompt templates) each class also says how many of its
    own descriptions were kept against the templates, and the header how to change that balance.
    """
    text_labels = torch.as_tensor(text_labels).cpu().long().reshape(-1)  # (N_t,)
    indices, mask = torch.as_tensor(indices).cpu(), torch.as_tensor(mask).cpu()  # (C, M)
    if len(sentences) != text_labels.shape[0]:
        raise ValueError(f"{len(sentences)} sentences but {text_labels.shape[0]} text labels")
    if indices.shape != mask.shape or indices.shape[0] != len(class_names):
        raise ValueError(
            f"indices {tuple(indices.shape)} and mask {tuple(mask.shape)} must both be (C, M) with "
            f"C = {len(class_names)} class names"
        )
    score_list = None if scores is None else torch.as_tensor(scores).detach().cpu().double().reshape(-1).tolist()

    def line(rank: int, index: int) -> str:
        text = " ".join(str(sentences[index]).split())
        return f"{rank}. `{score_list[index]:.3f}` {text}" if score_list is not None else f"{rank}. {text}"

    by_class: list[list[int]] = [[] for _ in class_names]
    for index, label in enumerate(text_labels.tolist()):
        by_class[label].append(index)
    header = "# Anchor sentences\n\n"
    header += f"M = {indices.shape[1]} anchors per class. "
    if score_list is not None:
        header += "Score = L_lin of the sentence against the selection images: lower is more visual.\n"
    else:
        header += "No scores: the sentences were not ranked.\n"
    own = None
    if from_template is not None and np.asarray(from_template).any():
        own = description_counts(text_labels, indices, mask, from_template)
        header += f"\n{description_summary(*own, class_names)}: {BALANCE_ADVICE}.\n"
    parts = [header]
    for label, name in enumerate(class_names):
        kept = indices[label][mask[label]].tolist()
        mix = ""
        if own is not None:
            mix = f"; {own[0][label]} of its {own[1][label]} own descriptions, {len(kept) - own[0][label]} templates"
        parts.append(
            f"\n## {label}: {name}\n\nKept anchors ({len(kept)} of {len(by_class[label])} sentences{mix}):\n\n"
        )
        parts.extend(line(rank, index) + "\n" for rank, index in enumerate(kept, start=1))
        if score_list is not None and num_worst > 0:
            kept_set = set(kept)
            dropped = sorted(
                (i for i in by_class[label] if i not in kept_set), key=lambda i: score_list[i], reverse=True
            )
            parts.append("\nHighest L_lin (least visual), not kept:\n\n")
            if dropped:
                parts.extend(line(rank, index) + "\n" for rank, index in enumerate(dropped[:num_worst], start=1))
            else:
                parts.append("(every sentence was kept)\n")
    return "".join(parts)


def anchors_record(
    strategy: str,
    class_names: Sequence[str],
    sentences: Sequence[str],
    scores: torch.Tensor | None,
    indices: torch.Tensor,
    mask: torch.Tensor,
    labels: Sequence[int] | None = None,
) -> dict:
    """The content of `anchors.json`: per class its anchors in slot order, each with its position in the corpus, its
    sentence and its score (None for "cutoff" / "random"). `labels` are the classes' ids in the classifier when the
    selection covered only some of its classes (row c is class `labels[c]`)."""
    score_list = scores.tolist() if scores is not None else None
    return {
        "strategy": strategy,
        "num_anchor_sentences": int(indices.shape[1]),
        "classes": [
            {
                "label": c if labels is None else int(labels[c]),
                "name": class_names[c],
                "anchors": [
                    {"index": i, "sentence": sentences[i], "score": None if score_list is None else score_list[i]}
                    for i in indices[c][mask[c]].tolist()
                ],
            }
            for c in range(len(class_names))
        ],
    }


# --- embedding a corpus and selecting its anchors


@torch.no_grad()
def embed_and_select_anchors(
    model,
    tokens,
    sentence_labels: torch.Tensor,
    image_embeds: torch.Tensor,
    image_labels: torch.Tensor,
    num_classes: int,
    num_anchors: int,
    strategy: str = "anss",
    seed: int = 0,
    batch_size: int = 256,
    chunk_sentences: int = 8192,
    show_progress: bool = True,
) -> tuple[torch.LongTensor, torch.BoolTensor, torch.Tensor | None, torch.Tensor]:
    """Embeds the corpus with the stage-1 text tower and picks each class's anchors, in chunks of whole classes so
    memory holds one chunk of sentence embeddings (about `chunk_sentences` x D) plus the anchors, not the corpus.

    For "anss" every sentence is embedded and scored (`score_sentences`); the M lowest per class are kept. For
    "cutoff" and "random" only the chosen sentences are embedded.

    Returns `(indices (C, M), mask (C, M), scores (N,) or None, anchor_embeds (C, M, D))`; `anchor_embeds` holds
    the raw (not normalised) stage-1 text embeddings of the anchors, zeros where padded.
    """
    sentence_labels = torch.as_tensor(sentence_labels).long().cpu()
    if strategy != "anss":
        indices, mask = select_anchors(None, sentence_labels, num_classes, num_anchors, strategy, seed)
        chosen = indices[mask]
        subset = TokenizedCorpus(tokens.input_ids[chosen], tokens.attention_mask[chosen], 0)
        embeds = torch.cat([e.cpu() for _, e in iter_text_embeddings(model, subset, batch_size)])
        anchors = torch.zeros(num_classes, num_anchors, embeds.shape[-1])
        anchors[mask] = embeds
        return indices, mask, None, anchors

    sentence_labels = _check_selection(sentence_labels, num_classes, num_anchors, strategy)
    if len(sentence_labels) and bool((sentence_labels[1:] < sentence_labels[:-1]).any()):
        raise ValueError("The corpus must list its sentences grouped by class, in label order.")
    offsets = torch.cumsum(torch.bincount(sentence_labels, minlength=num_classes), 0).tolist()
    scores = torch.empty(len(sentence_labels))
    # Each chunk holds whole classes, so a class's M best in its chunk are its anchors: they are written straight into
    # the output (no per-sentence copies, nothing of the chunk kept alive). The choice is `select_anchors`' "anss" rule
    # (lowest score first, ties in corpus order); tests/test_anchors.py holds the two equal.
    anchors: torch.Tensor | None = None  # (C, M, D)
    picked = torch.full((num_classes, num_anchors), -1, dtype=torch.long)  # (C, M) sentence of each anchor slot
    start = 0
    bar = tqdm(total=len(sentence_labels), desc="Scoring sentences", disable=not show_progress, unit="sent")
    while start < len(sentence_labels):
        end = next((o for o in offsets if o >= start + chunk_sentences), len(sentence_labels))  # whole classes
        chunk = None  # (n, D), filled batch by batch (no list of batches plus a concatenated copy)
        for rows, embeds in iter_text_embeddings(model, tokens, batch_size, start, end):
            if chunk is None:
                chunk = embeds.new_empty(end - start, embeds.shape[-1])
            chunk[rows.start - start : rows.stop - start] = embeds
        chunk_labels = sentence_labels[start:end]
        scores[start:end] = score_sentences(chunk, chunk_labels, image_embeds, image_labels, model_scale(model))
        if not torch.isfinite(scores[start:end]).all():
            raise ValueError("scores contain NaN or infinite values (is the stage-1 checkpoint damaged?)")
        if anchors is None:
            anchors = torch.zeros(num_classes, num_anchors, chunk.shape[-1])
        for c in chunk_labels.unique().tolist():
            rows = (chunk_labels == c).nonzero().flatten()
            best = rows[torch.sort(scores[start:end][rows], stable=True).indices[:num_anchors]]  # ascending score
            anchors[c, : len(best)] = chunk[best].cpu()
            picked[c, : len(best)] = start + best
        bar.update(end - start)
        start = end
    bar.close()
    return picked, picked >= 0, scores, anchors


def restrict_to_classes(corpus, tokens, image_labels, class_ids: Sequence[int]):
    """The corpus, its tokens and the selection image labels for re-selecting the anchors of `class_ids` only (e.g.
    classes added from text, once a few images of them exist). Sentence labels become 0..K-1 in the order of
    `class_ids`; selection images of the other classes get the label K: they stay in the softmax of every score (as
    negatives), so a sentence is still scored against the whole selection set, as in `score_sentences`.

    Returns `(sub_corpus, sub_tokens, image_labels)`."""

    class_ids = [int(c) for c in class_ids]
    remap = {c: k for k, c in enumerate(class_ids)}
    labels = np.asarray(corpus.labels)
    keep = np.concatenate([np.flatnonzero(labels == c) for c in class_ids])  # grouped by class, in class_ids order
    sub_corpus = ClassCorpus(
        [corpus.class_names[c] for c in class_ids],
        [corpus.sentences[i] for i in keep.tolist()],
        np.array([remap[int(labels[i])] for i in keep], dtype=np.int64),
        from_template=None if corpus.from_template is None else np.asarray(corpus.from_template)[keep],
    )
    index = torch.as_tensor(keep, dtype=torch.long)
    sub_tokens = TokenizedCorpus(tokens.input_ids[index], tokens.attention_mask[index], 0)
    image_labels = np.array([remap.get(int(y), len(class_ids)) for y in np.asarray(image_labels)], dtype=np.int64)
    return sub_corpus, sub_tokens, image_labels


@torch.no_grad()
def replace_class_anchors(
    classifier, class_ids: Sequence[int], anchors: torch.Tensor, mask: torch.Tensor, sentences: list[list[str]]
) -> None:
    """Writes new anchors `(K, M, D)` / `(K, M)` and their sentences into rows `class_ids` of a classifier; every
    other class keeps its anchors (through `set_anchor_embeddings`, which checks them)."""
    embeds, full_mask = classifier.anchor_text_embeds.clone(), classifier.anchor_mask.clone()  # (C, M, D), (C, M)
    index = torch.as_tensor(list(class_ids), dtype=torch.long)
    embeds[index] = anchors.to(embeds)
    full_mask[index] = mask.to(full_mask.device)
    stored = classifier.config.anchor_sentences or [[] for _ in range(embeds.shape[0])]
    stored = [list(s) for s in stored]
    for c, class_sentences in zip(class_ids, sentences):
        stored[c] = list(class_sentences)
    classifier.set_anchor_embeddings(embeds, full_mask)
    classifier.set_anchor_sentences(stored)


def model_scale(model) -> torch.Tensor:
    """The stage-1 learned temperature in log space (`CLIPModel.logit_scale`)."""
    return model.clip.logit_scale.detach().float().cpu()


__all__ = [
    "STRATEGIES",
    "anchor_report",
    "anchors_record",
    "embed_and_select_anchors",
    "model_scale",
    "replace_class_anchors",
    "restrict_to_classes",
    "score_sentences",
    "select_anchors",
]

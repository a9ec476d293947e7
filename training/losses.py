"""Training losses, one small function per paper loss: stage 1 (CVLP, class-wise visual-linguistic pre-training)
L_ccl and L_dis, and the logit-adjusted cross entropy (Menon et al., ICLR 2021) for the stage-2 image branch."""

import numpy as np
import torch
import torch.nn.functional as F


def _check_square(name: str, logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {tuple(logits.shape)}")


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 logits from autocast are upcast so log_softmax over a 1024-wide row keeps its precision; float64 stays.
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over rows of (1 - ε)·(−Σ_j target_j·log_softmax(row)_j) + ε·(−mean_j log_softmax(row)_j)."""
    log_probs = F.log_softmax(logits, dim=-1)  # (N, N)
    soft_ce = -(targets * log_probs).sum(dim=-1)  # (N,)
    if label_smoothing == 0.0:
        return soft_ce.mean()
    uniform_ce = -log_probs.mean(dim=-1)  # (N,)
    return ((1.0 - label_smoothing) * soft_ce + label_smoothing * uniform_ce).mean()


def class_wise_contrastive_loss(
    logits_per_image: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """L_ccl, the paper's class-wise contrastive loss (L_ccl = L_vis + L_lin): multi-positive InfoNCE both ways.

    `logits_per_image[i, j]` = s_ij = exp(logit_scale)·cos(image_i, sentence_j) over the (global) batch; sentence j
    was drawn from the class of image j, so `labels` (N,) gives the class of row i and of column j alike. With
    P_i = {j : y_j = y_i}:

        L_vis = mean_i row_loss(s[i, :], 1[j ∈ P_i] / |P_i|)      # softmax over the N sentences
        L_lin = mean_j row_loss(s[:, j], 1[i ∈ P_j] / |P_j|)      # softmax over the N images

    The 1/|P| average sits outside the log (a mean of per-positive log-probabilities, the "SupCon-out" form).

    Deviations from the paper, both following the official code (`losses.py` `PretrainSentLoss`, docs/method.md §1.3):
    * the two directions are **averaged**, (L_vis + L_lin) / 2, not summed;
    * each row loss carries uniform label smoothing ε (`label_smoothing`, the code's 0.1 default), which the paper
      does not mention: row_loss = (1 − ε)·soft-target CE + ε·(−mean_j log_softmax(row)_j). ε = 0 gives the
      paper's loss (up to the factor 1/2).

    Half-precision inputs are computed in float32 (float64 stays float64). Returns a 0-dim tensor.
    """
    _check_square("logits_per_image", logits_per_image)
    if labels.shape != logits_per_image.shape[:1]:
        raise ValueError(f"labels must have shape ({logits_per_image.shape[0]},), got {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    logits = _at_least_float32(logits_per_image)  # (N, N)
    labels = labels.to(logits.device)  # (N,)
    same_class = labels[:, None] == labels[None, :]  # (N, N), symmetric, True on the diagonal
    targets = same_class.to(logits.dtype)
    # the mask is symmetric, so these rows 1[j ∈ P_i]/|P_i| are also the text rows 1[i ∈ P_j]/|P_j| of L_lin
    targets = targets / targets.sum(dim=1, keepdim=True)  # (N, N)
    loss_vis = _soft_cross_entropy(logits, targets, label_smoothing)  # image → text
    loss_lin = _soft_cross_entropy(logits.t(), targets, label_smoothing)  # text → image
    return (loss_vis + loss_lin) / 2


def distillation_loss(logits_per_image: torch.Tensor, teacher_logits_per_image: torch.Tensor) -> torch.Tensor:
    """L_dis, the paper's distillation loss: the student's log-probabilities weighted by the frozen teacher's softmax.

    With s the student's and s' the teacher's (N, N) image-to-sentence logits on the same batch:

        D_i2t = mean_i Σ_j softmax(s'[i, :])_j · (−log_softmax(s[i, :])_j)
        D_t2i = the same on sᵀ and s'ᵀ
        L_dis = (D_i2t + D_t2i) / 2

    Temperature T = 1: each side keeps its own scale (the student's learnable exp(logit_scale), the CLIP teacher's
    fixed 100), as in the official code (`losses.py` L53-119, docs/method.md §1.4). Deviation from the paper's wording:
    the two directions are averaged. The teacher is a constant: it is detached here, so it never gets a gradient.
    Half-precision inputs are computed in float32. Returns a 0-dim tensor.
    """
    _check_square("logits_per_image", logits_per_image)
    if teacher_logits_per_image.shape != logits_per_image.shape:
        raise ValueError(
            f"teacher_logits_per_image must have the student's shape {tuple(logits_per_image.shape)}, "
            f"got {tuple(teacher_logits_per_image.shape)}"
        )
    student = _at_least_float32(logits_per_image)  # (N, N)
    teacher = _at_least_float32(teacher_logits_per_image.detach())  # (N, N)
    distill_i2t = _soft_cross_entropy(student, F.softmax(teacher, dim=1))
    distill_t2i = _soft_cross_entropy(student.t(), F.softmax(teacher.t(), dim=1))
    return (distill_i2t + distill_t2i) / 2


def diagonal_distillation_loss(
    cosines: torch.Tensor, teacher_cosines: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """L_dis in the paper's (slides') form: only the diagonal term per direction, with one shared temperature.

    With c the student's and c' the frozen teacher's (N, N) image-to-sentence cosines on the same batch, and
    s = c / τ, s' = c' / τ for one shared τ:

        D_i2t = mean_i −softmax(s'[i, :])_i · log_softmax(s[i, :])_i
        D_t2i = the same on sᵀ and s'ᵀ
        L_dis = (D_i2t + D_t2i) / 2

    The shared τ is the student's: 1/τ = `logit_scale` = exp(the student's learned logit_scale), applied to both the
    student's and the teacher's cosines (the teacher's own fixed 100 is not used). The teacher's softmax is a constant
    target: it is computed from detached cosines and a detached scale, so neither the teacher nor τ receives a
    gradient through it; τ is trained through the student's log-softmax only. The official code uses the full
    soft-target form instead (`distillation_loss`), which gave the published numbers. The two directions are averaged,
    as there. Half-precision inputs are computed in float32. Returns a 0-dim tensor.
    """
    _check_square("cosines", cosines)
    if teacher_cosines.shape != cosines.shape:
        raise ValueError(
            f"teacher_cosines must have the student's shape {tuple(cosines.shape)}, got {tuple(teacher_cosines.shape)}"
        )
    student = _at_least_float32(cosines)  # (N, N)
    scale = torch.as_tensor(logit_scale, dtype=student.dtype, device=student.device)
    teacher = _at_least_float32(teacher_cosines.detach()) * scale.detach()  # s' (N, N)
    student = student * scale  # s (N, N)
    weights_i2t = F.softmax(teacher, dim=1).diagonal()  # (N,) softmax(s'[i, :])_i
    weights_t2i = F.softmax(teacher, dim=0).diagonal()  # (N,) softmax(s'[:, j])_j
    distill_i2t = -(weights_i2t * F.log_softmax(student, dim=1).diagonal()).mean()
    distill_t2i = -(weights_t2i * F.log_softmax(student, dim=0).diagonal()).mean()
    return (distill_i2t + distill_t2i) / 2


DISTILLATION_FORMS = ("code", "paper")


def log_class_prior(counts: "np.ndarray | torch.Tensor | list[int]") -> torch.Tensor:
    """log π_c = log(n_c / Σ_j n_j) from the training counts n_c, float64 `(C,)` (the loss casts it to the logits').

    A class with no training image would get log 0 = −inf, which turns every soft target (label smoothing, Mixup)
    into a NaN loss; it is counted as one image instead (the smallest prior a real class could have)."""
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError(f"class counts must be a non-empty 1-D array of counts >= 0, got shape {tuple(counts.shape)}")
    counts = counts.clamp_min(1.0)  # (C,)
    return (counts / counts.sum()).log()


def logit_adjusted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """The logit-adjusted loss (Menon et al., ICLR 2021, Eq. 10): CE(z + τ·log π, y), averaged over the batch.

    `logits` z `(B, C)`, `targets` class ids `(B,)` or soft targets `(B, C)` (Mixup / CutMix, label smoothing),
    `log_prior` log π `(C,)` from the training counts (`log_class_prior`). Adding τ·log π in training only makes
    head classes cheaper to predict during training, so the plain logits z learnt this way are balanced at test
    time (the paper's Fisher-consistent form for the balanced error). τ = 0 is the plain cross entropy.
    Half-precision inputs are computed in float32. Returns a 0-dim tensor.
    """
    if logits.dim() != 2 or log_prior.shape != logits.shape[1:]:
        raise ValueError(
            f"log_prior must have shape ({logits.shape[-1]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(log_prior.shape)}"
        )
    adjusted = _at_least_float32(logits)  # (B, C)
    adjusted = adjusted + tau * log_prior.to(device=adjusted.device, dtype=adjusted.dtype)  # z + τ·log π (B, C)
    if targets.dtype.is_floating_point:
        return -(targets * F.log_softmax(adjusted, dim=-1)).sum(-1).mean()
    return F.cross_entropy(adjusted, targets)


__all__ = [
    "DISTILLATION_FORMS",
    "class_wise_contrastive_loss",
    "diagonal_distillation_loss",
    "distillation_loss",
    "log_class_prior",
    "logit_adjusted_cross_entropy",
]

"""Parity tests for training/losses.py against naive loops written straight from the equations, forward and backward."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip import modeling_clip

from training.losses import (
    class_wise_contrastive_loss,
    diagonal_distillation_loss,
    distillation_loss,
    log_class_prior,
    logit_adjusted_cross_entropy,
)

# transformers renamed `clip_loss` to `image_text_contrastive_loss`; both are CLIP's symmetric cross-entropy.
clip_symmetric_ce = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss


# --- naive references: explicit loops over rows and entries, float64 torch scalars so autograd still works


def naive_log_softmax(row: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(float(v.detach()) for v in row)
    log_sum_exp = top + torch.log(sum(torch.exp(v - top) for v in row))
    return [v - log_sum_exp for v in row]


def naive_row_loss(row: list[torch.Tensor], target: list[float], eps: float) -> torch.Tensor:
    log_probs = naive_log_softmax(row)
    soft_ce = -sum(t * lp for t, lp in zip(target, log_probs))
    uniform_ce = -sum(log_probs) / len(log_probs)
    return (1 - eps) * soft_ce + eps * uniform_ce


def naive_class_wise_contrastive(s: torch.Tensor, labels: list[int], eps: float) -> torch.Tensor:
    n = len(labels)
    loss_vis = 0.0
    for i in range(n):  # one row per image, softmax over sentences
        positives = [j for j in range(n) if labels[j] == labels[i]]
        target = [1.0 / len(positives) if j in positives else 0.0 for j in range(n)]
        loss_vis = loss_vis + naive_row_loss([s[i, j] for j in range(n)], target, eps)
    loss_lin = 0.0
    for j in range(n):  # one row per sentence, softmax over images
        positives = [i for i in range(n) if labels[i] == labels[j]]
        target = [1.0 / len(positives) if i in positives else 0.0 for i in range(n)]
        loss_lin = loss_lin + naive_row_loss([s[i, j] for i in range(n)], target, eps)
    return (loss_vis / n + loss_lin / n) / 2


def naive_distillation(s: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    n = s.shape[0]
    t = teacher.detach().tolist()

    def teacher_softmax(row: list[float]) -> list[float]:
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        return [e / sum(exps) for e in exps]

    d_i2t = 0.0
    for i in range(n):
        weights = teacher_softmax([t[i][j] for j in range(n)])
        log_probs = naive_log_softmax([s[i, j] for j in range(n)])
        d_i2t = d_i2t - sum(w * lp for w, lp in zip(weights, log_probs))
    d_t2i = 0.0
    for j in range(n):
        weights = teacher_softmax([t[i][j] for i in range(n)])
        log_probs = naive_log_softmax([s[i, j] for i in range(n)])
        d_t2i = d_t2i - sum(w * lp for w, lp in zip(weights, log_probs))
    return (d_i2t / n + d_t2i / n) / 2


def naive_diagonal_distillation(c: torch.Tensor, teacher_c: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The slides' L_dis from the formula: per direction −softmax(s'[i, :])_i · log softmax(s[i, :])_i averaged over i,
    s = scale·c, s' = scale·c' (one shared τ = 1/scale), the teacher's weight a constant."""
    n = c.shape[0]
    t = teacher_c.detach().tolist()
    shared = float(scale.detach())

    def teacher_weight(row: list[float], k: int) -> float:
        top = max(row)
        exps = [math.exp(shared * (v - top)) for v in row]
        return exps[k] / sum(exps)

    d_i2t = 0.0
    for i in range(n):
        weight = teacher_weight([t[i][j] for j in range(n)], i)
        d_i2t = d_i2t - weight * naive_log_softmax([scale * c[i, j] for j in range(n)])[i]
    d_t2i = 0.0
    for j in range(n):
        weight = teacher_weight([t[i][j] for i in range(n)], j)
        d_t2i = d_t2i - weight * naive_log_softmax([scale * c[i, j] for i in range(n)])[j]
    return (d_i2t / n + d_t2i / n) / 2


def value_and_grad(fn, logits: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, *args)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


# --- cases: (seed, N, number of classes or None for all-distinct labels)

CASES = [(0, 6, 2), (1, 9, 3), (2, 12, 5), (3, 7, None), (4, 10, None), (5, 8, 1)]


def make_case(seed: int, n: int, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = 5.0 * torch.randn(n, n, generator=generator, dtype=torch.float64)  # (N, N), scale ~ 100·cos
    if num_classes is None:
        labels = torch.randperm(n, generator=generator) + 3  # all distinct, not 0..N-1
    else:
        labels = torch.randint(0, num_classes, (n,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("seed,n,num_classes", CASES)
def test_class_wise_contrastive_matches_naive_forward_and_backward(seed, n, num_classes, eps):
    logits, labels = make_case(seed, n, num_classes)
    if num_classes is not None and num_classes > 1:
        assert len(set(labels.tolist())) < n, "case should contain repeated labels"
    loss, grad = value_and_grad(class_wise_contrastive_loss, logits, labels, eps)
    ref_loss, ref_grad = value_and_grad(naive_class_wise_contrastive, logits, labels.tolist(), eps)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed,n,num_classes", CASES[:3])
def test_class_wise_contrastive_float32_input(seed, n, num_classes):
    logits, labels = make_case(seed, n, num_classes)
    loss, grad = value_and_grad(class_wise_contrastive_loss, logits.float(), labels, 0.1)
    ref_loss, ref_grad = value_and_grad(naive_class_wise_contrastive, logits, labels.tolist(), 0.1)
    assert loss.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_class_wise_contrastive_half_input_is_computed_in_float32(dtype):
    logits, labels = make_case(7, 16, 4)
    half = logits.to(dtype)
    loss = class_wise_contrastive_loss(half, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, class_wise_contrastive_loss(half.float(), labels))


@pytest.mark.parametrize("seed,n", [(3, 7), (4, 10), (11, 32)])
def test_all_distinct_labels_without_smoothing_is_clip_loss(seed, n):
    logits, labels = make_case(seed, n, None)
    loss = class_wise_contrastive_loss(logits, labels, label_smoothing=0.0)
    torch.testing.assert_close(loss, clip_symmetric_ce(logits), rtol=1e-12, atol=1e-12)
    arange = torch.arange(n)
    by_hand = (F.cross_entropy(logits, arange) + F.cross_entropy(logits.t(), arange)) / 2
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=1e-12)
    # with smoothing the loss is no longer CLIP's, so the check above can tell the two apart
    assert not torch.allclose(class_wise_contrastive_loss(logits, labels, 0.1), by_hand)


def test_repeated_labels_differ_from_clip_loss():
    logits, labels = make_case(1, 9, 3)
    loss = class_wise_contrastive_loss(logits, labels, label_smoothing=0.0)
    assert not torch.allclose(loss, clip_symmetric_ce(logits))


def test_label_smoothing_term_is_uniform_cross_entropy():
    logits, labels = make_case(2, 12, 5)
    plain = class_wise_contrastive_loss(logits, labels, 0.0)
    uniform = class_wise_contrastive_loss(logits, labels, 1.0)
    expected_uniform = (-F.log_softmax(logits, 1).mean() - F.log_softmax(logits, 0).mean()) / 2
    torch.testing.assert_close(uniform, expected_uniform)
    torch.testing.assert_close(class_wise_contrastive_loss(logits, labels, 0.25), 0.75 * plain + 0.25 * uniform)


@pytest.mark.parametrize("seed,n", [(0, 5), (1, 8), (2, 13)])
def test_distillation_matches_naive_forward_and_backward(seed, n):
    generator = torch.Generator().manual_seed(100 + seed)
    student = 4.0 * torch.randn(n, n, generator=generator, dtype=torch.float64)  # (N, N)
    teacher = 100.0 * torch.randn(n, n, generator=generator, dtype=torch.float64).tanh() / 3  # (N, N)
    loss, grad = value_and_grad(distillation_loss, student, teacher)
    ref_loss, ref_grad = value_and_grad(naive_distillation, student, teacher)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_distillation_with_one_hot_teacher_is_clip_loss():
    # a teacher whose softmax is (numerically) the identity turns L_dis into CLIP's symmetric CE of the student
    logits, _ = make_case(9, 6, None)
    teacher = 1e4 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(distillation_loss(logits, teacher), clip_symmetric_ce(logits))


def test_distillation_teacher_gets_no_gradient():
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(6, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 6, generator=generator, requires_grad=True)
    distillation_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("seed,n", [(0, 5), (1, 8), (2, 13)])
def test_diagonal_distillation_matches_naive_forward_and_backward(seed, n):
    generator = torch.Generator().manual_seed(200 + seed)
    cosines = torch.randn(n, n, generator=generator, dtype=torch.float64).tanh()  # (N, N) in (-1, 1)
    teacher = torch.randn(n, n, generator=generator, dtype=torch.float64).tanh()  # (N, N)
    grads = []
    for fn in (diagonal_distillation_loss, naive_diagonal_distillation):
        leaf = cosines.clone().requires_grad_(True)
        scale = torch.tensor(14.0 + seed, dtype=torch.float64, requires_grad=True)  # exp(logit_scale)
        teacher_leaf = teacher.clone().requires_grad_(True)
        loss = fn(leaf, teacher_leaf, scale)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [leaf, scale], allow_unused=True)))
        assert teacher_leaf.grad is None
    (loss, grad, scale_grad), (ref_loss, ref_grad, ref_scale_grad) = grads
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scale_grad, ref_scale_grad, rtol=1e-10, atol=1e-12)


def test_diagonal_distillation_differs_from_the_code_form_and_is_its_diagonal_part():
    generator = torch.Generator().manual_seed(3)
    cosines = torch.randn(6, 6, generator=generator, dtype=torch.float64).tanh()
    teacher = torch.randn(6, 6, generator=generator, dtype=torch.float64).tanh()
    paper = diagonal_distillation_loss(cosines, teacher, 20.0)
    code = distillation_loss(20.0 * cosines, 20.0 * teacher)
    assert paper < code  # the code form adds the (positive) off-diagonal terms
    # a teacher whose softmax is the identity makes both forms CLIP's symmetric CE of the student
    torch.testing.assert_close(
        diagonal_distillation_loss(cosines, 1e3 * torch.eye(6, dtype=torch.float64), 20.0),
        clip_symmetric_ce(20.0 * cosines),
    )


def test_input_validation():
    square = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        class_wise_contrastive_loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        class_wise_contrastive_loss(square, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="label_smoothing"):
        class_wise_contrastive_loss(square, torch.zeros(4, dtype=torch.long), label_smoothing=1.5)
    with pytest.raises(ValueError, match="square"):
        distillation_loss(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"student's shape \(4, 4\)"):
        distillation_loss(square, torch.zeros(5, 5))
    with pytest.raises(ValueError, match=r"student's shape \(4, 4\)"):
        diagonal_distillation_loss(square, torch.zeros(5, 5), 10.0)


# --- logit adjustment (Menon et al., ICLR 2021): CE(z + τ·log π, y), π_c = n_c / Σ n


def naive_logit_adjusted(z: torch.Tensor, targets: list, counts: list[int], tau: float) -> torch.Tensor:
    total = sum(max(n, 1) for n in counts)
    log_prior = [math.log(max(n, 1) / total) for n in counts]
    loss = 0.0
    for i in range(z.shape[0]):
        row = [z[i, c] + tau * log_prior[c] for c in range(z.shape[1])]
        log_probs = naive_log_softmax(row)
        target = targets[i] if isinstance(targets[i], list) else [float(c == targets[i]) for c in range(len(row))]
        loss = loss - sum(t * lp for t, lp in zip(target, log_probs))
    return loss / z.shape[0]


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("soft", [False, True])
def test_logit_adjusted_cross_entropy_matches_naive_forward_and_backward(tau, soft):
    generator = torch.Generator().manual_seed(int(10 * tau) + soft)
    counts = [40, 12, 5, 1, 0]  # a long tail with an empty class (counted as one image)
    z = 3.0 * torch.randn(6, 5, generator=generator, dtype=torch.float64)  # (B, C)
    if soft:
        targets = torch.rand(6, 5, generator=generator, dtype=torch.float64).softmax(-1)  # (B, C), rows sum to 1
        ref_targets = targets.tolist()
    else:
        targets = torch.randint(0, 5, (6,), generator=generator)
        ref_targets = targets.tolist()
    log_prior = log_class_prior(counts)
    loss, grad = value_and_grad(logit_adjusted_cross_entropy, z, targets, log_prior, tau)
    ref_loss, ref_grad = value_and_grad(naive_logit_adjusted, z, ref_targets, counts, tau)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    if tau == 0.0:  # no adjustment: the plain cross entropy
        plain = F.cross_entropy(z, targets) if not soft else -(targets * F.log_softmax(z, -1)).sum(-1).mean()
        torch.testing.assert_close(loss, plain)


def test_logit_adjustment_favours_tail_classes_in_training():
    # the same logits cost more for a head-class label and less for a tail-class label once the prior is added
    z = torch.zeros(1, 3)
    log_prior = log_class_prior([100, 10, 1])
    head = logit_adjusted_cross_entropy(z, torch.tensor([0]), log_prior, 1.0)
    tail = logit_adjusted_cross_entropy(z, torch.tensor([2]), log_prior, 1.0)
    assert head < F.cross_entropy(z, torch.tensor([0])) < tail


def test_logit_adjustment_input_validation():
    with pytest.raises(ValueError, match=r"log_prior must have shape \(4,\)"):
        logit_adjusted_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="class counts"):
        log_class_prior([3, -1])

"""Tests for training/anchors.py: AnSS scores against a naive loop, selection against a naive sort, the report."""

import math

import pytest
import torch

from modeling_vlltr import VLLTRModel
from training.anchors import anchor_report, embed_and_select_anchors, score_sentences, select_anchors
from training.corpus import TokenizedCorpus


def naive_scores(text, text_labels, images, image_labels, logit_scale):
    """L_lin of each sentence, one sentence at a time, in float64 Python arithmetic straight from docs/method.md §2.1."""
    scale = math.exp(logit_scale)

    def unit(vector):
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector]

    images = [unit(v) for v in images.tolist()]
    image_labels = image_labels.tolist()
    result = []
    for t, c in zip(text.tolist(), text_labels.tolist()):
        t = unit(t)
        logits = [scale * sum(a * b for a, b in zip(t, img)) for img in images]
        top = max(logits)
        log_sum_exp = top + math.log(sum(math.exp(s - top) for s in logits))
        positives = [k for k, y in enumerate(image_labels) if y == c]
        result.append(-sum((logits[k] - log_sum_exp) / len(positives) for k in positives))
    return result


def make_corpus(seed=0, num_classes=4, dim=8):
    generator = torch.Generator().manual_seed(seed)
    sentences_per_class = [3, 7, 1, 12][:num_classes]
    images_per_class = [2, 5, 1, 4][:num_classes]
    text_labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sentences_per_class)])
    text_labels = text_labels[torch.randperm(len(text_labels), generator=generator)]  # classes interleaved
    image_labels = torch.cat([torch.full((n,), c) for c, n in enumerate(images_per_class)])
    image_labels = image_labels[torch.randperm(len(image_labels), generator=generator)]
    text = 3.0 * torch.randn(len(text_labels), dim, generator=generator, dtype=torch.float64)  # raw, not unit
    images = torch.randn(len(image_labels), dim, generator=generator, dtype=torch.float64)
    images += 0.8 * text[: len(images)].abs().mean() * torch.nn.functional.one_hot(image_labels, dim)
    return text, text_labels, images, image_labels


# --- score_sentences


@pytest.mark.parametrize("seed,logit_scale", [(0, math.log(100.0)), (1, math.log(1 / 0.07)), (2, 0.0)])
def test_scores_match_naive_loop(seed, logit_scale):
    text, text_labels, images, image_labels = make_corpus(seed)
    expected = torch.tensor(naive_scores(text, text_labels, images, image_labels, logit_scale), dtype=torch.float64)
    scores = score_sentences(text, text_labels, images, image_labels, logit_scale, chunk_size=3)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == text_labels.shape
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-4)
    assert (expected > 0).all()


def test_scores_independent_of_chunk_size_and_input_types():
    text, text_labels, images, image_labels = make_corpus(3)
    reference = score_sentences(text.float(), text_labels, images.float(), image_labels, torch.tensor(4.6052))
    for chunk_size in (1, 2, 5, 23, 1000):
        scores = score_sentences(
            text.float(), text_labels, images.float(), image_labels, 4.6052, chunk_size=chunk_size
        )
        torch.testing.assert_close(scores, reference, rtol=1e-6, atol=1e-6)
    progress = score_sentences(text, text_labels.tolist(), images, image_labels, 4.6052, show_progress=True)
    torch.testing.assert_close(progress, reference, rtol=1e-5, atol=1e-5)
    # scaling the raw embeddings must not matter: they are normalised inside
    rescaled = score_sentences(7.0 * text.float(), text_labels, 0.1 * images.float(), image_labels, 4.6052)
    torch.testing.assert_close(rescaled, reference, rtol=1e-5, atol=1e-5)


def test_visual_sentence_scores_lower():
    # a sentence that points at its own class's images scores low (more visual); one that points at another class's
    images = torch.eye(3).repeat_interleave(2, dim=0)  # (6, 3): two images per class, class c along axis c
    image_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # both sentences are of class 0
    scores = score_sentences(text, torch.tensor([0, 0]), images, image_labels, math.log(100.0))
    # the best possible score with two positives is log 2 (half the softmax mass on each); the off-class sentence pays
    # the full scale gap, 100·(1 − 0), on top of it
    assert scores[0] == pytest.approx(math.log(2), abs=1e-4)
    assert scores[1] == pytest.approx(100 + math.log(2), abs=1e-3)


def test_score_errors():
    text, text_labels, images, image_labels = make_corpus(0)
    no_images = image_labels.clone()
    no_images[no_images == 2] = 1  # class 2 loses its only image
    with pytest.raises(ValueError, match=r"no selection image for the sentences' classes 2$"):
        score_sentences(text, text_labels, images, no_images, 4.6)
    with pytest.raises(ValueError, match="must share D"):
        score_sentences(text, text_labels, images[:, :4], image_labels, 4.6)
    with pytest.raises(ValueError, match="one label per embedding"):
        score_sentences(text, text_labels[:-1], images, image_labels, 4.6)
    with pytest.raises(ValueError, match="chunk_size"):
        score_sentences(text, text_labels, images, image_labels, 4.6, chunk_size=0)


# --- select_anchors


def naive_select(scores, labels, num_classes, m, strategy):
    rows = []
    for c in range(num_classes):
        members = [i for i, y in enumerate(labels) if y == c]  # corpus order
        if strategy == "anss":
            members = sorted(members, key=lambda i: (scores[i], i))  # ascending score, ties in corpus order
        kept = members[:m]
        rows.append(kept + [-1] * (m - len(kept)))
    return rows


@pytest.mark.parametrize("strategy", ["anss", "cutoff"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_select_matches_naive_sort(strategy, m):
    generator = torch.Generator().manual_seed(m)
    labels = torch.randint(0, 5, (60,), generator=generator)
    labels[labels == 4] = 3
    labels[:2] = 4  # class 4 has 2 sentences: padded when m > 2
    scores = torch.randint(0, 6, (60,), generator=generator).float() / 2  # few distinct values: many ties
    indices, mask = select_anchors(scores, labels, 5, m, strategy=strategy)
    expected = naive_select(scores.tolist(), labels.tolist(), 5, m, strategy)
    assert indices.dtype == torch.long and mask.dtype == torch.bool and indices.shape == (5, m)
    assert indices.tolist() == expected
    assert mask.tolist() == [[i >= 0 for i in row] for row in expected]
    if m == 8:
        assert mask[4].sum() == 2 and (indices[4, 2:] == -1).all()


def test_anss_keeps_lowest_scores_in_ascending_order():
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 1])
    scores = torch.tensor([5.0, 1.0, 2.0, 9.0, 0.5, 2.0, 3.0])
    indices, mask = select_anchors(scores, labels, 2, 3)
    assert indices.tolist() == [[2, 5, 0], [4, 1, 6]]  # 2.0 ties: index 2 before 5
    assert mask.all()


def test_random_selection():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 6)[torch.randperm(18, generator=torch.Generator().manual_seed(1))]
    m = 4
    first, first_mask = select_anchors(None, labels, 3, m, strategy="random", seed=7)
    again, _ = select_anchors(None, labels, 3, m, strategy="random", seed=7)
    assert torch.equal(first, again)
    draws = [select_anchors(None, labels, 3, m, strategy="random", seed=s)[0] for s in range(300)]
    assert any(not torch.equal(first, other) for other in draws)
    for c, n in enumerate([10, 2, 6]):
        real = first[c][first_mask[c]].tolist()
        assert len(real) == min(m, n) and len(set(real)) == len(real)
        assert real == sorted(real)  # corpus order
        assert all(labels[i] == c for i in real)
        assert first[c][~first_mask[c]].tolist() == [-1] * (m - len(real))
    # without replacement and uniform: each sentence of class 0 is kept in about m / n = 40% of the draws
    members = (labels == 0).nonzero().flatten().tolist()
    frequency = [sum(i in d[0].tolist() for d in draws) / len(draws) for i in members]
    assert all(abs(f - 0.4) < 0.12 for f in frequency)
    assert all(sorted(d[1][:2].tolist()) == (labels == 1).nonzero().flatten().tolist() for d in draws[:5])


def test_select_errors():
    labels = torch.tensor([0, 0, 2, 2])
    with pytest.raises(ValueError, match=r"no sentence for the classes 1$"):
        select_anchors(None, labels, 3, 2, strategy="cutoff")
    with pytest.raises(ValueError, match="allowed: anss, cutoff, random"):
        select_anchors(None, labels, 3, 2, strategy="best")
    with pytest.raises(ValueError, match="needs the sentence scores"):
        select_anchors(None, torch.tensor([0, 1]), 2, 2)
    with pytest.raises(ValueError, match=r"scores must have shape \(2,\)"):
        select_anchors(torch.zeros(3), torch.tensor([0, 1]), 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        select_anchors(torch.zeros(2), torch.tensor([0, 2]), 2, 2)
    with pytest.raises(ValueError, match="NaN"):
        select_anchors(torch.tensor([0.0, math.nan]), torch.tensor([0, 1]), 2, 2)


# --- report


def test_report_lists_anchors_and_least_visual_sentences():
    class_names = ["lion", "goldfish"]
    sentences = [
        "a photo of a lion .",
        "640 BC, now in the British Museum.",
        "females favour males with dense,\n dark manes",
        "a photo of a goldfish .",
        "the goldfish is orange",
        "goldfish were first bred in China",
    ]
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([4.2, 9.89, 3.66, 2.0, 1.5, 7.25])
    indices, mask = select_anchors(scores, labels, 2, 2)
    report = anchor_report(class_names, sentences, labels, scores, indices, mask, num_worst=5)
    assert "## 0: lion" in report and "## 1: goldfish" in report
    lion = report.split("## 1: goldfish")[0]
    assert "1. `3.660` females favour males with dense, dark manes" in lion
    assert "2. `4.200` a photo of a lion ." in lion
    worst = lion.split("not kept")[1]
    assert "`9.890` 640 BC, now in the British Museum." in worst and "manes" not in worst
    assert "1. `1.500` the goldfish is orange" in report and "`7.250` goldfish were first bred" in report

    cutoff_indices, cutoff_mask = select_anchors(None, labels, 2, 2, strategy="cutoff")
    plain = anchor_report(class_names, sentences, labels, None, cutoff_indices, cutoff_mask)
    assert "1. a photo of a lion ." in plain and "2. 640 BC, now in the British Museum." in plain
    assert "`" not in plain and "dense" not in plain

    all_kept = anchor_report(class_names, sentences, labels, scores, *select_anchors(scores, labels, 2, 5))
    assert "(every sentence was kept)" in all_kept

    with pytest.raises(ValueError, match="class names"):
        anchor_report(["lion"], sentences, labels, scores, indices, mask)


# --- embed_and_select_anchors: the per-chunk choice made at run time equals select_anchors' rule


@pytest.mark.parametrize("chunk_sentences", [1, 5, 10_000])
def test_embed_and_select_equals_select_anchors_on_the_embedded_scores(tiny_clip_dir, chunk_sentences):
    """The run-time selection keeps each class's M best within its chunk; recomputed here independently: every
    sentence embedded at once, scored, then `select_anchors`' stable sort over the whole corpus."""
    model = VLLTRModel.from_pretrained(tiny_clip_dir).eval()
    generator = torch.Generator().manual_seed(0)
    sizes = [3, 7, 1, 12]  # class 2 has fewer sentences than M (padded)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])  # grouped by class, as a corpus is
    input_ids = torch.randint(2, 100, (len(labels), 9), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 0, 1  # SOT ... EOT of the tiny tokenizer
    tokens = TokenizedCorpus(input_ids, torch.ones_like(input_ids), 0)
    image_labels = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    image_embeds = torch.randn(len(image_labels), model.config.projection_dim, generator=generator)

    indices, mask, scores, anchors = embed_and_select_anchors(
        model, tokens, labels, image_embeds, image_labels, 4, 5, chunk_sentences=chunk_sentences, show_progress=False
    )

    with torch.no_grad():
        text = model.get_text_features(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        text = getattr(text, "pooler_output", text)
    expected_scores = score_sentences(text, labels, image_embeds, image_labels, model.clip.logit_scale.detach())
    expected_indices, expected_mask = select_anchors(expected_scores, labels, 4, 5, "anss")
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, expected_indices) and torch.equal(mask, expected_mask)
    torch.testing.assert_close(anchors[mask], text[expected_indices[expected_mask]], rtol=1e-5, atol=1e-5)
    assert not anchors[~mask].any()  # padded slots stay zero

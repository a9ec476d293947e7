"""Tests for training/data.py: the long-tail sampler, transforms and collators. Expectations are written out by
hand or computed with naive loops."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training.corpus import build_class_corpus, tokenize_corpus
from training.data import (
    CVLPCollator,
    LongTailSampler,
    MixupCutmixCollator,
    ProcessorTransform,
    _sample_beta,
    eval_collator,
    eval_image_processor,
    one_hot_smoothed,
    train_transform,
)
from training.splits import ImageDataset, check_labels, read_class_names, read_image_list

# The CLIP normalisation constants, typed in from the OpenAI CLIP repository (not imported from the module).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def random_rgb(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def check_read(list_file, root, num_classes: int):
    """A split file read and its labels checked against `num_classes`, as `load_labelled_split` does."""
    samples = read_image_list(list_file, root)
    check_labels(samples, num_classes)
    return samples


# ----------------------------------------------------------------------------------------------------------------------
# LongTailSampler
# ----------------------------------------------------------------------------------------------------------------------

COUNTS = [100, 25, 4, 1]  # sqrt: 10, 5, 2, 1


def long_tail_labels():
    labels = []
    for c, n in enumerate(COUNTS):
        labels += [c] * n
    rng = np.random.default_rng(0)
    return rng.permutation(labels)  # classes interleaved, so index order tells nothing


def test_sampler_sqrt_class_frequencies_and_uniform_within_class():
    labels = long_tail_labels()
    draws = 100_000
    sampler = LongTailSampler(labels, "sqrt", num_samples=draws, seed=3)
    indices = np.array([i for i, _ in sampler])
    assert len(indices) == draws == len(sampler)
    observed = np.bincount(labels[indices], minlength=4)
    roots = [math.sqrt(n) for n in COUNTS]
    expected_p = [r / sum(roots) for r in roots]  # 10/18, 5/18, 2/18, 1/18
    chi2 = 0.0
    for c in range(4):
        p = expected_p[c]
        se = math.sqrt(p * (1 - p) / draws)
        assert abs(observed[c] / draws - p) < 3 * se, (c, observed[c] / draws, p)
        chi2 += (observed[c] - draws * p) ** 2 / (draws * p)
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, 99.9 %
    # within class 0, each of its 100 images equally likely
    members = np.flatnonzero(labels == 0)
    per_image = np.array([np.sum(indices == m) for m in members])
    expected = observed[0] / len(members)
    assert ((per_image - expected) ** 2 / expected).sum() < 148.2  # chi-square, 99 d.o.f., 99.9 %
    # all images of the tail class are drawn, and nothing outside the dataset
    assert indices.min() >= 0 and indices.max() < len(labels)


def test_sampler_class_mode_balances_classes():
    labels = long_tail_labels()
    draws = 40_000
    indices = np.array([i for i, _ in LongTailSampler(labels, "class", num_samples=draws, seed=1)])
    observed = np.bincount(labels[indices], minlength=4) / draws
    se = math.sqrt(0.25 * 0.75 / draws)
    assert np.all(np.abs(observed - 0.25) < 3 * se), observed


def test_sampler_instance_mode_is_a_permutation_and_default_length_is_dataset_size():
    labels = long_tail_labels()
    sampler = LongTailSampler(labels, "instance", seed=5)
    items = list(sampler)
    assert len(sampler) == len(items) == len(labels)
    assert sorted(i for i, _ in items) == list(range(len(labels)))
    assert [i for i, _ in items] != list(range(len(labels)))  # shuffled
    sqrt_default = LongTailSampler(labels, "sqrt")
    assert len(sqrt_default) == len(list(sqrt_default)) == len(labels)


def test_sampler_yields_index_seed_pairs_and_epochs():
    labels = long_tail_labels()
    sampler = LongTailSampler(labels, "sqrt", num_samples=64, seed=7)
    epoch0 = list(sampler)
    assert all(isinstance(i, int) and isinstance(s, int) and 0 <= s < 2**62 for i, s in epoch0)
    assert len({s for _, s in epoch0}) == 64  # per-draw seeds are distinct
    assert list(sampler) == epoch0  # iterating again without set_epoch repeats
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert [i for i, _ in epoch1] != [i for i, _ in epoch0] and [s for _, s in epoch1] != [s for _, s in epoch0]
    again = LongTailSampler(labels, "sqrt", num_samples=64, seed=7)
    again.set_epoch(1)
    assert list(again) == epoch1  # same (seed, epoch): same draws, in a fresh process too
    other_seed = LongTailSampler(labels, "sqrt", num_samples=64, seed=8)
    assert list(other_seed) != epoch0


def test_sampler_rejects_unknown_mode():
    with pytest.raises(ValueError, match="sampling mode must be one of"):
        LongTailSampler([0, 1], "balanced")


@pytest.mark.parametrize("mode, batch_size", [("sqrt", 4), ("instance", 5)])
def test_sampler_shards_are_disjoint_and_cover_the_global_sequence(mode, batch_size):
    from accelerate.data_loader import BatchSamplerShard

    labels = long_tail_labels()  # 130 images
    sampler = LongTailSampler(labels, mode, num_samples=96 if mode == "sqrt" else None, seed=2)
    sampler.set_epoch(3)
    loader = torch.utils.data.DataLoader(
        list(range(len(labels))), sampler=sampler, batch_size=batch_size, collate_fn=lambda x: x
    )
    global_batches = list(loader.batch_sampler)
    expected = list(sampler)
    assert [item for batch in global_batches for item in batch] == expected
    shards = [
        list(BatchSamplerShard(loader.batch_sampler, num_processes=2, process_index=i, split_batches=False))
        for i in range(2)
    ]
    assert len(global_batches) % 2 == 0  # an even number of batches: no padding from the start of the epoch
    assert shards[0] == global_batches[0::2] and shards[1] == global_batches[1::2]
    # positions are disjoint and together cover the sequence, in order
    positions = {0: set(), 1: set()}
    for b in range(len(global_batches)):
        rank = b % 2
        positions[rank].update(range(b * batch_size, (b + 1) * batch_size))
    assert positions[0].isdisjoint(positions[1])
    assert positions[0] | positions[1] == set(range(len(expected)))
    interleaved = [item for pair in zip(shards[0], shards[1]) for batch in pair for item in batch]
    assert interleaved == expected


def test_sampler_feeds_a_data_loader_end_to_end(lt_dataset, tmp_path, tokenizer):
    samples = check_read(lt_dataset["train"], lt_dataset["root"], 4)
    dataset = ImageDataset(samples, train_transform(32, rand_augment=False))
    corpus = build_class_corpus(read_class_names(lt_dataset["classes"]), lt_dataset["corpus"])
    tokens = tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path)
    sampler = LongTailSampler(dataset.labels, "sqrt", num_samples=8, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=4, collate_fn=CVLPCollator(tokens, corpus.labels)
    )
    batches = list(loader)
    assert len(batches) == 2
    draws = list(sampler)
    for b, batch in enumerate(batches):
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
        assert batch["labels"].tolist() == [int(dataset.labels[i]) for i, _ in draws[4 * b : 4 * b + 4]]
        assert corpus.labels[batch["sentence_ids"].numpy()].tolist() == batch["labels"].tolist()
    assert torch.equal(batches[0]["pixel_values"][0], dataset[draws[0]]["pixel_values"])


# ----------------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------------


def test_eval_image_processor_224_settings():
    processor = eval_image_processor(224)
    # `size` is the model's input size, as in CLIP's own processor (the stock example script reads it so)
    assert processor.size == {"shortest_edge": 224}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert int(processor.resample) == int(Image.Resampling.BICUBIC)
    assert processor.do_center_crop and processor.do_normalize and processor.do_resize
    assert np.allclose(processor.image_mean, MEAN) and np.allclose(processor.image_std, STD)


@pytest.mark.parametrize("image_size, short_side", [(224, 256), (32, 36), (384, 438), (28, 32)])
def test_eval_image_processor_resizes_to_the_official_short_side(image_size, short_side):
    """The official `int(256 / 224 * input_size)` resize, then the `image_size` centre crop."""
    processor = eval_image_processor(image_size)
    image = Image.new("RGB", (3 * image_size, 2 * image_size), (10, 20, 30))
    resized = processor(images=image, do_center_crop=False, return_tensors="pt")["pixel_values"]
    assert tuple(resized.shape[-2:]) == (short_side, int(short_side * 1.5))
    assert processor(images=image, return_tensors="pt")["pixel_values"].shape[-2:] == (image_size, image_size)


def test_eval_image_processor_equals_a_clip_processor_resizing_to_the_short_side():
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    for image_size, short_side in ((224, 256), (32, 36)):
        clip = CLIPImageProcessor(
            size={"shortest_edge": short_side},
            resample=Image.Resampling.BICUBIC,
            crop_size={"height": image_size, "width": image_size},
            image_mean=MEAN,
            image_std=STD,
        )
        for shape in ((300, 400, 3), (image_size + 7, image_size + 90, 3)):
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            torch.testing.assert_close(
                ProcessorTransform(eval_image_processor(image_size))(image), ProcessorTransform(clip)(image)
            )


def test_eval_image_processor_output_resize_crop_and_normalisation():
    # 300 (high) x 500 (wide), white, with black bands that only "resize short side to 256, crop 224" removes:
    # 12 rows at the top (10.2 rows after resizing, crop starts 16 rows down) and 100 columns on the left
    # (85 columns after resizing, the crop starts about 101 columns in)
    array = np.full((300, 500, 3), 255, dtype=np.uint8)
    array[:12] = 0
    array[:, :100] = 0
    out = ProcessorTransform(eval_image_processor(224))(Image.fromarray(array))
    assert out.shape == (3, 224, 224)
    white = torch.tensor([(1.0 - m) / s for m, s in zip(MEAN, STD)])[:, None, None]
    assert torch.allclose(out, white.expand_as(out), atol=0.05)
    # a flat colour checks rescaling and CLIP mean / std
    flat = np.zeros((300, 500, 3), dtype=np.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 128, 64, 32
    out = ProcessorTransform(eval_image_processor(224))(Image.fromarray(flat))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((128, 64, 32), MEAN, STD)])[:, None, None]
    assert torch.allclose(out, expected.expand_as(out), atol=1e-3)


def test_eval_image_processor_converts_grayscale():
    out = ProcessorTransform(eval_image_processor(32))(Image.new("L", (50, 40), 255))
    assert out.shape == (3, 32, 32)


def test_train_transform_output():
    transform = train_transform(32)
    torch.manual_seed(0)
    out = transform(random_rgb((50, 40)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    plain = train_transform(32, crop_scale=(1.0, 1.0), hflip=0, rand_augment=False, random_erasing=0)
    image = Image.new("RGB", (40, 40), (128, 64, 32))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((128, 64, 32), MEAN, STD)])[:, None, None]
    assert torch.allclose(plain(image), expected.expand(3, 32, 32), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# CVLPCollator
# ----------------------------------------------------------------------------------------------------------------------


def features_for(labels, seeds, size=4):
    return [
        {"pixel_values": torch.full((3, size, size), float(i)), "labels": int(y), "sample_seed": s}
        for i, (y, s) in enumerate(zip(labels, seeds))
    ]


@pytest.fixture
def lt_corpus_tokens(lt_dataset, tokenizer, tmp_path):
    corpus = build_class_corpus(read_class_names(lt_dataset["classes"]), lt_dataset["corpus"])
    return corpus, tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path)


def test_cvlp_collator_sentences_belong_to_the_class_and_are_trimmed(lt_corpus_tokens):
    corpus, tokens = lt_corpus_tokens
    collator = CVLPCollator(tokens, corpus.labels)
    labels = [0, 3, 3, 1, 2, 0, 1]
    seeds = [11, 2**61 + 3, 5, 987654321, 42, 7, 2**40]
    batch = collator(features_for(labels, seeds))
    ids = batch["sentence_ids"].tolist()
    assert batch["labels"].tolist() == labels
    assert [int(corpus.labels[i]) for i in ids] == labels
    for i, y in zip(ids, labels):  # an index inside the class's block
        start, end = corpus.offsets[y], corpus.offsets[y + 1]
        assert start <= i < end
    lengths = [int(tokens.attention_mask[i].sum()) for i in ids]
    length = max(lengths)
    assert batch["input_ids"].shape == (7, length) and batch["attention_mask"].shape == (7, length)
    for row, i in enumerate(ids):
        assert batch["input_ids"][row].tolist() == tokens.input_ids[i, :length].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * lengths[row] + [0] * (length - lengths[row])
        assert tokens.attention_mask[i, length:].sum() == 0  # nothing real was cut off
    assert torch.equal(batch["pixel_values"][:, 0, 0, 0], torch.arange(7, dtype=torch.float32))
    again = collator(features_for(labels, seeds))
    assert torch.equal(again["sentence_ids"], batch["sentence_ids"])
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_cvlp_collator_draws_cover_each_class_pool_uniformly(tmp_path, tokenizer):
    pools = {"a": ["A one.", "A two.", "A three."], "b": ["B one.", "B two."]}
    corpus = build_class_corpus(list(pools), write(tmp_path / "corpus.json", json.dumps(pools)), use_templates=False)
    collator = CVLPCollator(tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path), corpus.labels)
    rng = np.random.default_rng(0)
    seeds = [int(s) for s in rng.integers(0, 2**62, size=6000)]
    labels = [k % 2 for k in range(6000)]
    ids = collator(features_for(labels, seeds, size=1))["sentence_ids"].numpy()
    assert (corpus.labels[ids] == np.array(labels)).all()
    for c, n in ((0, 3), (1, 2)):
        mine = ids[np.array(labels) == c]
        counts = np.bincount(mine - corpus.offsets[c], minlength=n)
        assert len(counts) == n
        expected = len(mine) / n
        assert ((counts - expected) ** 2 / expected).sum() < 13.8  # chi-square, <= 2 d.o.f., 99.9 %


def test_cvlp_collator_without_seeds(lt_corpus_tokens):
    corpus, tokens = lt_corpus_tokens
    batch = CVLPCollator(tokens, corpus.labels)(features_for([2, 1, 0], [None, None, None]))
    assert [int(corpus.labels[i]) for i in batch["sentence_ids"]] == [2, 1, 0]


# ----------------------------------------------------------------------------------------------------------------------
# MixupCutmixCollator
# ----------------------------------------------------------------------------------------------------------------------


def mix_features(seeds, batch=6, size=12, labels=None):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    labels = list(range(batch)) if labels is None else labels
    return pixels, [{"pixel_values": pixels[b], "labels": labels[b], "sample_seed": seeds[b]} for b in range(batch)]


def naive_smoothed(labels, num_classes, eps):
    return torch.tensor(
        [[1 - eps + eps / num_classes if c == y else eps / num_classes for c in range(num_classes)] for y in labels]
    )


def test_mixup_collator_without_mixing_or_smoothing_keeps_class_ids():
    pixels, features = mix_features([1, 2, 3, 4, 5, 6], labels=[3, 1, 4, 1, 5, 0])
    out = MixupCutmixCollator(6, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)(features)
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == [3, 1, 4, 1, 5, 0]
    assert torch.equal(out["pixel_values"], pixels)


def test_mixup_collator_smoothing_only():
    pixels, features = mix_features([1, 2, 3, 4, 5, 6], labels=[3, 1, 4, 1, 5, 0])
    out = MixupCutmixCollator(7, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1)(features)
    assert torch.equal(out["pixel_values"], pixels)
    targets = out["labels"]
    assert targets.shape == (6, 7)
    assert torch.allclose(targets, naive_smoothed([3, 1, 4, 1, 5, 0], 7, 0.1))
    assert math.isclose(targets[0, 3].item(), 1 - 0.1 + 0.1 / 7, rel_tol=1e-6)
    assert math.isclose(targets[0, 0].item(), 0.1 / 7, rel_tol=1e-6)
    assert torch.allclose(one_hot_smoothed(torch.tensor([3, 1, 4, 1, 5, 0]), 7, 0.1), targets)


def test_mixup_collator_prob_zero_gives_smoothed_targets_only():
    pixels, features = mix_features([9, 8, 7, 6, 5, 4])
    out = MixupCutmixCollator(6, prob=0.0, label_smoothing=0.2)(features)
    assert torch.equal(out["pixel_values"], pixels)
    assert torch.allclose(out["labels"], naive_smoothed(range(6), 6, 0.2))


def recover_lambda(targets, eps, num_classes):
    on, off = 1 - eps + eps / num_classes, eps / num_classes
    return (targets[0, 0].item() - off) / (on - off)  # row 0 is label 0 mixed with label 5


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_images_and_targets_are_a_convex_combination(eps):
    num_classes = 6
    lambdas = []
    for trial in range(5):
        seeds = [100 * trial + k for k in range(6)]
        pixels, features = mix_features(seeds)
        collator = MixupCutmixCollator(num_classes, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=eps)
        out = collator(features)
        targets = out["labels"]
        assert torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
        lam = recover_lambda(targets, eps, num_classes)
        assert 0.0 <= lam <= 1.0
        y = naive_smoothed(range(6), num_classes, eps)
        y_flipped = naive_smoothed(list(reversed(range(6))), num_classes, eps)
        assert torch.allclose(targets, lam * y + (1 - lam) * y_flipped, atol=1e-6)
        expected = torch.stack([lam * pixels[b] + (1 - lam) * pixels[5 - b] for b in range(6)])
        assert torch.allclose(out["pixel_values"], expected, atol=1e-5)
        lambdas.append(lam)
    assert len({round(v, 6) for v in lambdas}) == 5  # λ changes with the seeds
    assert any(0.05 < v < 0.95 for v in lambdas)


def test_cutmix_pastes_one_box_and_lambda_is_the_unpasted_area():
    num_classes, size = 6, 12
    fractions = []
    for trial in range(12):
        seeds = [7 * trial + k + 1 for k in range(6)]
        pixels, features = mix_features(seeds, size=size)
        out = MixupCutmixCollator(num_classes, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)(features)
        mixed, targets = out["pixel_values"], out["labels"]
        flipped = torch.stack([pixels[5 - b] for b in range(6)])
        box = (mixed[0] != pixels[0]).any(0)  # (H, W)
        for b in range(6):
            assert torch.equal(mixed[b][:, box], flipped[b][:, box])
            assert torch.equal(mixed[b][:, ~box], pixels[b][:, ~box])
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])  # a rectangle
        for line in (rows, cols):
            hits = torch.nonzero(line).flatten().tolist()
            if hits:
                assert hits == list(range(hits[0], hits[-1] + 1))  # contiguous
        area = box.float().mean().item()
        lam = recover_lambda(targets, 0.1, num_classes)
        assert math.isclose(lam, 1 - area, abs_tol=1e-6)
        assert torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
        y = naive_smoothed(range(6), num_classes, 0.1)
        assert torch.allclose(targets, lam * y + (1 - lam) * y.flip(0), atol=1e-6)
        fractions.append(area)
    assert any(0 < a < 1 for a in fractions) and len(set(fractions)) > 3


def test_mixup_cutmix_switch_prob_selects_the_method():
    seeds = [3, 1, 4, 1, 5, 9]
    pixels, features = mix_features(seeds)
    always_mixup = MixupCutmixCollator(6, switch_prob=0.0)(features)["pixel_values"]
    assert (always_mixup != pixels).all()  # every pixel blended
    for trial in range(5):
        pixels, features = mix_features([s + trial for s in seeds])
        always_cutmix = MixupCutmixCollator(6, switch_prob=1.0)(features)["pixel_values"]
        assert (always_cutmix == pixels).any()  # a box: some pixels untouched
        unchanged = always_cutmix == pixels
        pasted = always_cutmix == pixels.flip(0)
        assert (unchanged | pasted).all()


def test_mixup_cutmix_is_deterministic_in_the_seeds():
    collator = MixupCutmixCollator(6)
    _, features = mix_features([5, 6, 7, 8, 9, 10])
    a, b = collator(features), collator(features)
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    outputs = [collator(mix_features([5 + t, 6, 7, 8, 9, 10])[1])["labels"] for t in range(1, 4)]
    assert any(not torch.equal(a["labels"], o) for o in outputs)
    # without seeds it still mixes (from the global RNG)
    _, unseeded = mix_features([None] * 6)
    out = collator(unseeded)
    assert torch.allclose(out["labels"].sum(1), torch.ones(6), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_sample_beta_moments(alpha):
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    draws = np.array([_sample_beta(alpha, generator) for _ in range(n)])
    assert ((draws > 0) & (draws < 1)).all()
    variance = 1 / (4 * (2 * alpha + 1))  # Beta(α, α)
    assert abs(draws.mean() - 0.5) < 3 * math.sqrt(variance / n)
    # standard error of the sample variance from the fourth moment of Beta(α, α)
    excess_kurtosis = -6 / (2 * alpha + 3)
    se_var = variance * math.sqrt((2 + excess_kurtosis) / n)
    assert abs(draws.var() - variance) < 3 * se_var
    # the shape matches numpy's Beta sampler at a few quantiles
    reference = np.random.default_rng(1).beta(alpha, alpha, size=200_000)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(np.quantile(draws, q) - np.quantile(reference, q)) < 0.02


def test_eval_collator():
    _, features = mix_features([None] * 6, labels=[5, 4, 3, 2, 1, 0])
    out = eval_collator(features)
    assert out["pixel_values"].shape == (6, 3, 12, 12) and out["labels"].tolist() == [5, 4, 3, 2, 1, 0]

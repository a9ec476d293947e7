"""Beyond the paper: the anchor sentences stored in the checkpoint, `explain` (the LGR attention of an image over the
anchors of a class, checked against the naive attention formula) and `add_classes` (a class from its description
alone, checked against the fusion rule written out, the closest-to-mean anchor rule, save/load and remote code)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_classifier, random_pixels, run_without_the_package
from transformers import AutoTokenizer, pipeline

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification
from modeling_vlltr.modeling_vlltr import anchors_closest_to_mean
from training.data import eval_image_processor

NEW_NAMES = ["purple star", "white cross"]
NEW_SENTENCES = [
    ["a purple star.", "a star shape in purple.", "five purple points.", "a small purple star on black.", "purple."],
    ["a white cross.", "two white bars crossing."],
]


def naive_attention(model: VLLTRForImageClassification, image_embeds: torch.Tensor, class_ids: list[int]):
    """A[b, m] = softmax over the real anchors m of class c_b of Q·K_m / √D, with Q = W_q LN_q(E_I[b]) and
    K_m = W_k LN_k(V[c_b, m]), one anchor at a time; 0 on padding."""
    branch = model.text_branch
    dim = model.anchor_text_embeds.shape[-1]
    rows = []
    for b, c in enumerate(class_ids):
        q = branch.query_proj(branch.query_norm(image_embeds[b]))  # (D,)
        keep = [m for m in range(model.anchor_mask.shape[1]) if model.anchor_mask[c, m]]
        scores = torch.stack(
            [q @ branch.key_proj(branch.key_norm(model.anchor_text_embeds[c, m])) / math.sqrt(dim) for m in keep]
        )
        row = torch.zeros(model.anchor_mask.shape[1], dtype=scores.dtype)
        row[keep] = torch.softmax(scores, dim=0)
        rows.append(row)
    return torch.stack(rows)  # (B, M)


@pytest.fixture
def tokenizer(tiny_clip_dir):
    return AutoTokenizer.from_pretrained(tiny_clip_dir)


def _with_sentences(model: VLLTRForImageClassification) -> VLLTRForImageClassification:
    counts = model.anchor_mask.sum(-1).tolist()
    model.set_anchor_sentences([[f"sentence {m} of class {c}" for m in range(n)] for c, n in enumerate(counts)])
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Anchor sentences in the checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def test_anchor_sentences_round_trip_and_are_optional(tmp_path):
    model = _with_sentences(make_classifier())
    model.save_pretrained(tmp_path / "with")
    loaded = VLLTRForImageClassification.from_pretrained(tmp_path / "with")
    assert loaded.config.anchor_sentences == model.config.anchor_sentences
    # a checkpoint written before the field existed has no key in config.json: it loads, text unknown
    make_classifier().save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config.pop("anchor_sentences", None)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = VLLTRForImageClassification.from_pretrained(tmp_path / "old").eval()
    assert old.config.anchor_sentences is None
    assert all(a["sentence"] is None for e in old.explain(random_pixels(2)) for a in e["anchors"])


def test_anchor_sentences_must_align_with_the_anchors():
    model = make_classifier()  # class 0 has 2 anchors, the last class 1
    with pytest.raises(ValueError, match=r"Class 0 \('class_0'\) has 2 anchors in anchor_mask but 3"):
        model.set_anchor_sentences([["a", "b", "c"]] + [[]] * 4)
    with pytest.raises(ValueError, match="one list of anchor sentences per class"):
        model.set_anchor_sentences([[]] * 3)
    with pytest.raises(ValueError, match="anchor_sentences must hold one list of sentences per class"):
        VLLTRConfig(id2label={0: "a", 1: "b"}, anchor_sentences=[["x"]])
    with pytest.raises(ValueError, match="text_only_classes must be distinct class ids in"):
        VLLTRConfig(id2label={0: "a", 1: "b"}, text_only_classes=[2])


# ----------------------------------------------------------------------------------------------------------------------
# explain: the LGR attention weights
# ----------------------------------------------------------------------------------------------------------------------


def test_attention_weights_match_the_naive_formula_and_give_the_text_logits():
    model = make_classifier(num_labels=5, num_anchors=4).double().eval()
    image_embeds = torch.randn(6, model.anchor_text_embeds.shape[-1], dtype=torch.float64)
    class_ids = [0, 4, 2, 1, 3, 0]  # class 0 padded (2 of 4 anchors), class 4 a single anchor
    with torch.no_grad():
        weights = model.text_branch.attention_weights(
            image_embeds, model.anchor_text_embeds, model.anchor_mask, torch.tensor(class_ids)
        )
        expected = naive_attention(model, image_embeds, class_ids)
        torch.testing.assert_close(weights, expected, rtol=1e-10, atol=1e-12)
        mask = model.anchor_mask[class_ids]
        torch.testing.assert_close(weights.sum(-1), torch.ones(6, dtype=torch.float64))
        assert bool((weights[~mask] == 0).all())
        # the same weights build G, and cos(E_I, G) scaled is the forward pass's P_T for that class
        g = (weights[..., None] * model.anchor_text_embeds[class_ids]).sum(1)  # (B, D)
        text_logits = model.text_branch(
            image_embeds, model.anchor_text_embeds, model.anchor_mask, model.clip.logit_scale.exp()
        )
        rebuilt = model.clip.logit_scale.exp() * F.cosine_similarity(image_embeds, g, dim=-1)
        torch.testing.assert_close(rebuilt, text_logits[torch.arange(6), class_ids], rtol=1e-10, atol=1e-10)


def test_explain_reports_the_prediction_and_ranks_the_anchors(tmp_path):
    model = _with_sentences(make_classifier()).eval()
    pixels = random_pixels(4)
    explanations = model.explain(pixels, top_k=3)
    with torch.no_grad():
        out = model(pixels)
        weights = model.text_branch.attention_weights(
            out.image_embeds, model.anchor_text_embeds, model.anchor_mask, out.logits.argmax(-1)
        )
    probabilities = out.logits.softmax(-1)
    for b, e in enumerate(explanations):
        c = int(out.logits[b].argmax())
        assert e["label"] == e["predicted_label"] == c and e["class_name"] == f"class_{c}"
        assert e["probability"] == pytest.approx(float(probabilities[b, c]), rel=1e-6)
        assert e["image_probability"] == pytest.approx(float(out.image_logits[b].softmax(-1)[c]), rel=1e-6)
        assert e["text_probability"] == pytest.approx(float(out.text_logits[b].softmax(-1)[c]), rel=1e-6)
        count = int(model.anchor_mask[c].sum())
        ranked = sorted(range(count), key=lambda m: -float(weights[b, m]))[:3]
        assert [a["slot"] for a in e["anchors"]] == ranked
        assert [a["sentence"] for a in e["anchors"]] == [f"sentence {m} of class {c}" for m in ranked]
        assert [a["weight"] for a in e["anchors"]] == pytest.approx([float(weights[b, m]) for m in ranked])
    # another class on request (e.g. the true one of a wrong prediction), and from the checkpoint alone
    model.save_pretrained(tmp_path)
    loaded = VLLTRForImageClassification.from_pretrained(tmp_path).eval()
    forced = loaded.explain(pixels, top_k=10, class_ids=[4, 4, 0, 0])
    assert [e["label"] for e in forced] == [4, 4, 0, 0]
    assert [len(e["anchors"]) for e in forced] == [1, 1, 2, 2]  # class 4 has one anchor, class 0 two
    assert forced[0]["anchors"][0] == {"slot": 0, "sentence": "sentence 0 of class 4", "weight": 1.0}
    with pytest.raises(ValueError, match=r"class_ids must hold one class id in \[0, 5\) per image \(4\)"):
        loaded.explain(pixels, class_ids=[0, 1, 2, 5])


# ----------------------------------------------------------------------------------------------------------------------
# add_classes
# ----------------------------------------------------------------------------------------------------------------------


def test_closest_to_mean_rule_matches_a_naive_loop():
    embeds = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    units = [e / e.norm() for e in embeds]
    centre = sum(units) / len(units)
    centre = centre / centre.norm()
    ranked = sorted(range(9), key=lambda i: -float(units[i] @ centre))
    assert anchors_closest_to_mean(embeds, 4).tolist() == ranked[:4]
    assert anchors_closest_to_mean(embeds, 20).tolist() == ranked


def test_added_classes_keep_old_logits_and_fuse_from_text(tokenizer):
    model = _with_sentences(make_classifier()).eval()
    old_sentences = [list(s) for s in model.config.anchor_sentences]
    pixels = random_pixels(4)
    with torch.no_grad():
        before = model(pixels)
    assert model.add_classes(NEW_NAMES, NEW_SENTENCES, tokenizer) == [5, 6]
    assert model.config.id2label[5] == "purple star" and model.config.label2id["white cross"] == 6
    assert model.config.text_only_classes == [5, 6]
    with torch.no_grad():
        after = model(pixels)
    # every existing class: the same image and text logits
    torch.testing.assert_close(after.image_logits[:, :5], before.image_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.text_logits[:, :5], before.text_logits, rtol=0, atol=1e-6)
    # the fusion rule written out: new classes take softmax(P_T); the old ones share the rest as before
    p_text = after.text_logits.double().softmax(-1)
    old_fused = before.logits.double().softmax(-1)
    expected = torch.cat([(1 - p_text[:, 5:].sum(-1, keepdim=True)) * old_fused, p_text[:, 5:]], dim=-1)
    torch.testing.assert_close(after.logits.double().softmax(-1), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(after.logits[:, :5].argsort(-1), before.logits.argsort(-1))

    # anchors: the embeddings of the sentences closest to the class mean, by the checkpoint's text tower
    with torch.no_grad():
        for k, sentences in enumerate(NEW_SENTENCES):
            enc = tokenizer(sentences, padding="max_length", max_length=77, return_tensors="pt")
            embeds = model.clip.get_text_features(**enc).pooler_output  # (n, D)
            chosen = anchors_closest_to_mean(embeds, 4)
            n = len(chosen)
            torch.testing.assert_close(model.anchor_text_embeds[5 + k, :n], embeds[chosen], rtol=1e-5, atol=1e-6)
            assert model.anchor_mask[5 + k].tolist() == [True] * n + [False] * (4 - n)
            assert model.config.anchor_sentences[5 + k] == [sentences[i] for i in chosen.tolist()]
    assert model.config.anchor_sentences[:5] == old_sentences
    explained = model.explain(pixels, class_ids=[5, 5, 6, 6])
    assert explained[0]["image_probability"] == 0.0
    assert explained[0]["text_probability"] == pytest.approx(float(p_text[0, 5]), rel=1e-5)
    assert explained[0]["anchors"][0]["sentence"] in NEW_SENTENCES[0]


def test_bad_new_classes_are_refused_with_one_line_and_change_nothing(tokenizer, tiny_clip_dir):
    from training.standin_clip import build_char_tokenizer

    model = make_classifier().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    small_vocab = build_char_tokenizer()
    small_vocab.add_tokens(["<extra>"])
    cases = [
        (["class_2"], [["a sentence"]], tokenizer, r"Class 'class_2' already exists in this checkpoint \(label 2\)"),
        (["new"], [[]], tokenizer, "Class 'new' has no sentences"),
        (["new", "new"], [["a"], ["b"]], tokenizer, "Class 'new' is given twice"),
        (["new"], [["word " * 40]], tokenizer, r"Sentence 1 of class 'new' is \d+ tokens long; the text tower takes "),
        (["new"], [["a sentence"]], small_vocab, "The tokenizer has 515 tokens but this checkpoint's text tower has"),
    ]
    for names, sentences, tok, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            model.add_classes(names, sentences, tok)
        assert "\n" not in str(error.value)
        assert model.config.to_dict() == config
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_grown_model_round_trips_pipeline_and_remote_code(tokenizer, tmp_path):
    model = make_classifier().eval()
    model.add_classes(NEW_NAMES, NEW_SENTENCES, tokenizer)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor = eval_image_processor(32)
    processor.save_pretrained(ckpt)
    pixels = random_pixels(3)
    with torch.no_grad():
        expected = model(pixels).logits
    loaded = VLLTRForImageClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, expected)
    assert loaded.config.text_only_classes == [5, 6]
    assert loaded.config.anchor_sentences == model.config.anchor_sentences
    results = pipeline("image-classification", model=str(ckpt), device="cpu")(_image(), top_k=7)
    assert {r["label"] for r in results} == set(model.config.id2label.values())
    assert abs(sum(r["score"] for r in results) - 1.0) < 1e-5

    torch.save({"pixels": pixels, "logits": expected}, tmp_path / "expected.pt")
    result = run_without_the_package(
        f"""
        from transformers import AutoModelForImageClassification
        saved = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForImageClassification.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(saved["pixels"]).logits, saved["logits"], rtol=1e-6, atol=1e-6)
        explained = model.explain(saved["pixels"], class_ids=[5, 6, 0])
        assert explained[0]["class_name"] == "purple star" and explained[0]["anchors"][0]["sentence"], explained
        print("REMOTE-OK")
        """,
        cwd=tmp_path,
    )
    assert "REMOTE-OK" in result.stdout, result.stdout + result.stderr


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 40), (200, 30, 200))


def test_pick_examples_takes_up_to_half_wrong_in_split_order():
    from training.explain import pick_examples

    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    predictions = np.array([0, 9, 2, 9, 9, 5, 6, 9])  # wrong at 1, 3, 4, 7
    assert pick_examples(predictions, labels, 4) == [0, 1, 2, 3]
    assert pick_examples(predictions, labels, 5) == [0, 1, 2, 3, 4]
    assert pick_examples(predictions, labels, 20) == list(range(8))
    assert pick_examples(np.array([9, 9, 9, 3]), np.array([0, 1, 2, 3]), 3) == [0, 1, 3]  # one correct: more wrong

"""VLLTRConfig, VLLTRModel and VLLTRForImageClassification: the LGR head against a naive loop written from the
equations, save/load round trips, Auto classes and pipelines (in-process and as remote code), and bad input."""

import inspect
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IMAGE_SIZE,
    PROJECTION_DIM,
    make_classifier,
    random_pixels,
    run_without_the_package,
    tiny_clip_config,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPModel,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification, VLLTRModel
from training.data import eval_image_processor

# ----------------------------------------------------------------------------------------------------------------------
# Naive reference, straight from docs/method.md §3.2-3.3
# ----------------------------------------------------------------------------------------------------------------------


def naive_text_logits(model: VLLTRForImageClassification, image_embeds: torch.Tensor, detach_norm: bool = False):
    """P_T[b, c] = exp(logit_scale) · cos(E_I[b], G[b, c]) with G[b, c] = Σ_m softmax_m(Q[b]·K[c, m] / √D) V[c, m],
    Q = W_q LN_q(E_I), K = W_k LN_k(V), V = anchors; one (b, c) pair at a time."""
    branch = model.text_branch
    anchors, mask = model.anchor_text_embeds, model.anchor_mask
    num_classes, num_anchors, dim = anchors.shape
    scale = model.clip.logit_scale.detach().exp()
    rows = []
    for b in range(image_embeds.shape[0]):
        e = image_embeds[b]
        q = branch.query_proj(branch.query_norm(e))  # (D,)
        row = []
        for c in range(num_classes):
            keep = [m for m in range(num_anchors) if mask[c, m]]
            scores = torch.stack([q @ branch.key_proj(branch.key_norm(anchors[c, m])) / math.sqrt(dim) for m in keep])
            weights = torch.softmax(scores, dim=0)
            g = sum(w * anchors[c, m] for w, m in zip(weights, keep))  # G[b, c] (D,)
            g_norm = g.norm().detach() if detach_norm else g.norm()
            row.append(scale * (e @ g) / (e.norm() * g_norm))
        rows.append(torch.stack(row))
    return torch.stack(rows)  # (B, C)


def _grads(model, image_embeds, logits):
    params = [p for p in model.text_branch.parameters()]
    weights = torch.randn_like(logits, generator=torch.Generator().manual_seed(5))
    return torch.autograd.grad((logits * weights).sum(), [image_embeds] + params)


@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_text_branch_matches_naive_loop(detach_norm, dtype):
    model = make_classifier(num_labels=6, num_anchors=5, detach_anchor_norm=detach_norm).to(dtype)
    embeds = torch.randn(4, PROJECTION_DIM, dtype=dtype, generator=torch.Generator().manual_seed(3))

    fast_in = embeds.clone().requires_grad_()
    fast = model.text_branch(
        fast_in, model.anchor_text_embeds, model.anchor_mask, model.clip.logit_scale.detach().exp()
    )
    naive_in = embeds.clone().requires_grad_()
    naive = naive_text_logits(model, naive_in, detach_norm=detach_norm)

    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fast, naive, rtol=tol, atol=tol)
    for g_fast, g_naive in zip(_grads(model, fast_in, fast), _grads(model, naive_in, naive)):
        torch.testing.assert_close(g_fast, g_naive, rtol=tol * 10, atol=tol * 10)


def test_detached_norm_changes_gradient_not_value():
    plain, detached = make_classifier(), make_classifier(detach_anchor_norm=True)
    x = random_pixels()
    torch.testing.assert_close(plain(x).text_logits, detached(x).text_logits)
    g1 = torch.autograd.grad(plain(x).text_logits.sum(), plain.text_branch.query_proj.weight)[0]
    g2 = torch.autograd.grad(detached(x).text_logits.sum(), detached.text_branch.query_proj.weight)[0]
    assert not torch.allclose(g1, g2)


def test_forward_outputs_fusion_and_loss(tiny_classifier):
    model = tiny_classifier.eval()
    out = model(random_pixels(), labels=torch.tensor([0, 2, 4]))
    alpha = model.config.fusion_alpha
    fused = alpha * out.image_logits.softmax(-1) + (1 - alpha) * out.text_logits.softmax(-1)
    torch.testing.assert_close(out.logits.softmax(-1), fused)
    torch.testing.assert_close(out.logits.exp(), fused)  # logits is the log of a normalised probability
    expected_loss = F.cross_entropy(out.image_logits, torch.tensor([0, 2, 4])) + F.cross_entropy(
        out.text_logits, torch.tensor([0, 2, 4])
    )
    torch.testing.assert_close(out.loss, expected_loss)
    assert out.image_embeds.shape == (3, PROJECTION_DIM)
    # text branch: the frozen stage-1 scale times a cosine
    assert out.text_logits.abs().max() <= model.clip.logit_scale.exp() + 1e-4


def test_soft_labels_loss(tiny_classifier):
    targets = torch.softmax(torch.randn(3, 5), dim=-1)
    out = tiny_classifier(random_pixels(), labels=targets)
    expected = (
        -(targets * out.image_logits.log_softmax(-1)).sum(-1).mean()
        - (targets * out.text_logits.log_softmax(-1)).sum(-1).mean()
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_fusion_extremes(alpha):
    model = make_classifier(fusion_alpha=alpha).eval()
    out = model(random_pixels())
    branch = out.image_logits if alpha == 1.0 else out.text_logits
    torch.testing.assert_close(out.logits, branch.log_softmax(-1))


def test_identity_initialisation():
    config = VLLTRConfig(clip_config=tiny_clip_config(), id2label={0: "a", 1: "b"}, num_anchor_sentences=3)
    model = VLLTRForImageClassification(config)
    eye = torch.eye(PROJECTION_DIM)
    assert torch.equal(model.text_branch.query_proj.weight, eye)
    assert torch.equal(model.text_branch.key_proj.weight, eye)
    assert torch.equal(model.text_branch.key_norm.weight, torch.ones(PROJECTION_DIM))
    assert model.text_branch.query_proj.bias is None and model.text_branch.key_proj.bias is None
    assert model.image_branch.fc1.out_features == 4 * PROJECTION_DIM and model.image_branch.fc2.out_features == 2


def _expected_statistics(model):
    anchors, mask = model.anchor_text_embeds, model.anchor_mask
    variance, mean = torch.var_mean(anchors, dim=-1, unbiased=False)
    bias = torch.zeros(mask.shape, dtype=anchors.dtype).masked_fill(~mask, float("-inf"))
    return mean, torch.rsqrt(variance + model.text_branch.key_norm.eps), anchors @ anchors.transpose(1, 2), bias


def _assert_statistics_follow_anchors(model):
    branch = model.text_branch
    held = (branch.anchor_mean, branch.anchor_inv_std, branch.anchor_gram, branch.anchor_mask_bias)
    for got, expected in zip(held, _expected_statistics(model)):
        torch.testing.assert_close(got, expected)


def test_anchor_statistics_are_buffers_refreshed_when_anchors_change(tiny_classifier, tmp_path):
    model = tiny_classifier.eval()
    calls = []
    original = torch.bmm

    def counting_bmm(a, b):
        calls.append(tuple(a.shape))
        return original(a, b)

    gram_shape = tuple(model.anchor_text_embeds.shape)
    torch.bmm = counting_bmm
    try:
        for seed in range(3):
            model(random_pixels(seed=seed))
        assert gram_shape not in calls, "the per-class Gram matrices must be computed with the anchors, not per batch"
        model.set_anchor_embeddings(torch.randn_like(model.anchor_text_embeds))
        assert calls.count(gram_shape) == 1, "new anchors must refresh the statistics"
    finally:
        torch.bmm = original
    _assert_statistics_follow_anchors(model)
    assert not any(k.startswith("text_branch.anchor_") for k in model.state_dict()), "statistics are not saved"

    other = make_classifier(seed=7)  # load_state_dict (Trainer's best-model reload, resume) refreshes them too
    other.load_state_dict(model.state_dict())
    _assert_statistics_follow_anchors(other)
    model.save_pretrained(tmp_path)
    loaded = VLLTRForImageClassification.from_pretrained(tmp_path)
    _assert_statistics_follow_anchors(loaded)
    torch.testing.assert_close(loaded.eval()(random_pixels()).logits, model(random_pixels()).logits)


def test_frozen_vision_tower_builds_no_graph(tiny_classifier):
    model = tiny_classifier
    model.clip.requires_grad_(False)
    out = model(random_pixels(), labels=torch.tensor([0, 1, 2]))
    assert not out.image_embeds.requires_grad
    out.loss.backward()
    assert model.image_branch.fc1.weight.grad is not None
    model.clip.vision_model.requires_grad_(True)
    assert model(random_pixels()).image_embeds.requires_grad


def test_fc_head():
    model = make_classifier(head_type="fc")
    assert not hasattr(model, "anchor_text_embeds")
    out = model(random_pixels(), labels=torch.tensor([1, 1, 0]))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([1, 1, 0])))
    assert out.text_logits is None
    with pytest.raises(ValueError, match="head_type='lgr'"):
        model.set_anchor_embeddings(torch.zeros(5, 4, PROJECTION_DIM))


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fusion_alpha=1.5), r"fusion_alpha must lie in \[0, 1\]"),
        (dict(fusion_alpha="0.2"), "fusion_alpha must be a number"),
        (dict(head_type="knn"), r"head_type must be one of \('lgr', 'fc', 'cosine'\)"),
        (dict(num_anchor_sentences=0), "num_anchor_sentences must be an integer >= 1"),
        (dict(mlp_ratio=0), "mlp_ratio must be an integer >= 1"),
    ],
)
def test_config_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VLLTRConfig(clip_config=tiny_clip_config(), **kwargs)


def test_config_validates_overrides_at_load(tmp_path):
    VLLTRConfig(clip_config=tiny_clip_config()).save_pretrained(tmp_path)
    assert VLLTRConfig.from_pretrained(tmp_path, fusion_alpha=0.7).fusion_alpha == 0.7
    with pytest.raises(ValueError, match="fusion_alpha"):
        VLLTRConfig.from_pretrained(tmp_path, fusion_alpha=7)


def test_config_wraps_a_clip_checkpoint_and_refuses_others(tiny_clip_dir, tmp_path):
    config = VLLTRConfig.from_pretrained(tiny_clip_dir, id2label={0: "x", 1: "y", 2: "z"})
    assert config.model_type == "vlltr" and config.num_labels == 3
    clip = CLIPConfig.from_pretrained(tiny_clip_dir)
    assert config.clip_config.vision_config.to_dict() == clip.vision_config.to_dict()
    assert config.clip_config.text_config.to_dict() == clip.text_config.to_dict()
    assert config.projection_dim == clip.projection_dim == PROJECTION_DIM
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="holds a 'vit' config"):
        VLLTRConfig.from_pretrained(tmp_path)


def test_config_round_trip_with_nested_clip(tmp_path):
    config = VLLTRConfig(clip_config=tiny_clip_config().to_dict(), id2label={0: "a", 1: "b"}, fusion_alpha=0.7)
    config.save_pretrained(tmp_path)
    loaded = VLLTRConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.clip_config, CLIPConfig)
    assert loaded.fusion_alpha == 0.7 and loaded.id2label == {0: "a", 1: "b"}
    assert loaded.projection_dim == PROJECTION_DIM


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_bad_anchor_shapes(tiny_classifier):
    model = tiny_classifier
    with pytest.raises(
        ValueError, match=r"\(num_labels=5, num_anchor_sentences=4, projection_dim=16\), got \(5, 4, 32\)"
    ):
        model.set_anchor_embeddings(torch.randn(5, 4, 32))
    with pytest.raises(ValueError, match="clip_config.projection_dim"):
        model.set_anchor_embeddings(torch.randn(5, 4, 32))
    with pytest.raises(ValueError, match="got \\(4, 4, 16\\)"):
        model.set_anchor_embeddings(torch.randn(4, 4, 16))
    with pytest.raises(ValueError, match="anchor_mask must have shape"):
        model.set_anchor_embeddings(torch.randn(5, 4, 16), torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no anchor for 1 class"):
        mask = torch.ones(5, 4, dtype=torch.bool)
        mask[2] = False
        model.set_anchor_embeddings(torch.randn(5, 4, 16), mask)
    nan = torch.randn(5, 4, 16)
    nan[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*class_3"):
        model.set_anchor_embeddings(nan)
    with pytest.raises(ValueError, match="Anchors of class 1"):
        model.set_anchor_embeddings([torch.randn(2, 16), torch.randn(6, 16)] + [torch.randn(1, 16)] * 3)


def test_anchor_list_is_padded_and_masked(tiny_classifier):
    lists = [torch.randn(n, PROJECTION_DIM) for n in (1, 4, 2, 3, 4)]
    tiny_classifier.set_anchor_embeddings(lists)
    assert tiny_classifier.anchor_mask.sum(-1).tolist() == [1, 4, 2, 3, 4]
    torch.testing.assert_close(tiny_classifier.anchor_text_embeds[2, :2], lists[2])
    assert tiny_classifier.anchor_text_embeds[2, 2:].abs().sum() == 0


def test_forward_refuses_unset_anchors():
    config = VLLTRConfig(clip_config=tiny_clip_config(), id2label={0: "a", 1: "b"}, num_anchor_sentences=3)
    with pytest.raises(ValueError, match="anchor_text_embeds are not set"):
        VLLTRForImageClassification(config)(random_pixels())


def test_bad_pixels_and_labels(tiny_classifier):
    model = tiny_classifier
    with pytest.raises(ValueError, match=r"3 channels.*got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match=r"must be 32x32.*got \(2, 3, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"shape \(batch_size, 3, 32, 32\), got \(3, 32, 32\)"):
        model(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got \[-1, 7\]"):
        model(random_pixels(), labels=torch.tensor([-1, 7, 2]))
    with pytest.raises(ValueError, match=r"labels must be class ids of shape \(3,\)"):
        model(random_pixels(), labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"Soft labels must have shape \(batch_size, num_labels\) = \(3, 5\)"):
        model(random_pixels(), labels=torch.rand(3, 4))


def test_checkpoint_with_bad_anchors_stops_at_load(tiny_classifier, tmp_path):
    tiny_classifier.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    weights["anchor_text_embeds"][1, 0, 0] = float("nan")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"anchor_text_embeds in {tmp_path} hold NaN"):
        VLLTRForImageClassification.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load, Auto classes, pipelines
# ----------------------------------------------------------------------------------------------------------------------


def test_round_trip_keeps_predictions_and_stores_anchors(tiny_classifier, tmp_path):
    model = tiny_classifier.eval()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {"anchor_text_embeds", "anchor_mask"} <= set(f.keys())
        torch.testing.assert_close(f.get_tensor("anchor_text_embeds"), model.anchor_text_embeds)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vlltr.VLLTRConfig",
        "AutoModel": "modeling_vlltr.VLLTRModel",
        "AutoModelForZeroShotImageClassification": "modeling_vlltr.VLLTRModel",
        "AutoModelForImageClassification": "modeling_vlltr.VLLTRForImageClassification",
    }
    assert {"modeling_vlltr.py", "configuration_vlltr.py"} <= set(os.listdir(tmp_path))
    x = random_pixels()
    for loader in (VLLTRForImageClassification, AutoModelForImageClassification):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is VLLTRForImageClassification
        assert torch.equal(loaded(x).logits, model(x).logits)
    # AutoModel is the base model, as in transformers (a ViT classifier checkpoint gives ViTModel): its CLIP
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is VLLTRModel
    for name, tensor in model.clip.state_dict().items():
        torch.testing.assert_close(base.clip.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_plain_clip_checkpoint_loads_into_vlltr_model(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model, info = VLLTRModel.from_pretrained(tiny_clip_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    clip_state = clip.state_dict()
    for name, tensor in model.clip.state_dict().items():
        assert torch.equal(tensor, clip_state[name]), name
    # the stage-2 classifier starts from the same CLIP weights; only the head and anchors are new
    classifier, info = VLLTRForImageClassification.from_pretrained(
        tiny_clip_dir, id2label={0: "a", 1: "b"}, num_anchor_sentences=2, output_loading_info=True
    )
    assert all(not k.startswith("clip.") for k in info["missing_keys"])
    assert torch.equal(classifier.clip.logit_scale, clip.logit_scale)


def test_vlltr_model_behaves_like_clip(tiny_clip_dir, tmp_path):
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    model = VLLTRModel.from_pretrained(tiny_clip_dir).eval()
    ids = torch.tensor([[0, 40, 41, 42, 1], [0, 50, 51, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    x = random_pixels(2)
    ours, theirs = (
        model(pixel_values=x, input_ids=ids, attention_mask=mask),
        clip(pixel_values=x, input_ids=ids, attention_mask=mask),
    )
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image)
    torch.testing.assert_close(ours.logits_per_text, theirs.logits_per_text)
    for ours_features, clip_features in (
        (model.get_image_features(x), clip.get_image_features(x)),
        (model.get_text_features(ids, mask), clip.get_text_features(ids, mask)),
    ):
        assert isinstance(ours_features, BaseModelOutputWithPooling)
        torch.testing.assert_close(ours_features.pooler_output, clip_features.pooler_output)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_vlltr.VLLTRModel"
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_vlltr.VLLTRModel"
    assert type(AutoModel.from_pretrained(tmp_path)) is VLLTRModel


def _photo():
    from matplotlib import cbook
    from PIL import Image

    return Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


def test_image_classification_pipeline_in_process(tiny_classifier, tmp_path):
    tiny_classifier.save_pretrained(tmp_path)
    processor = eval_image_processor(IMAGE_SIZE)
    processor.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    results = classifier(_photo(), top_k=5)
    assert abs(sum(r["score"] for r in results) - 1.0) < 1e-5
    with torch.no_grad():
        logits = tiny_classifier.eval()(processor(images=_photo(), return_tensors="pt")["pixel_values"]).logits
    assert results[0]["label"] == tiny_classifier.config.id2label[int(logits.argmax())]


def test_zero_shot_pipeline_on_stage1_checkpoint(tiny_clip_dir, tmp_path):
    from transformers import AutoTokenizer

    model = VLLTRModel.from_pretrained(tiny_clip_dir)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)
    eval_image_processor(IMAGE_SIZE).save_pretrained(tmp_path)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path), device="cpu")
    results = classifier(_photo(), candidate_labels=["cat", "dog", "woman"])
    assert sorted(r["label"] for r in results) == ["cat", "dog", "woman"]
    assert abs(sum(r["score"] for r in results) - 1.0) < 1e-5


def test_image_feature_extraction_pipeline_on_stage1_checkpoint(tiny_clip_dir, tmp_path):
    """Images alone through VLLTRModel give E_I / ‖E_I‖ first, so the stock pipeline returns image features."""
    model = VLLTRModel.from_pretrained(tiny_clip_dir).eval()
    model.save_pretrained(tmp_path)
    processor = eval_image_processor(IMAGE_SIZE)
    processor.save_pretrained(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), device="cpu")
    features = torch.tensor(extractor(_photo(), return_tensors=False))  # (1, D)
    with torch.no_grad():
        pixels = processor(images=_photo(), return_tensors="pt")["pixel_values"]
        expected = F.normalize(model.get_image_features(pixels).pooler_output, dim=-1)
    assert features.shape == (1, PROJECTION_DIM)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs pixel_values"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("head_type", ["lgr", "fc"])
def test_image_feature_extraction_pipeline_on_stage2_checkpoint(head_type, tmp_path, capfd):
    """AutoModel (what the pipeline loads) gives the base model for a classifier checkpoint too, so the stock
    pipeline returns that checkpoint's E_I / ‖E_I‖, not class scores; the head's tensors are left out quietly."""
    classifier = make_classifier(num_labels=4, head_type=head_type).eval()
    classifier.save_pretrained(tmp_path)
    processor = eval_image_processor(IMAGE_SIZE)
    processor.save_pretrained(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), device="cpu")
    assert type(extractor.model) is VLLTRModel
    features = torch.tensor(extractor(_photo(), return_tensors=False))
    with torch.no_grad():
        pixels = processor(images=_photo(), return_tensors="pt")["pixel_values"]
        expected = F.normalize(classifier.get_image_features(pixels).pooler_output, dim=-1)
    assert features.shape == (1, PROJECTION_DIM)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    capfd.readouterr()
    VLLTRModel.from_pretrained(tmp_path)
    assert "UNEXPECTED" not in "".join(capfd.readouterr())  # transformers' load report lists no head tensor


def test_remote_code_in_a_fresh_process_without_the_package(tiny_classifier, tmp_path):
    """The checkpoint loads with trust_remote_code=True in a process where `modeling_vlltr` cannot be imported."""
    ckpt = tmp_path / "ckpt"
    model = tiny_classifier.eval()
    model.save_pretrained(ckpt)
    processor = eval_image_processor(IMAGE_SIZE)
    processor.save_pretrained(ckpt)
    pixels = processor(images=_photo(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixels).logits
    torch.save({"pixels": pixels, "logits": expected}, tmp_path / "expected.pt")
    result = run_without_the_package(
        f"""
        from transformers import AutoModel, AutoModelForImageClassification, pipeline
        from matplotlib import cbook
        from PIL import Image
        saved = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        ckpt = {str(ckpt)!r}
        base = AutoModel.from_pretrained(ckpt, trust_remote_code=True)
        assert type(base).__name__ == "VLLTRModel", type(base)
        assert "transformers_modules" in type(base).__module__, type(base).__module__
        model = AutoModelForImageClassification.from_pretrained(ckpt, trust_remote_code=True).eval()
        assert type(model).__name__ == "VLLTRForImageClassification", type(model)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        with torch.no_grad():
            got = model(saved["pixels"]).logits
            # equal up to float32 rounding (memory alignment can change the SIMD summation order)
            torch.testing.assert_close(got, saved["logits"], rtol=1e-6, atol=1e-6)
        clf = pipeline("image-classification", model=ckpt, trust_remote_code=True, device="cpu")
        photo = Image.open(cbook.get_sample_data("grace_hopper.jpg"))
        results = clf(photo, top_k=model.config.num_labels)
        assert abs(sum(r["score"] for r in results) - 1.0) < 1e-5, results
        assert {{r["label"] for r in results}} == set(model.config.id2label.values())
        assert results[0]["label"] == model.config.id2label[int(saved["logits"].argmax())]
        print("REMOTE-OK")
        """,
        cwd=tmp_path,
    )
    assert "REMOTE-OK" in result.stdout, result.stdout + result.stderr


# -- transformers' forward conventions -----------------------------------------------------------------------------------


def _tiny_vlltr_config(**kwargs):
    return VLLTRConfig(
        clip_config=tiny_clip_config(), id2label={0: "a", 1: "b", 2: "c"}, num_anchor_sentences=2, **kwargs
    )


def test_main_input_name_is_the_first_forward_argument():
    for cls in (VLLTRModel, VLLTRForImageClassification):
        first = list(inspect.signature(cls.forward).parameters)[1]
        assert cls.main_input_name == first, cls.__name__


def test_classifier_passes_tower_outputs_through(tiny_classifier, tmp_path):
    tiny_classifier.save_pretrained(tmp_path)
    model = VLLTRForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = random_pixels()
    out = model(x, output_hidden_states=True, output_attentions=True)
    tower = model.clip.vision_model(x, output_hidden_states=True, output_attentions=True)
    layers = model.config.clip_config.vision_config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    for ours, clips in zip(out.hidden_states + out.attentions, tower.hidden_states + tower.attentions):
        torch.testing.assert_close(ours, clips)
    assert model(x).hidden_states is None and model(x).attentions is None
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple)
    for got, expected in zip(as_tuple, model(x).to_tuple()):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.get_image_features(x, return_dict=False)[1], out.image_embeds)


@pytest.mark.parametrize("head_type", ["lgr", "fc"])
def test_eager_and_sdpa_attention_agree(head_type, tmp_path):
    make_classifier(head_type=head_type).save_pretrained(tmp_path)
    x = random_pixels()
    with torch.no_grad():
        eager, sdpa = (
            VLLTRForImageClassification.from_pretrained(tmp_path, attn_implementation=impl).eval()(x).logits
            for impl in ("eager", "sdpa")
        )
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not os.environ.get("VLLTR_SLOW_TESTS"), reason="flex attention compiles for ~100 s on CPU; VLLTR_SLOW_TESTS=1"
)
def test_flex_attention_agrees_with_eager(tiny_classifier, tmp_path):
    tiny_classifier.save_pretrained(tmp_path)
    x = random_pixels()
    with torch.no_grad():
        eager, flex = (
            VLLTRForImageClassification.from_pretrained(tmp_path, attn_implementation=impl).eval()(x).logits
            for impl in ("eager", "flex_attention")
        )
    torch.testing.assert_close(eager, flex, rtol=1e-5, atol=1e-5)


def test_vlltr_model_gives_clips_outputs_and_contrastive_loss(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir, attn_implementation="eager").eval()
    model = VLLTRModel.from_pretrained(tiny_clip_dir, attn_implementation="eager").eval()
    ids = torch.tensor([[0, 40, 41, 42, 1], [0, 50, 51, 1, 1], [0, 60, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    inputs = {"input_ids": ids, "pixel_values": random_pixels(3), "attention_mask": mask}
    kwargs = {"return_loss": True, "output_hidden_states": True, "output_attentions": True}
    ours, theirs = model(**inputs, **kwargs), clip(**inputs, **kwargs)
    torch.testing.assert_close(ours.loss, theirs.loss)
    labels = torch.arange(3)
    naive = (F.cross_entropy(ours.logits_per_image, labels) + F.cross_entropy(ours.logits_per_text, labels)) / 2
    torch.testing.assert_close(ours.loss, naive)
    for tower in ("text_model_output", "vision_model_output"):
        for key in ("pooler_output", "hidden_states", "attentions"):
            torch.testing.assert_close(getattr(ours[tower], key), getattr(theirs[tower], key))
    assert model(**inputs).loss is None
    as_tuple = model(**inputs, return_dict=False)
    torch.testing.assert_close(as_tuple[0], ours.logits_per_image)


def test_clip_parts_get_clips_own_init(tmp_path):
    config = _tiny_vlltr_config()
    torch.manual_seed(0)
    expected = CLIPModel(config.clip_config).state_dict()
    for cls in (VLLTRModel, VLLTRForImageClassification):
        torch.manual_seed(0)
        got = cls(config).clip.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), cls.__name__
    assert math.isclose(VLLTRModel._from_config(config).clip.logit_scale.item(), 2.6592, rel_tol=1e-6)  # log(1/0.07)

    # a key missing from a checkpoint is initialised like CLIP does it; loaded tensors (anchors too) are kept
    model = make_classifier()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["clip.logit_scale"], weights["image_branch.fc2.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = VLLTRForImageClassification.from_pretrained(tmp_path)
    assert math.isclose(loaded.clip.logit_scale.item(), config.clip_config.logit_scale_init_value, rel_tol=1e-6)
    assert torch.equal(loaded.image_branch.fc2.bias, torch.zeros_like(loaded.image_branch.fc2.bias))
    assert torch.equal(loaded.anchor_text_embeds, model.anchor_text_embeds)
    assert torch.equal(loaded.text_branch.key_proj.weight, model.text_branch.key_proj.weight)


# -- export and compile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_type", ["lgr", "fc"])
def test_torch_export_matches_eager(head_type):
    model = make_classifier(head_type=head_type).eval()
    x = random_pixels()
    exported = torch.export.export(model, (), {"pixel_values": x}).module()
    with torch.no_grad():
        for pixels in (x, random_pixels(seed=9)):
            torch.testing.assert_close(
                exported(pixel_values=pixels).logits, model(pixel_values=pixels).logits, rtol=1e-5, atol=1e-5
            )


def test_fullgraph_compile_matches_eager_with_and_without_labels():
    """`fullgraph=True` fails on any graph break (a Python cache, a `.item()` label check). The `aot_eager` backend
    traces exactly as inductor does without its minutes-long C++ build; `test_inductor_compile` runs that one."""
    torch._dynamo.reset()
    model = make_classifier().eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, labels = random_pixels(), torch.tensor([0, 4, 2])
    with torch.no_grad():
        eager, traced = model(pixel_values=x, labels=labels), compiled(pixel_values=x, labels=labels)
        torch.testing.assert_close(traced.logits, eager.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced.loss, eager.loss, rtol=1e-5, atol=1e-5)
        model.set_anchor_embeddings(torch.randn_like(model.anchor_text_embeds))  # new anchors reach the graph
        torch.testing.assert_close(compiled(pixel_values=x).logits, model(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not os.environ.get("VLLTR_SLOW_TESTS"), reason="inductor builds C++ for ~75 s on 2 cores; VLLTR_SLOW_TESTS=1"
)
def test_inductor_compile():
    torch._dynamo.reset()
    model = make_classifier().eval()
    x = random_pixels()
    with torch.no_grad():
        try:
            compiled = torch.compile(model, fullgraph=True)(pixel_values=x)
        except Exception as error:  # noqa: BLE001 - the toolchain, not the model, is missing
            if "InductorError" in type(error).__name__ or "CppCompileError" in str(error):
                pytest.skip(f"inductor toolchain unavailable: {type(error).__name__}")
            raise
        torch.testing.assert_close(compiled.logits, model(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


# -- label maps ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_type", ["lgr", "fc"])
def test_reordered_label_map_permutes_anchors_and_rows(head_type, tmp_path):
    from transformers.testing_utils import CaptureLogger

    from modeling_vlltr import modeling_vlltr

    model = make_classifier(head_type=head_type).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["anchor_class_names"]
    assert saved == [f"class_{i}" for i in range(5)]
    x = random_pixels()
    with torch.no_grad():
        original = model(x)
    order = [3, 0, 4, 1, 2]  # new id j holds the checkpoint's class order[j]
    id2label = {j: f"class_{c}" for j, c in enumerate(order)}
    with CaptureLogger(modeling_vlltr.logger) as captured:
        loaded = AutoModelForImageClassification.from_pretrained(
            tmp_path, id2label=id2label, label2id={v: k for k, v in id2label.items()}
        ).eval()
    assert "permuted" in captured.out
    with torch.no_grad():
        out = loaded(x)
    for key in ("logits", "image_logits") + (("text_logits",) if head_type == "lgr" else ()):
        torch.testing.assert_close(getattr(out, key), getattr(original, key)[:, order], rtol=1e-5, atol=1e-5)
    if head_type == "lgr":
        assert torch.equal(loaded.anchor_mask, model.anchor_mask[order])
    loaded.save_pretrained(tmp_path / "again")  # the new order is recorded: loading it again changes nothing
    again = VLLTRForImageClassification.from_pretrained(tmp_path / "again").eval()
    assert again.config.anchor_class_names == [id2label[j] for j in range(5)]
    torch.testing.assert_close(again(x).logits, out.logits)


def test_unknown_class_names_are_refused_or_give_a_new_head(tmp_path):
    from transformers.testing_utils import CaptureLogger

    from modeling_vlltr import modeling_vlltr

    make_classifier().save_pretrained(tmp_path)
    id2label = {0: "class_0", 1: "class_1", 2: "zebra", 3: "class_3", 4: "yak"}
    with pytest.raises(ValueError, match=r"not in the checkpoint: \['zebra', 'yak'\].*missing from id2label: "):
        VLLTRForImageClassification.from_pretrained(tmp_path, id2label=id2label)
    with CaptureLogger(modeling_vlltr.logger) as captured:
        model = VLLTRForImageClassification.from_pretrained(tmp_path, id2label=id2label, ignore_mismatched_sizes=True)
    assert "rebuild the anchors" in captured.out and "zebra" in captured.out
    with pytest.raises(ValueError, match="not set"):
        model(random_pixels())
    with pytest.raises(ValueError, match="missing from id2label: \\['class_3', 'class_4'\\]"):
        VLLTRForImageClassification.from_pretrained(
            tmp_path, id2label={i: f"class_{i}" for i in range(3)}, ignore_mismatched_sizes=False
        )

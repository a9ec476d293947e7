"""`python -m training.convert_official`: official VL-LTR checkpoints in, this package's checkpoints out, equal.

The chain of evidence:

1. The official-layout state dicts are produced by small torch module trees that carry the official module names
   (`models/pretrain.py` `VisionTransformer`, `ResidualAttentionBlock`, `CVLP`; `models/finetune.py` `LGR`, `Block`,
   `Attention`), built from `nn.MultiheadAttention`, `nn.LayerNorm`, `nn.Linear` as the official code builds them,
   so the keys and shapes are the ones `state_dict()` of the official model gives.
2. The package's reference forward (`training.official_reference`, used by `--verify`) is checked against those
   modules' own forward (torch's `nn.MultiheadAttention`, sequence first, as the official blocks call it) and a
   per-(image, class) loop for the head, and against facts derived by hand: with the blocks' output projections at
   zero a tower reduces to a closed form; identical anchors make the attention irrelevant; padded anchors get no weight.
3. The converter's output, loaded with `from_pretrained`, equals the reference to 1e-5 (in float64: image-branch and
   text-branch logits, the fused prediction; stage-1 image and text embeddings).

Neither the reference nor the test modules use the converter's key mapping or `modeling_vlltr`.
"""

import argparse
import math
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoModelForImageClassification, CLIPConfig, CLIPModel, CLIPTokenizer, pipeline

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel
from training import convert_official
from training import official_reference as reference
from training.cli import run_main
from training.model_card import history_entry
from training.standin_clip import save_clip_folder

WIDTH, LAYERS, PATCH, IMAGE = 128, 2, 8, 32  # 2 heads (width // 64), 4x4 patches
EMBED, CONTEXT = 32, 16
NUM_CLASSES, NUM_ANCHORS = 5, 4


# ----------------------------------------------------------------------------------------------------------------------
# The official model, as module trees with the official names
# ----------------------------------------------------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("c_proj", nn.Linear(4 * width, width))])
        )
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x):  # (L, N, W)
        h = self.ln_1(x)
        mask = self.attn_mask.to(x.dtype) if self.attn_mask is not None else None
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn((IMAGE // PATCH) ** 2 + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, LAYERS, WIDTH // 64)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (B, g², W)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, WIDTH, dtype=x.dtype), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding).permute(1, 0, 2)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class CVLP(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.visual = VisionTransformer()
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1)
        self.transformer = Transformer(WIDTH, LAYERS, WIDTH // 64, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab_size, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, WIDTH))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, text):
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        x = self.ln_final(self.transformer.resblocks(x).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1q, self.norm1k = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.wq, self.wk = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)


class Block(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.attn = Attention(dim)
        self.cos = nn.CosineSimilarity(dim=2, eps=1e-6)
        self.visual_fc = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, num_classes))


class LGR(nn.Module):
    def __init__(self, counts: list[int]):
        super().__init__()
        self.visual = VisionTransformer()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=False)
        self.text_embeddings = nn.Parameter(torch.randn(len(counts), NUM_ANCHORS, EMBED))
        self.text_block = Block(EMBED, len(counts))
        with torch.no_grad():  # `pad_sequence` zero-pads a class with fewer than M sentences
            for c, n in enumerate(counts):
                self.text_embeddings[c, n:] = 0
        self.padding_mask = torch.arange(NUM_ANCHORS)[None] >= torch.tensor(counts)[:, None]  # build_key_padding_mask

    def forward_loop(self, pixels):
        """P_I and P_T, one (image, class) pair at a time."""
        e = self.visual(pixels)
        ls, attn, anchors = self.logit_scale.exp(), self.text_block.attn, self.text_embeddings
        text = torch.zeros(len(e), len(anchors), dtype=e.dtype)
        for b in range(len(e)):
            q = attn.wq(attn.norm1q(e[b]))
            for c in range(len(anchors)):
                real = [m for m in range(NUM_ANCHORS) if not self.padding_mask[c, m]]
                scores = torch.stack([q @ attn.wk(attn.norm1k(anchors[c, m])) / math.sqrt(EMBED) for m in real])
                g = (scores.softmax(0)[:, None] * anchors[c, real]).sum(0)
                text[b, c] = ls * (g @ e[b]) / (g.norm() * e[b].norm())
        return self.text_block.visual_fc(e), text


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "logit_scale":
                continue
            keep_zero = p == 0
            if p.dim() == 1 and "ln" in name or "norm" in name:  # LayerNorms away from (1, 0)
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
            if name == "text_embeddings":
                p.masked_fill_(keep_zero, 0.0)
    return module


def _tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer whose end token has the largest id, as in OpenAI's BPE (49407)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """The `--clip` folder: tokenizer and a random CLIP whose text tower fits the official-layout models."""
    tokenizer = _tokenizer()
    tower = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2)
    config = CLIPConfig(
        vision_config=dict(tower, image_size=IMAGE, patch_size=PATCH, projection_dim=EMBED),
        text_config=dict(
            tower, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT, projection_dim=EMBED,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        projection_dim=EMBED,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    save_clip_folder(CLIPModel(config), tokenizer, path)
    return str(path)


def official_lgr(seed: int = 0, counts=(6, 2, 4, 1, 9)) -> LGR:
    torch.manual_seed(seed)
    return _randomise(LGR(list(counts)), seed).eval()


def official_cvlp(seed: int = 0) -> CVLP:
    torch.manual_seed(seed)
    return _randomise(CVLP(len(_tokenizer())), seed).eval()


def pixels(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def official_text_tokens(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(official ids zero-padded, transformers ids, attention mask)."""
    batch = _tokenizer()(sentences, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    return batch["input_ids"] * batch["attention_mask"], batch["input_ids"], batch["attention_mask"]


def save_official(state: dict, path, args: argparse.Namespace | None = None, as_zip: bool = False) -> str:
    """Saves like the official `main.py` (model, optimizer, lr_scheduler, epoch, scaler, args); optionally inside a
    release-style zip."""
    checkpoint = {
        "model": state,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}]},
        "lr_scheduler": {"t_initial": 50, "warmup_lr_init": 1e-6, "base_values": [1e-3]},
        "epoch": 49,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
        "args": args or argparse.Namespace(model="LGR_vit16", data_set="IMNET_LT", nb_classes=NUM_CLASSES),
    }  # fmt: skip
    path = str(path)
    pth = path.replace(".zip", ".pth")
    torch.save(checkpoint, pth)
    if not as_zip:
        return pth
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(pth, "imageNet-LT_vit16/checkpoint.pth")
        archive.writestr("imageNet-LT_vit16/log.txt", "{}\n")
    return path


def convert(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        run_main(convert_official.main, "convert_official", argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _f64(state: dict) -> dict:
    return {k: v.detach().double() if v.is_floating_point() else v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------------------
# 1-2. The reference forward is the official one
# ----------------------------------------------------------------------------------------------------------------------


def test_reference_matches_the_official_modules():
    lgr, cvlp = official_lgr().double(), official_cvlp().double()
    x = pixels()
    with torch.no_grad():
        image, text = reference.lgr_forward(_f64(lgr.state_dict()), x, WIDTH // 64, lgr.padding_mask)
        loop_image, loop_text = lgr.forward_loop(x)
        torch.testing.assert_close(image, loop_image, rtol=0, atol=1e-10)
        torch.testing.assert_close(text, loop_text, rtol=0, atol=1e-10)
        ids, _, _ = official_text_tokens(["a photo of a lion.", "x", "a much longer sentence that gets cut short"])
        torch.testing.assert_close(
            reference.encode_text(_f64(cvlp.state_dict()), ids, WIDTH // 64), cvlp.encode_text(ids), rtol=0, atol=1e-10
        )
        torch.testing.assert_close(
            reference.encode_image(_f64(cvlp.state_dict()), x, WIDTH // 64), cvlp.visual(x), rtol=0, atol=1e-10
        )
    fused = reference.fused_probabilities(image, text, 0.2)
    torch.testing.assert_close(fused, 0.2 * image.softmax(1) + 0.8 * text.softmax(1))
    torch.testing.assert_close(fused.sum(1), torch.ones(len(x), dtype=fused.dtype))


def test_reference_hand_derived_facts():
    cvlp = official_cvlp().double()
    state = _f64(cvlp.state_dict())
    for k in state:  # every block adds nothing: x_L = x_0
        if k.endswith(("out_proj.weight", "out_proj.bias", "c_proj.weight", "c_proj.bias")):
            state[k] = torch.zeros_like(state[k])

    def ln(x, prefix):
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt() * state[
            prefix + "weight"
        ] + state[prefix + "bias"]

    # image: ln_post(ln_pre(class_embedding + positional_embedding[0])) @ proj, whatever the pixels
    cls = ln(state["visual.class_embedding"] + state["visual.positional_embedding"][0], "visual.ln_pre.")
    expected = ln(cls, "visual.ln_post.") @ state["visual.proj"]
    got = reference.encode_image(state, pixels(2), 2)
    torch.testing.assert_close(got, expected.expand(2, -1))
    # text: ln_final(token_embedding[end] + positional_embedding[end position]) @ text_projection
    ids, _, _ = official_text_tokens(["abc", "lion"])
    for row, n in zip(ids, (3, 4)):
        eot = n + 1  # start token, n characters, end token
        assert row[eot] == row.max()
        x = state["token_embedding.weight"][row[eot]] + state["positional_embedding"][eot]
        expected = ln(x, "ln_final.") @ state["text_projection"]
        torch.testing.assert_close(reference.encode_text(state, row[None], 2)[0], expected)

    lgr = official_lgr().double()
    state = _f64(lgr.state_dict())
    e = torch.randn(3, EMBED, dtype=torch.float64)
    scale = state["logit_scale"].exp()
    # identical anchors: G_c = v_c whatever the attention, so P_T = scale·cos(E_I, v_c)
    v = torch.randn(NUM_CLASSES, EMBED, dtype=torch.float64)
    state["text_embeddings"] = v[:, None].expand(-1, NUM_ANCHORS, -1).clone()
    _, text = reference.lgr_head(state, e)
    torch.testing.assert_close(text, scale * F.normalize(e, dim=-1) @ F.normalize(v, dim=-1).T)
    # W_q = 0: uniform attention over the real anchors, so G_c is their mean; padded slots get no weight
    state = _f64(lgr.state_dict())
    state["text_block.attn.wq.weight"] = torch.zeros(EMBED, EMBED, dtype=torch.float64)
    anchors = state["text_embeddings"]
    means = torch.stack([anchors[c][~lgr.padding_mask[c]].mean(0) for c in range(NUM_CLASSES)])
    _, text = reference.lgr_head(state, e, lgr.padding_mask)
    torch.testing.assert_close(text, scale * F.normalize(e, dim=-1) @ F.normalize(means, dim=-1).T)


# ----------------------------------------------------------------------------------------------------------------------
# 3. The converted checkpoints equal the reference
# ----------------------------------------------------------------------------------------------------------------------


def _classifier_matches_reference(out: str, lgr: LGR, alpha: float) -> None:
    model = VLLTRForImageClassification.from_pretrained(out).double().eval()
    state = _f64(lgr.state_dict())
    x = pixels(4, seed=7)
    with torch.no_grad():
        result = model(pixel_values=x)
        image, text = reference.lgr_forward(state, x, WIDTH // 64, lgr.padding_mask)
    torch.testing.assert_close(result.image_logits, image, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.text_logits, text, rtol=0, atol=1e-5)
    fused = reference.fused_probabilities(image, text, alpha)
    torch.testing.assert_close(result.logits.softmax(-1).double(), fused, rtol=0, atol=1e-5)
    assert torch.equal(model.anchor_mask, ~lgr.padding_mask)
    assert model.config.fusion_alpha == alpha


@pytest.mark.parametrize("as_zip", [False, True])
def test_stage2_checkpoint_converts_to_an_equal_classifier(as_zip, clip_dir, tmp_path, capsys):
    lgr = official_lgr()
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"species {i}" for i in range(NUM_CLASSES)) + "\n")
    args = argparse.Namespace(model="LGR_vit16_v_detach_img_grad", data_set="INAT", nb_classes=NUM_CLASSES)
    checkpoint = save_official(lgr.state_dict(), tmp_path / "release.zip", args, as_zip=as_zip)
    out = tmp_path / "out"
    code, stdout, err = convert(
        ["--checkpoint", checkpoint, "--clip", clip_dir, "--class_names", str(names), "--verify",
         "--output_dir", str(out)], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "Largest difference to the official forward" in stdout
    assert "Dropped:" in stdout and "optimizer, lr_scheduler, epoch, scaler, args" in stdout
    _classifier_matches_reference(str(out), lgr, alpha=0.7)  # iNaturalist: α = 0.7, v_detach
    model = VLLTRForImageClassification.from_pretrained(str(out))
    assert model.config.detach_anchor_norm and model.config.id2label[3] == "species 3"
    for name in ("model.safetensors", "config.json", "modeling_vlltr.py", "configuration_vlltr.py",
                 "preprocessor_config.json", "tokenizer_config.json", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    shown = "release.zip:imageNet-LT_vit16/checkpoint.pth" if as_zip else "release.pth"
    assert "Converted from the official VL-LTR release" in card and f"| checkpoint | {shown} |" in card
    assert "76.8" not in card  # a tiny model is not the ViT-B/16 the paper's number belongs to
    # the text tower comes from --clip (the stage-2 checkpoint has none)
    clip = CLIPModel.from_pretrained(clip_dir)
    torch.testing.assert_close(model.clip.text_projection.weight, clip.text_projection.weight, rtol=0, atol=0)


def test_the_anchor_mask_comes_from_the_sentence_counts_when_given(clip_dir, tmp_path, capsys):
    lgr = official_lgr(seed=2)
    with torch.no_grad():  # padded slots that hold values (e.g. a model built without `_load_text_embeddings`)
        lgr.text_embeddings[lgr.padding_mask] = torch.randn(int(lgr.padding_mask.sum()), EMBED)
    counts = (~lgr.padding_mask).sum(1).tolist()
    (tmp_path / "counts.txt").write_text("\n".join(map(str, counts)) + "\n")
    checkpoint = save_official(lgr.state_dict(), tmp_path / "checkpoint.pth")
    argv = ["--checkpoint", checkpoint, "--clip", clip_dir, "--verify"]
    code, _, err = convert([*argv, "--sentence_counts", str(tmp_path / "counts.txt"), "--output_dir", str(tmp_path / "a")],
                           capsys)  # fmt: skip
    assert code == 0, err
    _classifier_matches_reference(str(tmp_path / "a"), lgr, alpha=0.2)
    # without the counts, padded slots that hold values look like real anchors: all M slots are attended to (the
    # documented fallback; the official zero padding is what makes it exact for checkpoints the official code wrote)
    code, _, err = convert([*argv, "--output_dir", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert VLLTRForImageClassification.from_pretrained(str(tmp_path / "b")).anchor_mask.all()


def test_stage2_with_the_stage1_text_tower(clip_dir, tmp_path, capsys):
    lgr, cvlp = official_lgr(seed=3), official_cvlp(seed=4)
    checkpoint = save_official(lgr.state_dict(), tmp_path / "stage2.pth")
    stage1 = save_official(cvlp.state_dict(), tmp_path / "stage1.pth", argparse.Namespace(model="CVLP_vit16"))
    out = tmp_path / "out"
    code, stdout, err = convert(
        ["--checkpoint", checkpoint, "--stage1_checkpoint", stage1, "--clip", clip_dir, "--verify",
         "--output_dir", str(out)], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "text embeddings" in stdout and "visual.* and logit_scale" in stdout
    _classifier_matches_reference(str(out), lgr, alpha=0.2)  # ImageNet-LT args: α = 0.2
    model = VLLTRForImageClassification.from_pretrained(str(out)).double()
    assert not model.config.detach_anchor_norm
    ids, hf_ids, mask = official_text_tokens(["a photo of a lion.", "zebra"])
    with torch.no_grad():
        ours = model.clip.get_text_features(input_ids=hf_ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(ours, reference.encode_text(_f64(cvlp.state_dict()), ids, 2), rtol=0, atol=1e-5)


def test_stage1_checkpoint_converts_to_an_equal_vlltr_model(clip_dir, tmp_path, capsys):
    cvlp = official_cvlp(seed=5)
    checkpoint = save_official(cvlp.state_dict(), tmp_path / "stage1.pth", argparse.Namespace(model="CVLP_vit16"))
    out = tmp_path / "out"
    code, stdout, err = convert(["--checkpoint", checkpoint, "--clip", clip_dir, "--verify", "--output_dir", str(out)],
                                capsys)  # fmt: skip
    assert code == 0, err
    assert "image embeddings" in stdout
    model = VLLTRModel.from_pretrained(str(out)).double().eval()
    state = _f64(cvlp.state_dict())
    x = pixels(3, seed=2)
    ids, hf_ids, mask = official_text_tokens(["a photo of a lion.", "zebra", "a long sentence " * 5])
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(x).pooler_output, reference.encode_image(state, x, 2), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            model.get_text_features(hf_ids, mask).pooler_output,
            reference.encode_text(state, ids, 2),
            rtol=0,
            atol=1e-5,
        )
    assert model.clip.logit_scale.item() == pytest.approx(cvlp.logit_scale.item())


# ----------------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------------


class Payload:
    """Stands for any object a pickle could carry besides tensors and the allow-listed arguments."""


def test_a_pickle_with_a_disallowed_global_is_refused(clip_dir, tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": official_lgr().state_dict(), "args": Payload()}, path)
    out = tmp_path / "out"
    code, _, err = convert(["--checkpoint", str(path), "--clip", clip_dir, "--output_dir", str(out)], capsys)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("convert_official: error:")]
    assert "refused to unpickle" in line and "Payload" in line and str(path) in line
    assert not any(out.iterdir())


@pytest.mark.parametrize(
    "content", [b"hello\n", b"<html><body>404 Not Found</body></html>\n", b"\x80\x02}q\x00(X\x01"]
)
def test_a_file_that_is_not_a_checkpoint_is_named(content, clip_dir, tmp_path, capsys):
    """A text or HTML page saved under the checkpoint's name (a failed download) failed inside the unpickler with a
    KeyError or an EOFError traceback, depending on its first bytes."""
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(content)
    out = tmp_path / "out"
    code, _, err = convert(["--checkpoint", str(path), "--clip", clip_dir, "--output_dir", str(out)], capsys)
    (line,) = [line for line in err.splitlines() if line.startswith("convert_official: error:")]
    assert code == 2 and f"{path}: not a" in line and "PyTorch checkpoint" in line, err[-2000:]
    assert "Traceback" not in err and not (out.exists() and any(out.iterdir()))


def test_an_empty_file_or_a_folder_as_the_checkpoint(clip_dir, tmp_path, capsys):
    empty = tmp_path / "checkpoint.pth"
    empty.touch()
    for given, message in ((empty, "the file is empty"), (tmp_path, "is a folder: pass the release zip")):
        argv = ["--checkpoint", str(given), "--clip", clip_dir, "--output_dir", str(tmp_path / "out")]
        code, _, err = convert(argv, capsys)
        (line,) = [line for line in err.splitlines() if line.startswith("convert_official: error:")]
        assert code == 2 and f"{given}: {message}" in line, line


def test_an_unknown_tensor_is_refused_by_name(clip_dir, tmp_path, capsys):
    state = official_lgr().state_dict()
    state["text_block.fc.weight"] = torch.zeros(1, 2 * EMBED)  # the official 'concat' head, not a released model
    path = save_official(state, tmp_path / "checkpoint.pth")
    code, _, err = convert(["--checkpoint", path, "--clip", clip_dir, "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("convert_official: error:")]
    assert "unknown tensor(s) ['text_block.fc.weight']" in line
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["model_ema"] = {}
    torch.save(checkpoint, path)
    code, _, err = convert(["--checkpoint", path, "--clip", clip_dir, "--output_dir", str(tmp_path / "p")], capsys)
    assert code == 2 and "unknown top-level entries ['model_ema']" in err


def test_resnet_checkpoints_and_openai_archives_are_refused(clip_dir, tmp_path, capsys):
    state = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
             "text_embeddings": torch.zeros(2, 4, 1024), "logit_scale": torch.tensor(4.6)}  # fmt: skip
    path = save_official(state, tmp_path / "checkpoint.pth")
    code, _, err = convert(["--checkpoint", path, "--clip", clip_dir, "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "ResNet-50" in err and "only ViT" in err
    code, _, err = convert(
        ["--checkpoint", path, "--clip", "ViT-B-16.pt", "--output_dir", str(tmp_path / "p")], capsys
    )
    assert code == 2 and "TorchScript" in err


def test_verify_stops_a_wrong_conversion_before_writing(clip_dir, tmp_path, capsys, monkeypatch):
    convert_head = convert_official.convert_lgr_head

    def off_by_one(tensors, counts=None):  # a mapping mistake: the image branch's output bias shifted by one
        head = convert_head(tensors, counts)
        return {**head, "image_branch.fc2.bias": head["image_branch.fc2.bias"] + 1}

    monkeypatch.setattr(convert_official, "convert_lgr_head", off_by_one)
    path = save_official(official_lgr().state_dict(), tmp_path / "checkpoint.pth")
    out = tmp_path / "out"
    code, _, err = convert(["--checkpoint", path, "--clip", clip_dir, "--verify", "--output_dir", str(out)], capsys)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("convert_official: error:")]
    assert "verification failed: the image logits differ" in line and "nothing was written" in line
    assert not any(out.iterdir())


def test_the_model_card_quotes_the_paper_as_reported_and_keeps_it_after_evaluation(tiny_classifier):
    from training.model_card import build_model_card

    entry = history_entry(
        "convert_official", "convert", {"checkpoint": "imageNet-LT_vit16.zip:checkpoint.pth", "architecture":
                                        "VLLTRForImageClassification"}, {"max_abs_diff_text_logits": 1e-15},
    )  # fmt: skip
    entry["reported"] = {"dataset": "imagenet-lt", **convert_official.REPORTED_VIT_B16["imagenet-lt"]}
    history = [{"script": "base", "stage": "base", "settings": {"model_name_or_path": "openai/clip-vit-base-patch16"}}]
    card = str(build_model_card([*history, entry], tiny_classifier.config))
    assert "overall 77.2, many-shot\n84.5, medium-shot 74.6, few-shot 59.3" in card
    assert "quoted as\nreported, not measured" in card and "Not evaluated yet" not in card
    assert "pipeline_tag: image-classification" in card and "imageNet-LT_vit16.zip:checkpoint.pth" in card
    evaluation = history_entry(
        "run_eval", "eval", {"test_file": "ImageNet_LT_test.txt", "num_test_images": 10, "many": 100, "few": 20},
        {"top1": 0.5, "top5": 0.9},
    )  # fmt: skip
    card = str(build_model_card([*history, entry, evaluation], tiny_classifier.config))
    assert "| 50.00 | 90.00 |" in card and "overall 77.2" in card


def test_push_to_hub_uploads_a_checkpoint_that_equals_the_reference(clip_dir, tmp_path):
    """`--push_to_hub` through the real huggingface_hub client (a fake Hub, so in a fresh process); the uploaded folder
    loads with the Auto class and the pipeline and still computes the official forward."""
    from fake_hub import fake_hub

    lgr = official_lgr(seed=6)
    checkpoint = save_official(lgr.state_dict(), tmp_path / "release.zip", as_zip=True)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_TOKEN="any-token", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")  # fmt: skip
    with fake_hub(tmp_path / "hub") as hub:
        env["HF_ENDPOINT"] = hub.endpoint
        result = subprocess.run(
            [sys.executable, "-m", "training.convert_official", "--checkpoint", checkpoint, "--clip", clip_dir,
             "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "mockorg/vlltr-converted"],
            cwd=repo_root, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not hub.errors, hub.errors
    folder = str(hub.repo_dir("mockorg/vlltr-converted"))
    uploaded = set(os.listdir(folder))
    assert {"model.safetensors", "modeling_vlltr.py", "configuration_vlltr.py", "README.md"} <= uploaded, uploaded
    assert {"preprocessor_config.json", "tokenizer_config.json", "training_history.json"} <= uploaded, uploaded
    model = AutoModelForImageClassification.from_pretrained(folder).double().eval()
    x = pixels(2, seed=3)
    with torch.no_grad():
        out = model(pixel_values=x)
        image, text = reference.lgr_forward(_f64(lgr.state_dict()), x, WIDTH // 64, lgr.padding_mask)
    torch.testing.assert_close(out.image_logits, image, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.text_logits, text, rtol=0, atol=1e-5)
    predictions = pipeline("image-classification", model=folder)(Image.new("RGB", (40, 40), (200, 30, 30)), top_k=2)
    assert len(predictions) == 2 and predictions[0]["label"].startswith("class_")

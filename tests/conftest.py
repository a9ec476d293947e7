"""Shared tiny fixtures: a random CLIP folder laid out like `openai/clip-vit-base-patch16`, and small VL-LTR models.

Everything is offline. HF_HOME and the vlltr cache point at a scratch folder so the tests never touch the user's.
"""

import os
import tempfile

_SCRATCH = tempfile.mkdtemp(prefix="vlltr-tests-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HOME=os.path.join(_SCRATCH, "hf"),
    VLLTR_CACHE=os.path.join(_SCRATCH, "vlltr"),
    TOKENIZERS_PARALLELISM="false",
)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPModel  # noqa: E402

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification  # noqa: E402
from training.standin_clip import build_char_tokenizer, save_clip_folder, small_clip_config  # noqa: E402

torch.set_num_threads(1)

IMAGE_SIZE = 32
PROJECTION_DIM = 16


def tiny_clip_config():
    return small_clip_config(
        image_size=IMAGE_SIZE, patch_size=8, width=32, layers=2, heads=4, projection_dim=PROJECTION_DIM
    )


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP checkpoint folder (weights, tokenizer, image processor), loaded by path like a Hub name."""
    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    save_clip_folder(CLIPModel(tiny_clip_config()), build_char_tokenizer(), path)
    return str(path)


def make_classifier(num_labels: int = 5, num_anchors: int = 4, seed: int = 0, **config_kwargs):
    """A tiny VLLTRForImageClassification with random head weights and random anchors (some classes padded)."""
    torch.manual_seed(seed)
    config = VLLTRConfig(
        clip_config=tiny_clip_config(),
        id2label={i: f"class_{i}" for i in range(num_labels)},
        num_anchor_sentences=num_anchors,
        **config_kwargs,
    )
    model = VLLTRForImageClassification(config)
    if config.head_type == "lgr":
        mask = torch.ones(num_labels, num_anchors, dtype=torch.bool)
        mask[0, num_anchors // 2 :] = False  # class 0 has fewer than M sentences
        mask[-1, 1:] = False  # the last class has a single anchor
        model.set_anchor_embeddings(torch.randn(num_labels, num_anchors, PROJECTION_DIM), mask)
        with torch.no_grad():  # move the attention away from the identity so the test sees real projections
            model.text_branch.query_proj.weight.add_(0.3 * torch.randn(PROJECTION_DIM, PROJECTION_DIM))
            model.text_branch.key_proj.weight.add_(0.3 * torch.randn(PROJECTION_DIM, PROJECTION_DIM))
            model.text_branch.key_norm.weight.add_(0.2 * torch.randn(PROJECTION_DIM))
            model.text_branch.key_norm.bias.add_(0.2 * torch.randn(PROJECTION_DIM))
            model.text_branch.query_norm.bias.add_(0.2 * torch.randn(PROJECTION_DIM))
    return model


@pytest.fixture
def tiny_classifier():
    return make_classifier()


def random_pixels(batch_size: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

"""A small CLIP built from scratch, saved as a normal CLIP folder: the demo's stand-in for a pretrained CLIP.

The Hugging Face Hub is unreachable where the demo must run, so no pretrained CLIP (or its BPE vocabulary) can be
downloaded. This module builds a real `CLIPTokenizer` from an in-memory character-level byte-BPE vocabulary and a
small `CLIPModel`, and saves both with the evaluation image processor, so the folder looks on disk exactly like
`openai/clip-vit-base-patch16` and every later step loads it through `from_pretrained`.
"""

import json
import math
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.utils.logging import tqdm

from .data import eval_image_processor
from .threads import configure_threads


def build_char_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is every byte-level character, with and without the end-of-word mark, plus
    the two special tokens, and no merges (514 tokens). It lowercases, truncates and pads like the real one."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_caption_tokenizer(captions: list[str], max_merges: int = 2000) -> CLIPTokenizer:
    """The character tokenizer plus byte-pair merges learned from `captions` (🤗 tokenizers' BPE trainer, CLIP's
    "</w>" end-of-word mark), as CLIP's own vocabulary was learned from its web text: the words the captions use
    become single tokens, any other word (a made-up class name) falls apart into pieces. At most `max_merges`."""
    vocab = dict(build_char_tokenizer().get_vocab())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=len(vocab) + max_merges,
        end_of_word_suffix="</w>",
        initial_alphabet=sorted(ByteLevel.alphabet()),
        show_progress=False,
    )
    bpe.train_from_iterator([c.lower() for c in captions], trainer)
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def small_clip_config(
    image_size: int = 32,
    patch_size: int = 4,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    vocab_size: int = 514,
    max_position_embeddings: int = 77,
) -> CLIPConfig:
    """A `CLIPConfig` with the same structure as ViT-B/16 CLIP at a size that trains in seconds on a CPU."""
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    return CLIPConfig(
        vision_config=dict(**tower, image_size=image_size, patch_size=patch_size, projection_dim=projection_dim),
        text_config=dict(
            **tower,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            projection_dim=projection_dim,
            # the char tokenizer's ids; with eos != 2 CLIPTextTransformer pools at the first end-of-text token
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        projection_dim=projection_dim,
        logit_scale_init_value=2.6592,
    )


def save_clip_folder(model: CLIPModel, tokenizer: CLIPTokenizer, path: str | os.PathLike) -> None:
    """Saves model, tokenizer and image processor the way a CLIP checkpoint on the Hub is laid out."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    eval_image_processor(model.config.vision_config.image_size).save_pretrained(path)


def contrastive_step(model: CLIPModel, optimizer, schedule, bar, **batch) -> None:
    """One optimiser step of CLIP's contrastive loss on `batch` (pixel_values, input_ids, attention_mask), its loss
    shown on the progress bar `bar`: the step of both stand-ins' pre-training loops."""
    loss = model(**batch, return_loss=True).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.update()


def load_caption_images(paths: list[str], image_size: int) -> torch.Tensor:
    """The images resized as the evaluation processor resizes them (short side to `int(256 / 224 · image_size)`,
    bicubic), as one uint8 tensor (N, 3, R, R), ready for random `image_size` crops."""
    size = int(256 / 224 * image_size)
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="Reading the captioned images", unit="image")):
        with Image.open(path) as image:
            images[i] = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def pretrain_on_captions(
    image_paths: list[str],
    captions: list[str],
    out: str | os.PathLike,
    seed: int,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    warmup_steps: int = 150,
    width: int = 64,
    layers: int = 3,
    image_size: int = 32,
    patch_size: int = 4,
) -> str:
    """CLIP's contrastive pre-training of a small `CLIPModel` on (image, caption) pairs, saved as a CLIP folder.

    The whole set is held in memory (images resized once, captions tokenised once), so a step costs only the two
    towers; each step draws a random crop of every image, at the position the evaluation processor's centre crop
    would be on average. Two things keep every seed off the contrastive plateau (loss ≈ ln(batch), both towers
    collapsed onto one direction) that a plain constant-rate start can sit on: a linear warm-up of the learning rate
    followed by a cosine decay, and a higher starting logit scale (1 / 0.05 instead of CLIP's 1 / 0.07), which makes
    the softmax over the batch sharp enough for the first gradients to separate the pairs.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_caption_tokenizer(captions)
    config = small_clip_config(
        image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=4, vocab_size=len(tokenizer)
    )
    config.logit_scale_init_value = math.log(1 / 0.05)
    model = CLIPModel(config)
    configure_threads(model.config)
    pixels = load_caption_images(image_paths, image_size)  # (N, 3, R, R) uint8
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    processor = eval_image_processor(image_size)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    margin = pixels.shape[-1] - image_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup_steps)
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup_steps) / max(1, steps - warmup_steps))))
        ),
    )
    model.train()
    with tqdm(total=steps, desc="Stand-in CLIP pre-training", unit="step") as bar:
        for _ in range(steps):
            rows = torch.randint(len(captions), (batch_size,), generator=generator)
            dy, dx = torch.randint(margin + 1, (2, batch_size), generator=generator).tolist()
            crops = torch.stack(
                [pixels[r, :, y : y + image_size, x : x + image_size] for r, y, x in zip(rows, dy, dx)]
            )
            batch = (crops.float() / 255 - mean) / std  # (B, 3, S, S)
            mask = tokens["attention_mask"][rows]
            length = int(mask.sum(1).max())
            contrastive_step(
                model, optimizer, schedule, bar, pixel_values=batch, input_ids=tokens["input_ids"][rows, :length],
                attention_mask=mask[:, :length],
            )  # fmt: skip
    save_clip_folder(model.eval(), tokenizer, out)
    return str(out)

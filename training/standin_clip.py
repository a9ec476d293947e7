"""A small CLIP built from scratch, saved as a normal CLIP folder: the demo's stand-in for a pretrained CLIP.

The Hugging Face Hub is unreachable where the demo must run, so no pretrained CLIP (or its BPE vocabulary) can be
downloaded. This module builds a real `CLIPTokenizer` from an in-memory character-level byte-BPE vocabulary and a
small `CLIPModel`, and saves both with the evaluation image processor, so the folder looks on disk exactly like
`openai/clip-vit-base-patch16` and every later step loads it through `from_pretrained`.
"""

import os

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from .data import eval_image_processor


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

"""The official VL-LTR forward pass, written as plain torch functions over a state dict in the official layout.

This is the yardstick `training.convert_official --verify` (and `tests/test_convert_official.py`) hold a converted
checkpoint against. It reads the official tensors exactly as the official modules use them and shares nothing with
`modeling_vlltr` or with the converter's key mapping:

- the towers follow `models/pretrain.py` of ChangyaoTian/VL-LTR (`VisionTransformer.forward` L224-241,
  `ResidualAttentionBlock` L172-193, `CVLP.encode_text` L362-375): OpenAI's layout, sequence-first, attention through
  `torch.nn.functional.multi_head_attention_forward` with the packed `in_proj_weight` (what the official
  `nn.MultiheadAttention` calls), QuickGELU, `x @ proj`, the end-of-text token found by `argmax` over the token ids;
- the head follows `models/finetune.py` (`Attention.forward` L61-86, `Block.forward` L114-153, `LGR.forward`
  L360-368): Q and K built explicitly, G = softmax_m(QKᵀ/√D)·V materialised, cosine against E_I times
  exp(logit_scale), `visual_fc` as Linear -> ReLU -> Linear;
- the fused prediction follows `engine.py` `evaluate_LT` L235-236: α·softmax(P_I) + (1 − α)·softmax(P_T).

The converted model computes the same numbers by other routes (transformers' `CLIPModel` with split q/k/v
projections, batch-first; the LGR text branch that never builds K or G), so agreement between the two is evidence
about the mapping. What keeps this reference itself honest is tested separately: `tests/test_convert_official.py`
checks it against hand-written per-head and per-(image, class) loops and against facts derived by hand (identical
anchors make the attention irrelevant; padded anchors get no weight).
"""

import torch
import torch.nn.functional as F


def _layer_norm(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    # the official `LayerNorm` subclass is torch's LayerNorm (eps 1e-5) computed in float32 for fp16 inputs
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps=1e-5)


def _residual_block(x: torch.Tensor, state: dict, prefix: str, heads: int, attn_mask=None) -> torch.Tensor:
    """`ResidualAttentionBlock.forward` on a (L, N, W) sequence-first tensor."""
    width = x.shape[-1]
    h = _layer_norm(x, state, prefix + "ln_1.")
    h = F.multi_head_attention_forward(
        h, h, h, width, heads,
        state[prefix + "attn.in_proj_weight"], state[prefix + "attn.in_proj_bias"],
        None, None, False, 0.0,
        state[prefix + "attn.out_proj.weight"], state[prefix + "attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=attn_mask,
    )[0]  # fmt: skip
    x = x + h
    h = _layer_norm(x, state, prefix + "ln_2.")
    h = F.linear(h, state[prefix + "mlp.c_fc.weight"], state[prefix + "mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + F.linear(h, state[prefix + "mlp.c_proj.weight"], state[prefix + "mlp.c_proj.bias"])


def _num_blocks(state: dict, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def encode_image(state: dict, pixel_values: torch.Tensor, heads: int, prefix: str = "visual.") -> torch.Tensor:
    """E_I (B, D): the official `VisionTransformer.forward` (ln_post on the class token, then `@ proj`)."""
    conv = state[prefix + "conv1.weight"]  # (W, 3, p, p)
    x = F.conv2d(pixel_values.to(conv.dtype), conv, stride=conv.shape[-1])  # (B, W, g, g)
    x = x.flatten(2).transpose(1, 2)  # (B, g², W)
    cls = state[prefix + "class_embedding"].expand(x.shape[0], 1, -1)  # (B, 1, W)
    x = torch.cat([cls, x], dim=1) + state[prefix + "positional_embedding"]  # (B, g² + 1, W)
    x = _layer_norm(x, state, prefix + "ln_pre.").transpose(0, 1)  # (L, B, W): sequence first, as the official
    blocks = prefix + "transformer.resblocks."
    for i in range(_num_blocks(state, blocks)):
        x = _residual_block(x, state, f"{blocks}{i}.", heads)
    x = _layer_norm(x[0], state, prefix + "ln_post.")  # class token (B, W)
    return x @ state[prefix + "proj"]  # (B, D)


def encode_text(state: dict, tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """E_T (N, D): the official `CVLP.encode_text`. `tokens` (N, L) are official token ids: start token, BPE ids,
    end token, zeros; L must equal the context length (the rows of `positional_embedding`)."""
    x = F.embedding(tokens, state["token_embedding.weight"]) + state["positional_embedding"]  # (N, L, W)
    length = tokens.shape[1]
    causal = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)  # (L, L)
    x = x.transpose(0, 1)  # (L, N, W)
    for i in range(_num_blocks(state, "transformer.resblocks.")):
        x = _residual_block(x, state, f"transformer.resblocks.{i}.", heads, attn_mask=causal)
    x = _layer_norm(x.transpose(0, 1), state, "ln_final.")  # (N, L, W)
    eot = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # the end token has the largest id (N, W)
    return eot @ state["text_projection"]  # (N, D)


def lgr_head(
    state: dict, image_embeds: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_I, P_T), each (B, C): the official `Block.forward` with `op_type='two_branch'`, one attention head,
    `use_norm=True`. `key_padding_mask` (C, M) is True where the official `build_key_padding_mask` masks a slot."""
    anchors = state["text_embeddings"].to(image_embeds.dtype)  # kx = V = E_T (C, M, D)
    dim = anchors.shape[-1]
    q = F.linear(_layer_norm(image_embeds, state, "text_block.attn.norm1q."), state["text_block.attn.wq.weight"])
    k = F.linear(_layer_norm(anchors, state, "text_block.attn.norm1k."), state["text_block.attn.wk.weight"])
    attn = torch.einsum("bd,cmd->bcm", q, k) * dim**-0.5  # (B, C, M)
    if key_padding_mask is not None:
        attn = attn.masked_fill(key_padding_mask[None], float("-inf"))
    attn = attn.softmax(dim=-1)
    g = torch.einsum("cmd,bcm->bcd", anchors, attn)  # G (B, C, D)
    text_logits = torch.einsum("bcd,bd->bc", F.normalize(g, dim=-1), F.normalize(image_embeds, dim=-1))
    text_logits = text_logits * state["logit_scale"].exp()  # P_T (B, C)
    h = F.relu(F.linear(image_embeds, state["text_block.visual_fc.0.weight"], state["text_block.visual_fc.0.bias"]))
    image_logits = F.linear(h, state["text_block.visual_fc.2.weight"], state["text_block.visual_fc.2.bias"])  # P_I
    return image_logits, text_logits


def lgr_forward(
    state: dict, pixel_values: torch.Tensor, vision_heads: int, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_I, P_T) of the official `LGR.forward` on `pixel_values` (B, 3, H, W)."""
    return lgr_head(state, encode_image(state, pixel_values, vision_heads), key_padding_mask)


def fused_probabilities(image_logits: torch.Tensor, text_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """The official test-time prediction (`engine.py` `evaluate_LT`): α·softmax(P_I) + (1 − α)·softmax(P_T)."""
    return image_logits.softmax(1) * alpha + text_logits.softmax(1) * (1 - alpha)


__all__ = ["encode_image", "encode_text", "fused_probabilities", "lgr_forward", "lgr_head"]

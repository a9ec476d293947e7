# Copyright 2026 The vlltr authors. Licensed under the Apache License, Version 2.0.
"""PyTorch VL-LTR model (Tian et al., ECCV 2022, arXiv 2111.13579).

Acronyms, spelled out once: CVLP = class-wise visual-linguistic pre-training (stage 1), AnSS = anchor sentence
selection, LGR = language-guided recognition (stage 2). Paper symbols on tensor lines: E_I (image embedding),
E_T / V (anchor text embeddings), G (anchor-attention aggregate per class), P_I / P_T (image / text branch logits).

The file is ordered like `modeling_clip.py`: loss helpers -> output dataclasses -> building blocks ->
`VLLTRPreTrainedModel` -> public models. It imports only torch, transformers and its sibling config, so it ships
unchanged as Hub remote code and does no file or network I/O at import.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import CLIPModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import image_text_contrastive_loss
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, cached_file, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.logging import tqdm

from .configuration_vlltr import VLLTRConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Loss helpers
# ----------------------------------------------------------------------------------------------------------------------


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of `logits` (B, C) against class ids (B,) or soft targets (B, C) (mixup / cutmix)."""
    if targets.dtype.is_floating_point:
        return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits.float(), targets)


def fused_log_probabilities(
    image_logits: torch.Tensor, text_logits: torch.Tensor, alpha: float, text_only: torch.Tensor | None = None
) -> torch.Tensor:
    """log(α·softmax(P_I) + (1 − α)·softmax(P_T)), computed stably in log space (reference `evaluate_LT`).

    A softmax of the result gives back the fused probability, so `pipeline("image-classification")`, which always
    applies a softmax, reports it, and argmax / top-k are those of the fused prediction.

    `text_only` (bool `(num_labels,)`, *optional*) marks classes added from their description alone
    (`VLLTRForImageClassification.add_classes`), which the image branch has never seen. Not in the paper; the rule is:

        P(c) = softmax(P_T)_c                                          c text-only
        P(c) = (1 − Σ_new softmax(P_T)_new) · [α·softmax_K(P_I) + (1 − α)·softmax_K(P_T)]_c    c in K, the others

    The text branch, which knows every class, decides how much mass goes to the new classes and takes it at full
    weight (an α-weighted share would cap a new class at 1 − α); the trained classes share the rest exactly as the
    model did before the classes were added, so their fused logits only move by one common shift and their order
    and the image branch's part of the prediction are untouched.
    """
    if text_only is not None and bool(text_only.any()):
        log_p_text = F.log_softmax(text_logits.float(), dim=-1)  # over every class (B, C)
        known = ~text_only.to(device=text_logits.device)  # (C,)
        if not bool(known.any()):
            return log_p_text
        known_mass = torch.logsumexp(log_p_text[:, known], dim=-1, keepdim=True)  # log(1 − Σ_new p_T) (B, 1)
        fused_known = fused_log_probabilities(image_logits[:, known], text_logits[:, known], alpha)  # (B, |K|)
        return log_p_text.masked_scatter(known[None, :].expand_as(log_p_text), fused_known + known_mass)
    log_p_image = F.log_softmax(image_logits.float(), dim=-1) + math.log(alpha) if alpha > 0 else None
    log_p_text = F.log_softmax(text_logits.float(), dim=-1) + math.log(1.0 - alpha) if alpha < 1 else None
    if log_p_image is None:
        return log_p_text
    if log_p_text is None:
        return log_p_image
    return torch.logaddexp(log_p_image, log_p_text)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class VLLTRModelOutput(ModelOutput):
    """
    Output of [`VLLTRModel`], the stage-1 (CVLP) image-text model (the fields of `CLIPOutput`, plus `logit_scale`).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss` is `True`):
            CLIP's symmetric image-text contrastive loss over the batch (not the class-wise CVLP loss, which
            `training.losses` computes from these embeddings).
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarity `exp(logit_scale) · cos(E_I, E_T)` of every image to every text.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised image embeddings.
        logit_scale (`torch.FloatTensor` of shape `()`):
            `exp(logit_scale)`, the learnable inverse temperature 1/τ (kept in the graph, so a loss computed from
            gathered embeddings can train it).
        text_model_output (`BaseModelOutputWithPooling`):
            The output of the CLIP text tower (`pooler_output` projected: E_T before normalisation).
        vision_model_output (`BaseModelOutputWithPooling`):
            The output of the CLIP vision tower (`pooler_output` projected: E_I before normalisation).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if k in ("text_model_output", "vision_model_output") else v for k, v in self.items())


@dataclass
class VLLTRImageClassifierOutput(ModelOutput):
    """
    Output of [`VLLTRForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            L_rec = CE(P_I, y) + CE(P_T, y) for the LGR head (soft-target CE for mixed targets), CE(logits, y) for
            the FC head.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            LGR head: log of the fused probability `α·softmax(P_I) + (1 − α)·softmax(P_T)`, so a softmax gives the
            fused probability back. FC head: the classifier logits.
        image_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            P_I, the image-branch logits `MLP(E_I)` (equal to `logits` for the FC head).
        text_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            P_T, the text-branch logits `exp(logit_scale) · cos(E_I, G_c)` (LGR head only).
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            E_I, the projected (not normalised) image embedding.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The vision tower's hidden states (embeddings, then every layer), each `(batch_size, sequence_length,
            hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The vision tower's attention weights, each `(batch_size, num_heads, sequence_length, sequence_length)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    text_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class VLLTRImageBranch(nn.Module):
    """P_I = MLP(E_I): Linear(D, r·D) -> ReLU -> Linear(r·D, C), no dropout (reference `visual_fc`)."""

    def __init__(self, config: VLLTRConfig):
        super().__init__()
        dim = config.projection_dim
        self.fc1 = nn.Linear(dim, config.mlp_ratio * dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(config.mlp_ratio * dim, config.num_labels)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(image_embeds)))  # (B, C)


class VLLTRCosineClassifier(nn.Module):
    """logits = s·cos(f, w_c) for every class c: the cosine classifier of LIFT (Shi et al., ICML 2024, shijxcs/LIFT
    `models/classifiers.py` `CosineClassifier`), with a fixed scale s = `config.cosine_scale`. f is the feature named
    by `config.classifier_feature`: E_I in CLIP's joint space (`"projected"`, where w_c can start as the normalised
    class-name prompt embeddings: zero-shot CLIP up to the scale), or, as in LIFT, the vision tower's pooled feature
    before the projection (`"pooled"`, where LIFT starts w_c from the prompt embeddings mapped back through the image
    projection, `training.embedding.prompt_head_weights`). `weight` is `(C, config.classifier_input_dim)`."""

    def __init__(self, config: VLLTRConfig):
        super().__init__()
        self.scale = config.cosine_scale
        self.weight = nn.Parameter(torch.empty(config.num_labels, config.classifier_input_dim))  # (C, D)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(features, dim=-1)  # (B, D)
        return self.scale * unit @ F.normalize(self.weight, dim=-1).to(unit.dtype).T  # (B, C)


class VLLTRAdaptFormer(nn.Module):
    r"""
    One AdaptFormer adapter (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition",
    NeurIPS 2022) as LIFT builds it (shijxcs/LIFT `models/peft_modules.py` `AdaptFormer`):

        a(h) = s · W_up · ReLU(W_down · LN(h) + b_down) + s · b_up        h (B, N, H) -> (B, N, H)

    with its own LayerNorm, a bottleneck of width r, and a learnable scalar s. At initialisation W_up, b_up and b_down
    are zero (so a = 0 and the adapted tower is the pre-trained one), W_down is Kaiming-normal (a = √5) and s = 1
    ([`VLLTRPreTrainedModel._init_weights`]). LIFT adds it in parallel to each block's MLP, on the block's residual
    stream before the MLP's LayerNorm (`models/peft_vit.py`: `x = mlp(ln_2(identity)) + adaptformer(identity) +
    identity`); [`VLLTRPreTrainedModel`] wires it so into the CLIP vision tower with two hooks per layer.
    """

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.ln = nn.LayerNorm(hidden_size)  # LIFT: nn.LayerNorm's default eps
        self.down_proj = nn.Linear(hidden_size, bottleneck)
        self.relu = nn.ReLU()
        self.up_proj = nn.Linear(bottleneck, hidden_size)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.relu(self.down_proj(self.ln(hidden_states)))) * self.scale  # (B, N, H)


class VLLTRTextBranch(nn.Module):
    r"""
    The language-guided text branch P_T of the LGR head (paper Eq. for G and P_T; reference `Attention`/`Block`):

        Q = W_q · LN_q(E_I)                     (B, D)
        K = W_k · LN_k(E_T)                     (C, M, D)
        A = softmax_m(Q Kᵀ / √D)                (B, C, M)   softmax over each class's M anchors, padding masked
        G = A · V,  V = E_T                     (B, C, D)
        P_T = exp(logit_scale) · cos(E_I, G)    (B, C)

    Neither K nor G is built. With the anchors fixed:

        Q·K_cm = Q'·LN_k(V_cm) = ((Q'⊙γ)·V_cm − μ_cm Σ_d(Q'⊙γ)) / σ_cm + Q'·β,   Q' = Q·W_k
        ⟨E_I, G_c⟩ = Σ_m A_cm ⟨E_I, V_cm⟩
        ‖G_c‖² = A_cᵀ (V_c V_cᵀ) A_c

    so the batch only needs one matmul of [Q'⊙γ; E_I] (2B, D) against V (C·M, D) plus the per-class M×M Gram matrices.
    μ, σ (the LayerNorm statistics of each anchor), the Gram matrices and the additive padding mask depend on the
    anchors alone: they live in non-persistent buffers, filled by `refresh_anchor_statistics` whenever the anchors
    change (`set_anchor_embeddings`, loading, a dtype or device move), so `forward` reads them and `torch.export` /
    `torch.compile(fullgraph=True)` trace it. At iNaturalist scale (C = 8142, M = 64, D = 512, B = 128) this avoids
    the 2 GB G tensor and the 1 GB K tensor.
    """

    def __init__(self, config: VLLTRConfig):
        super().__init__()
        dim = config.projection_dim
        num_labels, num_anchors = config.num_labels, config.num_anchor_sentences
        self.scale = dim**-0.5
        self.detach_anchor_norm = config.detach_anchor_norm
        self.query_norm = nn.LayerNorm(dim)
        self.query_proj = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim)
        self.key_proj = nn.Linear(dim, dim, bias=False)
        # anchor-only quantities, derived from `anchor_text_embeds` / `anchor_mask` (not saved: recomputed on load)
        self.register_buffer("anchor_mean", torch.zeros(num_labels, num_anchors), persistent=False)  # μ (C, M)
        self.register_buffer("anchor_inv_std", torch.zeros(num_labels, num_anchors), persistent=False)  # 1/σ (C, M)
        self.register_buffer("anchor_gram", torch.zeros(num_labels, num_anchors, num_anchors), persistent=False)
        self.register_buffer("anchor_mask_bias", torch.zeros(num_labels, num_anchors), persistent=False)  # (C, M)

    @torch.no_grad()
    def refresh_anchor_statistics(self, anchors: torch.Tensor, anchor_mask: torch.Tensor) -> None:
        """Recomputes (μ, 1/σ) of LN_k over each anchor, the Gram matrices V_c V_cᵀ and the additive padding mask
        from `anchors` (C, M, D) and `anchor_mask` (C, M), in the anchors' dtype."""
        variance, mean = torch.var_mean(anchors, dim=-1, unbiased=False)  # (C, M) each
        self.anchor_mean = mean
        self.anchor_inv_std = torch.rsqrt(variance + self.key_norm.eps)  # (C, M)
        self.anchor_gram = torch.bmm(anchors, anchors.transpose(1, 2))  # (C, M, M)
        mask_bias = torch.zeros(anchor_mask.shape, dtype=anchors.dtype, device=anchors.device)
        self.anchor_mask_bias = mask_bias.masked_fill_(~anchor_mask, float("-inf"))  # (C, M)

    def forward(
        self,
        image_embeds: torch.Tensor,
        anchors: torch.Tensor,
        anchor_mask: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        """P_T (B, C) from E_I (B, D) and the anchors V (C, M, D) whose statistics `refresh_anchor_statistics` holds."""
        num_classes, num_anchors, dim = anchors.shape
        mean, inv_std, gram, mask_bias = self.anchor_mean, self.anchor_inv_std, self.anchor_gram, self.anchor_mask_bias

        query = self.query_proj(self.query_norm(image_embeds))  # Q (B, D)
        query = query @ self.key_proj.weight  # Q' = Q·W_k (B, D): K = LN_k(V)·W_kᵀ is never built
        query_gamma = query * self.key_norm.weight  # Q'⊙γ (B, D)
        # one pass over V for both products: (2B, D) @ (D, C·M)
        products = torch.cat([query_gamma, image_embeds.to(query_gamma.dtype)]) @ anchors.reshape(-1, dim).T
        products = products.view(2, -1, num_classes, num_anchors)  # (2, B, C, M)
        q_dot_v, e_dot_v = products[0], products[1]  # Q'γ·V and ⟨E_I, V⟩, (B, C, M) each

        # Q·K / √D = (Q'γ·V − μ·ΣQ'γ)/σ + Q'·β, then the padding mask
        attn = (q_dot_v - query_gamma.sum(-1)[:, None, None] * mean) * inv_std
        attn = attn + (query @ self.key_norm.bias)[:, None, None]
        attn = (attn * self.scale + mask_bias).softmax(dim=-1)  # A (B, C, M)

        g_dot_e = (attn * e_dot_v).sum(-1)  # ⟨E_I, G_c⟩ (B, C)
        attn_gram = torch.bmm(attn.transpose(0, 1), gram).transpose(0, 1)  # A·(V Vᵀ) (B, C, M)
        g_norm = (attn_gram * attn).sum(-1).clamp_min(1e-12).sqrt()  # ‖G_c‖ (B, C)
        if self.detach_anchor_norm:
            g_norm = g_norm.detach()  # reference `v_detach`: same values, gradient only through ⟨E_I, G_c⟩
        e_norm = image_embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # ‖E_I‖ (B, 1)
        return logit_scale * g_dot_e / (g_norm * e_norm)  # P_T (B, C)

    def attention_weights(
        self, image_embeds: torch.Tensor, anchors: torch.Tensor, anchor_mask: torch.Tensor, class_ids: torch.Tensor
    ) -> torch.Tensor:
        """A_{b, c_b, :}, the attention of image b over the anchors of class `class_ids[b]`: the softmax over that
        class's real anchors of Q·K / √D, by the same rewrite as `forward` (K is not built), for one class per image.

        Args:
            image_embeds (`torch.Tensor` of shape `(B, D)`): E_I.
            anchors (`torch.Tensor` of shape `(C, M, D)`): V = E_T.
            anchor_mask (`torch.Tensor` of shape `(C, M)`): True for real anchors.
            class_ids (`torch.Tensor` of shape `(B,)`): the class explained for each image.

        Returns:
            `torch.Tensor` of shape `(B, M)`: weights summing to 1 over each class's real anchors, 0 on padding.
        """
        class_anchors = anchors[class_ids]  # V_c (B, M, D)
        variance, mean = torch.var_mean(class_anchors, dim=-1, unbiased=False)  # μ, σ² of LN_k (B, M)
        inv_std = torch.rsqrt(variance + self.key_norm.eps)  # (B, M)
        query = self.query_proj(self.query_norm(image_embeds)) @ self.key_proj.weight  # Q' = Q·W_k (B, D)
        query_gamma = query * self.key_norm.weight  # Q'⊙γ (B, D)
        q_dot_v = torch.einsum("bd,bmd->bm", query_gamma, class_anchors.to(query_gamma.dtype))  # Q'γ·V (B, M)
        attn = (q_dot_v - query_gamma.sum(-1, keepdim=True) * mean) * inv_std  # (B, M)
        attn = attn + (query @ self.key_norm.bias)[:, None]  # + Q'·β: Q·K (B, M)
        attn = (attn * self.scale).masked_fill(~anchor_mask[class_ids], float("-inf"))  # (B, M)
        return attn.softmax(dim=-1)  # A (B, M)


# ----------------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------------------------------


def _check_pixel_values(pixel_values: torch.Tensor | None, config: VLLTRConfig, interpolate_pos_encoding: bool):
    if pixel_values is None:
        raise ValueError("pixel_values is required.")
    vision = config.clip_config.vision_config
    size = vision.image_size
    expected = f"(batch_size, {vision.num_channels}, {size}, {size})"
    if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a tensor of shape {expected}, got {shape}.")
    if pixel_values.shape[1] != vision.num_channels:
        raise ValueError(
            f"pixel_values must have {vision.num_channels} channels, shape {expected}; got {tuple(pixel_values.shape)}."
        )
    if not interpolate_pos_encoding and tuple(pixel_values.shape[2:]) != (size, size):
        raise ValueError(
            f"pixel_values must be {size}x{size} for this model, shape {expected}; got {tuple(pixel_values.shape)}. "
            f"Preprocess with the checkpoint's image processor, or pass interpolate_pos_encoding=True."
        )


def _with_config_output_flags(config: VLLTRConfig, kwargs: dict) -> dict:
    """`output_hidden_states` / `output_attentions` set on the VL-LTR config (or its `clip_config`) reach the CLIP
    towers, which read their own sub-configs: as `CLIPModel` honours flags set on its `text_config` / `vision_config`.
    An explicit argument wins."""
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag) is None and (getattr(config, flag, False) or getattr(config.clip_config, flag, False)):
            kwargs = {**kwargs, flag: True}
    return kwargs


def _is_tracing() -> bool:
    """True under `torch.compile` or `torch.export`, where checks that read tensor values cannot run."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _check_labels(labels: torch.Tensor, batch_size: int, num_labels: int) -> None:
    if labels.dtype.is_floating_point:
        if tuple(labels.shape) != (batch_size, num_labels):
            raise ValueError(
                f"Soft labels must have shape (batch_size, num_labels) = ({batch_size}, {num_labels}), "
                f"got {tuple(labels.shape)}."
            )
        return
    if tuple(labels.shape) != (batch_size,):
        raise ValueError(f"labels must be class ids of shape ({batch_size},), got {tuple(labels.shape)}.")
    if _is_tracing():
        return  # the range check reads tensor values: it stays out of an exported or compiled graph
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        bad = labels[(labels < 0) | (labels >= num_labels)].unique().tolist()
        raise ValueError(f"labels must lie in [0, {num_labels}), got {bad}.")


def _raise_if_anchor_shapes_differ(pretrained_model_name_or_path, kwargs: dict) -> None:
    """After transformers refused a checkpoint for a size mismatch: if the anchor buffers are the ones that differ
    from the config, raise a `ValueError` naming them and both shapes. Reads only the safetensors header."""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    config = kwargs.get("config")
    if not isinstance(config, PreTrainedConfig):
        config = VLLTRConfig.from_pretrained(pretrained_model_name_or_path, **hub)
    try:
        weights = cached_file(pretrained_model_name_or_path, "model.safetensors", **hub)
        with safe_open(weights, framework="pt") as f:
            shapes = {
                k: tuple(f.get_slice(k).get_shape()) for k in ("anchor_text_embeds", "anchor_mask") if k in f.keys()
            }
    except (OSError, ValueError):
        return  # sharded or unreadable: keep transformers' own error
    expected = {
        "anchor_text_embeds": (config.num_labels, config.num_anchor_sentences, config.projection_dim),
        "anchor_mask": (config.num_labels, config.num_anchor_sentences),
    }
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ValueError(
                f"{name} in {pretrained_model_name_or_path} has shape {shape}, but the config expects (num_labels, "
                f"num_anchor_sentences{', projection_dim' if name == 'anchor_text_embeds' else ''}) = "
                f"{expected[name]}: the checkpoint's weights and config.json disagree."
            )


def anchors_closest_to_mean(text_embeds: torch.Tensor, num_anchors: int) -> torch.LongTensor:
    """Anchor choice for a class that has sentences but no images (AnSS needs images): the `num_anchors` sentences
    whose unit embedding is closest in cosine to the normalised mean of the class's unit sentence embeddings, most
    central first; ties keep the given order. Not in the paper; used by `VLLTRForImageClassification.add_classes`.

    Args:
        text_embeds (`torch.Tensor` of shape `(n, D)`): the class's sentence embeddings E_T.

    Returns:
        `torch.LongTensor` of shape `(min(n, num_anchors),)`: positions in `text_embeds`.
    """
    unit = F.normalize(text_embeds.float(), dim=-1)  # (n, D)
    centre = F.normalize(unit.mean(0), dim=0)  # (D,)
    similarity = unit @ centre  # (n,)
    return torch.sort(-similarity, stable=True).indices[:num_anchors]


def _describe_class_mismatch(saved: list[str], wanted: list[str]) -> str | None:
    """None when `wanted` orders the same class names as `saved`; else which names are unknown / missing."""
    unknown = [name for name in wanted if name not in saved]
    missing = [name for name in saved if name not in wanted]
    if not unknown and not missing and len(saved) == len(wanted):
        return None
    return (
        "; ".join(
            f"{label}: {names[:10]}{' ...' if len(names) > 10 else ''}"
            for label, names in (("not in the checkpoint", unknown), ("missing from id2label", missing))
            if names
        )
        or f"{len(wanted)} names for the checkpoint's {len(saved)} classes"
    )


def _class_mismatch_message(source: str, described: str) -> str:
    return (
        f"id2label does not name the classes that the anchors and classifier rows of {source} belong to "
        f"({described}). Pass the checkpoint's class names (in any order), or ignore_mismatched_sizes=True to start "
        f"a new head whose anchors must be rebuilt."
    )


def _class_key(name: str) -> str:
    """The form in which two class names count as the same class: case, underscores and runs of white space do not
    count (the rule the training scripts' class-list checks apply; this file ships alone as Hub remote code)."""
    return " ".join(str(name).replace("_", " ").split()).casefold()


def _raise_if_class_names_differ(pretrained_model_name_or_path, kwargs: dict) -> None:
    """After transformers refused a checkpoint for a size mismatch: if the `id2label` passed names other classes
    than the checkpoint's `anchor_class_names`, raise a `ValueError` naming them."""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    config = kwargs.get("config")
    id2label = config.id2label if isinstance(config, PreTrainedConfig) else kwargs.get("id2label")
    saved = VLLTRConfig.from_pretrained(pretrained_model_name_or_path, **hub).anchor_class_names
    if id2label is None or saved is None:
        return
    wanted = [str(id2label[key]) for key in sorted(id2label, key=int)]
    described = _describe_class_mismatch(saved, wanted)
    if described is not None:
        raise ValueError(_class_mismatch_message(str(pretrained_model_name_or_path), described))


def _recheck_anchors_after_load(module: nn.Module, incompatible_keys) -> None:
    # new anchors arrived through load_state_dict: refresh their statistics now, check them before the next forward
    module._anchors_checked = False
    if module.config.head_type == "lgr":
        module.text_branch.refresh_anchor_statistics(module.anchor_text_embeds, module.anchor_mask)


class VLLTRPreTrainedModel(PreTrainedModel):
    config: VLLTRConfig
    config_class = VLLTRConfig
    base_model_prefix = "clip"  # the attribute holding the CLIPModel: a plain CLIP checkpoint loads into it
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # Auto classes written to `auto_map` by `save_pretrained`, besides `AutoConfig` (so the checkpoint loads as remote
    # code in a process that never installed this package), each with the class it gives. As in transformers,
    # `AutoModel` is the base model (`VLLTRModel`, a CLIP) for every checkpoint, a classifier's included: that is what
    # `pipeline("image-feature-extraction")` loads.
    _auto_map_classes: dict[str, str] = {
        "AutoModel": "VLLTRModel",
        "AutoModelForZeroShotImageClassification": "VLLTRModel",
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a cut-short or damaged weights file (an interrupted copy or download)
        raises an `OSError` of one line naming the file, not safetensors' own error."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            if not type(error).__module__.startswith("safetensors"):
                raise
            folder = "/".join(filter(None, [str(pretrained_model_name_or_path).rstrip("/"), kwargs.get("subfolder")]))
            raise OSError(
                f"{folder}/model.safetensors: cannot read the weights ({error}); the file is cut short or damaged (an "
                f"interrupted copy or download): copy or download it again."
            ) from None

    def _init_weights(self, module):
        """The head's init. The CLIP parts (`self.clip`, a `CLIPModel`) get CLIP's own `_init_weights`: transformers
        dispatches every sub-model to its own (`logit_scale` is set by `initialize_weights`). `transformers.initialization`
        skips every tensor already loaded from a checkpoint, so loaded weights and anchors are never overwritten."""
        # Container modules without parameters of their own (VLLTRTextBranch, VLLTRImageBranch) are skipped by
        # transformers' initialisation of custom code, so everything is set from the leaves or the top model.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, VLLTRCosineClassifier):
            init.normal_(module.weight, std=std)
        elif isinstance(module, VLLTRAdaptFormer):  # LIFT's init (runs after the leaves' own)
            init.kaiming_normal_(module.down_proj.weight, a=math.sqrt(5))
            init.zeros_(module.down_proj.bias)
            init.zeros_(module.up_proj.weight)
            init.zeros_(module.up_proj.bias)
            init.ones_(module.scale)
        if isinstance(module, VLLTRForImageClassification) and module.config.head_type == "lgr":
            # reference `_init_weights`: W_q and W_k start as the identity (runs after the leaves' normal init)
            init.eye_(module.text_branch.query_proj.weight)
            init.eye_(module.text_branch.key_proj.weight)
            init.zeros_(module.anchor_text_embeds)
            init.zeros_(module.anchor_mask)  # no anchors yet: forward refuses to run until they are set
            branch = module.text_branch
            for buffer in (branch.anchor_mean, branch.anchor_inv_std, branch.anchor_gram, branch.anchor_mask_bias):
                init.zeros_(buffer)  # derived from the anchors; refreshed when they are set or loaded

    def _add_adaptformer(self) -> None:
        """With `config.adaptformer_dim`, one [`VLLTRAdaptFormer`] per vision encoder layer (`self.adaptformer`, so
        the adapters are saved in `model.safetensors` beside the tower they adapt), wired in without changing CLIP's
        code: a forward pre-hook on the layer's `layer_norm2` keeps its input h (the residual stream after attention)
        and a forward hook on its `mlp` adds a(h) to the MLP's output, so the layer computes
        h + MLP(LN_2(h)) + a(h), LIFT's placement. A layer re-run by gradient checkpointing fires both hooks again."""
        if self.config.adaptformer_dim is None:
            return
        vision = self.config.clip_config.vision_config
        layers = self.clip.vision_model.encoder.layers
        self.adaptformer = nn.ModuleList(
            VLLTRAdaptFormer(vision.hidden_size, self.config.adaptformer_dim) for _ in layers
        )
        self._adaptformer_inputs: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            layer.layer_norm2.register_forward_pre_hook(partial(self._keep_adaptformer_input, i))
            layer.mlp.register_forward_hook(partial(self._add_adaptformer_output, i))

    def _keep_adaptformer_input(self, index: int, module: nn.Module, args: tuple) -> None:
        self._adaptformer_inputs[index] = args[0]  # h, the residual stream entering LN_2 (B, N, H)

    def _add_adaptformer_output(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor):
        return output + self.adaptformer[index](self._adaptformer_inputs.pop(index))  # MLP(LN_2(h)) + a(h)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False, though this code lives outside transformers: for custom code, transformers' initialisation skips every
        module whose own tensors are already set, a guard for `_init_weights` that write tensors in place. This one
        uses `transformers.initialization` throughout (which skips loaded tensors itself), and the guard would also
        skip CLIP's own re-initialisation of its attention and MLP projections (`CLIPPreTrainedModel._init_weights`
        on `CLIPAttention` / `CLIPMLP`, modules without tensors of their own), so a build from `from_pretrained` with
        missing keys would differ from `VLLTRModel(config)`."""
        return False

    @torch.no_grad()
    def initialize_weights(self):
        """`PreTrainedModel.initialize_weights`, then `clip.logit_scale` = `clip_config.logit_scale_init_value`
        (log(1/0.07)) unless it was loaded: `CLIPModel` sets it in its constructor only, so a build on the meta device
        (`from_pretrained` with the key missing) would otherwise keep whatever memory it got."""
        super().initialize_weights()
        init.constant_(self.clip.logit_scale, self.config.clip_config.logit_scale_init_value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus an `auto_map` for every Auto class this checkpoint serves, so
        `AutoModel...from_pretrained(dir, trust_remote_code=True)` works without the package installed."""
        self.config.auto_map = {
            "AutoConfig": "configuration_vlltr.VLLTRConfig",
            **{auto: f"modeling_vlltr.{name}" for auto, name in self._auto_map_classes.items()},
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Public models
# ----------------------------------------------------------------------------------------------------------------------


class VLLTRModel(VLLTRPreTrainedModel):
    """
    The stage-1 (CVLP) VL-LTR model: a [`CLIPModel`] held as `self.clip`, trained with the class-wise contrastive and
    distillation losses of `training.losses`. It behaves like `CLIPModel`: `forward(pixel_values, input_ids,
    attention_mask)` returns scaled image-text similarities, and `pipeline("zero-shot-image-classification")` serves
    it. A plain CLIP checkpoint loads into it with `VLLTRModel.from_pretrained("openai/clip-vit-base-patch16")`.
    """

    main_input_name = "input_ids"  # the first argument of `forward`, as for `CLIPModel`
    input_modalities = ("image", "text")
    # A stage-2 checkpoint loads into it as a ViT classifier checkpoint loads into `ViTModel`: the head is left out.
    _keys_to_ignore_on_load_unexpected = [
        r"^image_branch\.",
        r"^text_branch\.",
        r"^classifier\.",
        r"^anchor_text_embeds$",
        r"^anchor_mask$",
    ]

    def __init__(self, config: VLLTRConfig):
        super().__init__(config)
        config._validate_head_fields()
        self.clip = CLIPModel(config.clip_config)
        self._add_adaptformer()
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """The CLIP vision tower's output, as `CLIPModel.get_image_features` returns it: `pooler_output` is E_I, the
        projected, not normalised image embedding `(batch_size, projection_dim)`."""
        _check_pixel_values(pixel_values, self.config, interpolate_pos_encoding)
        return self.clip.get_image_features(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            **_with_config_output_flags(self.config, kwargs),
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """The CLIP text tower's output, as `CLIPModel.get_text_features` returns it: `pooler_output` is E_T, the
        projected, not normalised text embedding `(batch_size, projection_dim)`."""
        return self.clip.get_text_features(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **_with_config_output_flags(self.config, kwargs),
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VLLTRModelOutput:
        r"""
        Like `CLIPModel.forward` (same arguments, same order): scaled similarities of every image to every text.
        Given images alone (no `input_ids`), only `image_embeds` (and `vision_model_output`) are returned, so the
        output's first tensor is the L2-normalised image embedding E_I / ‖E_I‖: what
        `pipeline("image-feature-extraction")` returns for a stage-1 checkpoint.

        return_loss (`bool`, *optional*):
            Return CLIP's symmetric contrastive loss of the batch as `loss`.
        """
        if pixel_values is None:
            raise ValueError("VLLTRModel.forward needs pixel_values (and input_ids for image-text similarities).")
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, **kwargs)
        if input_ids is None:  # images alone (e.g. `pipeline("image-feature-extraction")`): E_I / ‖E_I‖ comes first
            image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)  # (N_img, D)
            return VLLTRModelOutput(image_embeds=image_embeds, vision_model_output=vision_outputs)
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, **kwargs)
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)  # E_I / ‖E_I‖ (N_img, D)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)  # E_T / ‖E_T‖ (N_txt, D)
        logit_scale = self.clip.logit_scale.exp()  # 1/τ, learnable and not clamped (reference CVLP)
        logits_per_image = logit_scale * image_embeds @ text_embeds.T  # (N_img, N_txt)
        loss = image_text_contrastive_loss(logits_per_image.T) if return_loss else None
        return VLLTRModelOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            logit_scale=logit_scale,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


class VLLTRForImageClassification(VLLTRPreTrainedModel):
    """
    The stage-2 VL-LTR classifier: the CLIP image tower, the image branch P_I = MLP(E_I), and the language-guided text
    branch P_T, which attends over each class's M anchor sentences (`anchor_text_embeds`, chosen by AnSS and stored in
    `model.safetensors`). At test time the two are fused: `P = α·softmax(P_I) + (1 − α)·softmax(P_T)`; `logits` is
    log P, so `pipeline("image-classification")` reports P.

    With `config.head_type == "fc"` the head is a single linear classifier on E_I (the paper's FC ablation) and
    there are no anchors. With `config.head_type == "cosine"` it is LIFT's cosine classifier `s·cos(E_I, w_c)`
    ([`VLLTRCosineClassifier`]), whose logits are the prediction.

    The CLIP text tower, `text_projection` and `logit_scale` stay in the model (anchors are made and extended with
    them, and the text branch uses the stage-1 temperature) but `forward` never trains them: they are built with
    `requires_grad=False`, so DDP and gradient checkpointing need no `find_unused_parameters`.
    """

    input_modalities = ("image",)
    _auto_map_classes = {
        **VLLTRPreTrainedModel._auto_map_classes,
        "AutoModelForImageClassification": "VLLTRForImageClassification",
    }

    def __init__(self, config: VLLTRConfig):
        super().__init__(config)
        config._validate_head_fields()
        self.clip = CLIPModel(config.clip_config)
        self._add_adaptformer()
        num_labels, num_anchors, dim = config.num_labels, config.num_anchor_sentences, config.projection_dim
        if config.head_type == "lgr":
            self.image_branch = VLLTRImageBranch(config)
            self.text_branch = VLLTRTextBranch(config)
            self.register_buffer("anchor_text_embeds", torch.zeros(num_labels, num_anchors, dim))  # V = E_T (C, M, D)
            self.register_buffer("anchor_mask", torch.zeros(num_labels, num_anchors, dtype=torch.bool))  # (C, M)
        elif config.head_type == "cosine":
            self.classifier = VLLTRCosineClassifier(config)  # s·cos(E_I, w_c), LIFT's head
        else:
            self.classifier = nn.Linear(config.classifier_input_dim, num_labels)
        self._anchors_checked = False
        self.register_load_state_dict_post_hook(_recheck_anchors_after_load)
        self.post_init()
        self._freeze_unused_parameters()

    def _freeze_unused_parameters(self) -> None:
        # unused by forward (P_T reads the stored anchors and a detached stage-1 τ): frozen, but kept in the checkpoint
        for module in (self.clip.text_model, self.clip.text_projection):
            module.requires_grad_(False)
        self.clip.logit_scale.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        """The vision tower's patch embedding: the classifier's input is `pixel_values`, the text tower is unused."""
        return self.clip.vision_model.get_input_embeddings()

    # -- anchors -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_anchor_embeddings(
        self, embeds: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> None:
        """Stores the anchor sentence embeddings E_T (raw stage-1 text embeddings, not normalised).

        Args:
            embeds: a `(num_labels, num_anchor_sentences, projection_dim)` tensor, or a list with one
                `(n_c, projection_dim)` tensor per class, `1 <= n_c <= num_anchor_sentences` (padded and masked).
            mask: with a tensor, an optional `(num_labels, num_anchor_sentences)` bool tensor, True for real anchors
                (classes with fewer than M sentences); default all True.
        """
        if self.config.head_type != "lgr":
            raise ValueError("set_anchor_embeddings needs head_type='lgr'; this model has the FC head.")
        num_labels, num_anchors, dim = self.anchor_text_embeds.shape
        expected = f"(num_labels={num_labels}, num_anchor_sentences={num_anchors}, projection_dim={dim})"
        if isinstance(embeds, (list, tuple)):
            if mask is not None:
                raise ValueError("Pass mask only with a padded tensor; with a list it is derived from the lengths.")
            if len(embeds) != num_labels:
                raise ValueError(f"Expected one anchor tensor per class ({num_labels}), got {len(embeds)}.")
            padded = torch.zeros(num_labels, num_anchors, dim, dtype=self.anchor_text_embeds.dtype)
            mask = torch.zeros(num_labels, num_anchors, dtype=torch.bool)
            for c, class_embeds in enumerate(embeds):
                if (
                    class_embeds.dim() != 2
                    or class_embeds.shape[1] != dim
                    or not 1 <= len(class_embeds) <= num_anchors
                ):
                    raise ValueError(
                        f"Anchors of class {c} ({self.config.id2label.get(c, c)!r}) must have shape (n, {dim}) with "
                        f"1 <= n <= {num_anchors}, got {tuple(class_embeds.shape)}."
                    )
                padded[c, : len(class_embeds)] = class_embeds.to(padded.dtype).cpu()
                mask[c, : len(class_embeds)] = True
            embeds = padded
        if not torch.is_tensor(embeds) or tuple(embeds.shape) != (num_labels, num_anchors, dim):
            got = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
            raise ValueError(
                f"anchor_text_embeds must have shape {expected}, got {got}. The last dimension must equal "
                f"clip_config.projection_dim ({dim})."
            )
        if mask is None:
            mask = torch.ones(num_labels, num_anchors, dtype=torch.bool)
        if tuple(mask.shape) != (num_labels, num_anchors):
            raise ValueError(f"anchor_mask must have shape ({num_labels}, {num_anchors}), got {tuple(mask.shape)}.")
        mask = mask.to(device=self.anchor_mask.device, dtype=torch.bool)
        embeds = embeds.to(self.anchor_text_embeds).masked_fill(~mask[..., None], 0.0)
        self._check_anchor_values(embeds, mask)
        self.anchor_text_embeds.copy_(embeds)
        self.anchor_mask.copy_(mask)
        self.text_branch.refresh_anchor_statistics(self.anchor_text_embeds, self.anchor_mask)
        self.config.anchor_class_names = self._class_names()
        self._anchors_checked = True

    def set_anchor_sentences(self, sentences: list[list[str]] | None) -> None:
        """Stores the text of the anchor sentences in `config.anchor_sentences`, so `explain` names them from the
        checkpoint alone. One list per class, in anchor-slot order: the sentence of `anchor_text_embeds[c, m]` is
        `sentences[c][m]` for every real anchor (`anchor_mask[c, m]`); an empty list leaves a class's text unknown.
        """
        if sentences is not None:
            if self.config.head_type != "lgr":
                raise ValueError("set_anchor_sentences needs head_type='lgr'; this model has the FC head.")
            counts = self.anchor_mask.sum(-1).tolist()  # real anchors per class (a prefix of each row)
            if len(sentences) != len(counts):
                raise ValueError(
                    f"Expected one list of anchor sentences per class ({len(counts)}), got {len(sentences)}."
                )
            for c, (class_sentences, count) in enumerate(zip(sentences, counts)):
                if len(class_sentences) not in (0, count):
                    raise ValueError(
                        f"Class {c} ({self.config.id2label.get(c, c)!r}) has {count} anchors in anchor_mask but "
                        f"{len(class_sentences)} anchor sentences."
                    )
            sentences = [[str(t) for t in class_sentences] for class_sentences in sentences]
        self.config.anchor_sentences = sentences

    def _apply(self, fn, recurse: bool = True):
        # a dtype or device move casts the anchors: recompute their statistics from the cast anchors (`.to(float64)`
        # then gives float64-exact statistics, not float32 ones cast up)
        super()._apply(fn, recurse)
        if self.config.head_type == "lgr" and not self.anchor_text_embeds.is_meta:
            self.text_branch.refresh_anchor_statistics(self.anchor_text_embeds, self.anchor_mask)
        return self

    def _check_anchor_values(self, embeds: torch.Tensor, mask: torch.Tensor, source: str = "") -> None:
        where = f" in {source}" if source else ""
        empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
        if empty:
            names = [self.config.id2label.get(c, str(c)) for c in empty[:5]]
            if len(empty) == mask.shape[0]:
                raise ValueError(
                    f"anchor_text_embeds{where} are not set (anchor_mask is all False). Run anchor selection "
                    f"(python -m training.run_select_anchors) or call model.set_anchor_embeddings(...)."
                )
            raise ValueError(f"anchor_mask{where} has no anchor for {len(empty)} class(es), e.g. {names}.")
        bad = (~torch.isfinite(embeds) & mask[..., None]).any(-1).any(-1).nonzero().flatten().tolist()
        if bad:
            names = [self.config.id2label.get(c, str(c)) for c in bad[:5]]
            raise ValueError(f"anchor_text_embeds{where} hold NaN or inf for {len(bad)} class(es), e.g. {names}.")

    def check_anchors(self, source: str = "") -> None:
        """Raises a `ValueError` naming `anchor_text_embeds` / `anchor_mask` if they are unset, hold NaN/inf, or
        leave a class without anchors. Run at load time and, lazily, before the first forward."""
        if self.config.head_type == "lgr":
            self._check_anchor_values(self.anchor_text_embeds, self.anchor_mask, source)
        self._anchors_checked = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        try:
            result = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" in str(error):  # transformers' message names no tensor: find the anchors
                _raise_if_class_names_differ(pretrained_model_name_or_path, kwargs)
                _raise_if_anchor_shapes_differ(pretrained_model_name_or_path, kwargs)
            raise
        model = result[0] if isinstance(result, tuple) else result
        model._freeze_unused_parameters()  # loading replaced the parameters
        model._follow_label_map(str(pretrained_model_name_or_path), kwargs.get("ignore_mismatched_sizes", False))
        if model.config.head_type == "lgr":
            model.text_branch.refresh_anchor_statistics(model.anchor_text_embeds, model.anchor_mask)
        if model.config.head_type == "lgr" and model.anchor_mask.any():
            # Anchors came from the checkpoint: refuse NaN / a class without anchors now, not at the first batch.
            # (A checkpoint without anchors, e.g. stage 1, is fine: forward asks for them.)
            model.check_anchors(source=str(pretrained_model_name_or_path))
        return result

    # -- explanations and classes added from text ----------------------------------------------------------------------

    def _text_only_mask(self) -> torch.Tensor | None:
        """Bool `(num_labels,)`, True for classes added from text alone (`config.text_only_classes`); None if none."""
        ids = self.config.text_only_classes
        if not ids:
            return None
        mask = torch.zeros(self.config.num_labels, dtype=torch.bool)
        mask[torch.tensor(ids, dtype=torch.long)] = True
        return mask.to(self.anchor_mask.device)

    def branch_probabilities(
        self, image_logits: torch.Tensor, text_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two probabilities `logits` fuses: softmax(P_I) over the classes the image branch was trained on (0 for
        `config.text_only_classes`) and softmax(P_T) over every class, both `(batch_size, num_labels)`."""
        text_only = self._text_only_mask()
        image_logits = image_logits.float()
        if text_only is not None:
            image_logits = image_logits.masked_fill(text_only, float("-inf"))
        return image_logits.softmax(dim=-1), text_logits.float().softmax(dim=-1)

    @torch.no_grad()
    def explain(
        self,
        pixel_values: torch.FloatTensor,
        top_k: int = 5,
        class_ids: torch.Tensor | list[int] | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> list[dict]:
        """Why this class? For each image, the predicted class (or `class_ids[b]`), its fused, image-branch and
        text-branch probabilities, and that class's anchor sentences ranked by the LGR attention the image puts on
        them (A = softmax(QKᵀ/√D) over the class's real anchors, the weights G is built from), like the paper's
        "lion" / "mountain bike" examples. The sentences come from `config.anchor_sentences`, so a checkpoint
        explains itself with nothing beside it; where a class's text is unknown, `sentence` is None.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): the images.
            top_k (`int`, *optional*, defaults to 5): anchors listed per image (fewer if the class has fewer).
            class_ids (`torch.Tensor` or `list[int]` of shape `(batch_size,)`, *optional*): explain these classes
                (e.g. the true ones of wrong predictions) instead of the predicted ones.

        Returns:
            `list[dict]`, one per image: `label`, `class_name`, `predicted_label`, `probability` (fused),
            `image_probability`, `text_probability`, and `anchors`, a list of `{"slot", "sentence", "weight"}` in
            descending weight (`slot` indexes `anchor_text_embeds[label]`).
        """
        if self.config.head_type != "lgr":
            raise ValueError("explain needs head_type='lgr': the FC head has no anchor sentences to rank.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
        out = self(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        probabilities = out.logits.float().softmax(dim=-1)  # fused P (B, C)
        image_probabilities, text_probabilities = self.branch_probabilities(out.image_logits, out.text_logits)
        predicted = probabilities.argmax(dim=-1)  # (B,)
        if class_ids is None:
            class_ids = predicted
        else:
            class_ids = torch.as_tensor(class_ids, dtype=torch.long, device=predicted.device).reshape(-1)
            num_labels = self.config.num_labels
            if class_ids.shape != predicted.shape or bool(((class_ids < 0) | (class_ids >= num_labels)).any()):
                raise ValueError(
                    f"class_ids must hold one class id in [0, {num_labels}) per image ({predicted.shape[0]}), "
                    f"got {class_ids.tolist()}."
                )
        weights = self.text_branch.attention_weights(
            out.image_embeds, self.anchor_text_embeds, self.anchor_mask, class_ids
        )  # A (B, M)
        counts = self.anchor_mask.sum(-1).tolist()  # real anchors per class (a prefix of each row)
        stored = self.config.anchor_sentences
        explanations = []
        for b, c in enumerate(class_ids.tolist()):
            class_sentences = stored[c] if stored is not None and len(stored[c]) == counts[c] else None
            top = weights[b, : counts[c]].float().topk(min(top_k, counts[c]))
            explanations.append(
                {
                    "label": c,
                    "class_name": self.config.id2label.get(c, str(c)),
                    "predicted_label": int(predicted[b]),
                    "probability": float(probabilities[b, c]),
                    "image_probability": float(image_probabilities[b, c]),
                    "text_probability": float(text_probabilities[b, c]),
                    "anchors": [
                        {"slot": m, "sentence": class_sentences[m] if class_sentences else None, "weight": w}
                        for w, m in zip(top.values.tolist(), top.indices.tolist())
                    ],
                }
            )
        return explanations

    @torch.no_grad()
    def add_classes(self, names: list[str], sentences: list[list[str]], tokenizer, batch_size: int = 256) -> list[int]:
        """Adds classes from their descriptions alone, without images and without training (not in the paper).

        Each new class's sentences are embedded by the checkpoint's own (stage-1) text tower, exactly as anchor
        selection embeds the corpus, and its anchors are the M = `config.num_anchor_sentences` sentences closest to
        the class's mean text embedding (`anchors_closest_to_mean`; AnSS would need images). The model grows in
        place: `anchor_text_embeds`, `anchor_mask`, `config.anchor_sentences`, `id2label` / `label2id`, and the
        image branch's last layer (zero rows: the image branch has never seen the class). The new ids go to
        `config.text_only_classes`, whose fused probability is the text branch's (see `fused_log_probabilities`).
        Every existing class keeps its anchors and weights, so its image and text logits are unchanged, and the
        fused logits of the existing classes keep their order. `save_pretrained` then writes the grown checkpoint.

        Sentences are embedded as given. The prompt templates of the training corpus ("a photo of a {}.") are the
        caller's to add: `python -m training.add_classes` builds the sentences with the corpus loader used by anchor
        selection (templates plus descriptions). The modeling package, shipped as remote code, holds no training
        code.

        Args:
            names (`list[str]`): the new class names, none of them already in `id2label`.
            sentences (`list[list[str]]`): per new class, its sentences (at least one, each within the text
                tower's context of `text_config.max_position_embeddings` tokens).
            tokenizer: the checkpoint's tokenizer (`AutoTokenizer.from_pretrained(checkpoint)`).
            batch_size (`int`, *optional*, defaults to 256): sentences embedded at once.

        Returns:
            `list[int]`: the new class ids, `num_labels_before ... num_labels_after - 1`.

        Raises a one-line `ValueError` (and leaves the model as it was) for a name that already exists or repeats, a
        class without sentences, a sentence longer than the text context, or a tokenizer whose vocabulary differs
        from the text tower's.
        """
        if self.config.head_type != "lgr":
            raise ValueError("add_classes needs head_type='lgr': the FC head has no text branch to classify with.")
        names, sentences = list(names), [s for s in sentences]
        if not names:
            raise ValueError("add_classes needs at least one new class name.")
        if len(sentences) != len(names):
            raise ValueError(f"Give one list of sentences per new class: {len(names)} names, {len(sentences)} lists.")
        existing = {_class_key(name): (label, name) for label, name in self.config.id2label.items()}
        for k, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"New class names must be non-empty strings, got {name!r}.")
            if _class_key(name) in existing:
                label, old = existing[_class_key(name)]
                same = "" if old == name else f" as {old!r} (case, underscores and spacing do not count)"
                raise ValueError(f"Class {name!r} already exists in this checkpoint (label {label}{same}).")
            earlier = [n for n in names[:k] if _class_key(n) == _class_key(name)]
            if earlier:
                same = (
                    "" if earlier[0] == name else f" (as {earlier[0]!r}; case, underscores and spacing do not count)"
                )
                raise ValueError(f"Class {name!r} is given twice{same}.")
        for name, class_sentences in zip(names, sentences):
            if isinstance(class_sentences, str) or not isinstance(class_sentences, (list, tuple)):
                raise ValueError(
                    f"The sentences of class {name!r} must be a list of strings, got {class_sentences!r}."
                )
            if not class_sentences:
                raise ValueError(f"Class {name!r} has no sentences: give at least one description of it.")
            for i, text in enumerate(class_sentences):
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"Sentence {i + 1} of class {name!r} is empty or not a string: {text!r}.")

        text_config = self.config.clip_config.text_config
        if len(tokenizer) != text_config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but this checkpoint's text tower has vocab_size "
                f"{text_config.vocab_size}: use the tokenizer saved with the checkpoint."
            )
        max_length = text_config.max_position_embeddings
        flat = [text for class_sentences in sentences for text in class_sentences]
        lengths = [len(ids) for ids in tokenizer(flat, truncation=False, verbose=False)["input_ids"]]
        position = 0
        for name, class_sentences in zip(names, sentences):
            for i, text in enumerate(class_sentences):
                if lengths[position] > max_length:
                    raise ValueError(
                        f"Sentence {i + 1} of class {name!r} is {lengths[position]} tokens long; the text tower takes "
                        f"at most {max_length}: shorten or split it ({text[:60]!r}...)."
                    )
                position += 1

        # ---- embed with the checkpoint's text tower and pick each new class's anchors (nothing changed yet) ----
        embeds = self._embed_sentences(flat, tokenizer, max_length, batch_size)  # E_T (N, D)
        num_old, num_anchors, dim = self.anchor_text_embeds.shape
        new_anchors = torch.zeros(len(names), num_anchors, dim)  # (K, M, D)
        new_mask = torch.zeros(len(names), num_anchors, dtype=torch.bool)  # (K, M)
        new_sentences, start = [], 0
        for k, class_sentences in enumerate(sentences):
            class_embeds = embeds[start : start + len(class_sentences)]  # (n_k, D)
            start += len(class_sentences)
            if not bool(torch.isfinite(class_embeds).all()):
                raise ValueError(f"The text tower gave NaN or inf embeddings for class {names[k]!r}.")
            chosen = anchors_closest_to_mean(class_embeds, num_anchors)  # (≤ M,)
            new_anchors[k, : len(chosen)] = class_embeds[chosen]
            new_mask[k, : len(chosen)] = True
            new_sentences.append([class_sentences[i] for i in chosen.tolist()])
        anchors = torch.cat([self.anchor_text_embeds, new_anchors.to(self.anchor_text_embeds)])  # (C + K, M, D)
        mask = torch.cat([self.anchor_mask, new_mask.to(self.anchor_mask.device)])  # (C + K, M)
        old_sentences = self.config.anchor_sentences or [[] for _ in range(num_old)]

        # ---- grow the model ----
        new_ids = list(range(num_old, num_old + len(names)))
        old_fc2 = self.image_branch.fc2
        fc2 = nn.Linear(old_fc2.in_features, num_old + len(names), device=old_fc2.weight.device)
        fc2 = fc2.to(old_fc2.weight.dtype)
        fc2.weight.zero_()
        fc2.bias.zero_()
        fc2.weight[:num_old] = old_fc2.weight
        fc2.bias[:num_old] = old_fc2.bias
        fc2.requires_grad_(old_fc2.weight.requires_grad)
        self.image_branch.fc2 = fc2
        id2label = {**self.config.id2label, **dict(zip(new_ids, names))}
        self.config.id2label = id2label
        self.config.label2id = {name: label for label, name in id2label.items()}
        self.config.text_only_classes = sorted([*(self.config.text_only_classes or []), *new_ids])
        self.register_buffer("anchor_text_embeds", torch.zeros_like(anchors))  # (C + K, M, D)
        self.register_buffer("anchor_mask", torch.zeros_like(mask))  # (C + K, M)
        self.set_anchor_embeddings(anchors, mask)
        self.set_anchor_sentences(old_sentences + new_sentences)
        logger.info(f"Added {len(names)} class(es) from text: {names[:5]}{' ...' if len(names) > 5 else ''}.")
        return new_ids

    def _embed_sentences(self, sentences: list[str], tokenizer, max_length: int, batch_size: int) -> torch.Tensor:
        """E_T of each sentence by the checkpoint's text tower, `(N, D)` float32 on the CPU, padded to the text
        context like the training corpus."""
        was_training = self.training
        self.eval()
        device = self.anchor_text_embeds.device
        chunks = []
        for start in tqdm(
            range(0, len(sentences), batch_size), desc="Embedding sentences", disable=len(sentences) <= batch_size
        ):
            enc = tokenizer(
                sentences[start : start + batch_size],
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_tensors="pt",
            )
            features = self.clip.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            ).pooler_output  # (b, D)
            chunks.append(features.float().cpu())
        self.train(was_training)
        return torch.cat(chunks)

    # -- label map ---------------------------------------------------------------------------------------------------

    def _class_names(self) -> list[str]:
        id2label = {int(k): v for k, v in self.config.id2label.items()}  # a keyword override may keep "0" keys
        return [str(id2label[i]) for i in range(self.config.num_labels)]

    def _class_rows(self) -> list[torch.Tensor]:
        """Every tensor whose first dimension is the class: anchors, mask and the last layer of the classifier."""
        if self.config.head_type in ("fc", "cosine"):  # the cosine head has no bias
            return [p for p in (self.classifier.weight, getattr(self.classifier, "bias", None)) if p is not None]
        fc2 = self.image_branch.fc2
        return [self.anchor_text_embeds, self.anchor_mask, fc2.weight, fc2.bias]

    @torch.no_grad()
    def _follow_label_map(self, source: str, ignore_mismatched_sizes: bool) -> None:
        """After loading: if `id2label` orders the checkpoint's classes (`config.anchor_class_names`) differently,
        permute the anchors, mask and classifier rows to follow it; refuse unknown or missing class names, or with
        `ignore_mismatched_sizes` drop the anchors and start the classifier rows afresh."""
        saved, wanted = self.config.anchor_class_names, self._class_names()
        if saved is None or list(saved) == wanted:
            self.config.anchor_class_names = wanted
            return
        described = _describe_class_mismatch(saved, wanted)
        if described is None:
            order = torch.tensor([saved.index(name) for name in wanted])
            for rows in self._class_rows():
                rows.copy_(rows[order.to(rows.device)])
            moved = sum(int(i != j) for i, j in enumerate(order.tolist()))
            logger.warning(
                f"{source}: id2label orders the checkpoint's {len(wanted)} classes differently; the anchors and "
                f"classifier rows of {moved} classes were permuted to follow it (e.g. {wanted[0]!r} is now id 0)."
            )
            self.config.anchor_class_names = wanted
            return
        if not ignore_mismatched_sizes:
            raise ValueError(_class_mismatch_message(source, described))
        logger.warning(
            f"{source}: id2label names other classes than the checkpoint's ({described}). ignore_mismatched_sizes="
            f"True: the anchors are dropped and the classifier rows start afresh; rebuild the anchors "
            f"(python -m training.run_select_anchors, or set_anchor_embeddings) and train the head."
        )
        if self.config.head_type == "lgr":
            self.anchor_text_embeds.zero_()
            self.anchor_mask.zero_()
            self._anchors_checked = False
        weight, *bias = self._class_rows()[-2:] if self.config.head_type != "cosine" else self._class_rows()
        nn.init.trunc_normal_(weight, std=self.config.initializer_range)
        for b in bias:
            nn.init.zeros_(b)
        self.config.anchor_class_names = wanted

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Records the class names its anchors and classifier rows belong to (`config.anchor_class_names`), then
        saves like [`VLLTRPreTrainedModel.save_pretrained`]."""
        self.config.anchor_class_names = self._class_names()
        return super().save_pretrained(save_directory, *args, **kwargs)

    # -- forward -------------------------------------------------------------------------------------------------------

    def _vision_tower_trainable(self) -> bool:
        adapters = self.adaptformer.parameters() if self.config.adaptformer_dim is not None else ()
        return self.clip.visual_projection.weight.requires_grad or any(
            p.requires_grad for p in (*self.clip.vision_model.parameters(), *adapters)
        )

    def _encode_image(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, **kwargs
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """The vision tower's output (`pooler_output`: the pooled feature before `visual_projection`) and E_I. A
        frozen tower (adapters included) builds no autograd graph."""
        _check_pixel_values(pixel_values, self.config, interpolate_pos_encoding)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._vision_tower_trainable()):
            outputs = self.clip.vision_model(
                pixel_values=pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                return_dict=True,
                **_with_config_output_flags(self.config, kwargs),
            )
            if self.config.classifier_feature == "pooled":  # E_I is reported, not classified: no graph through it
                with torch.no_grad():
                    return outputs, self.clip.visual_projection(outputs.pooler_output)
            return outputs, self.clip.visual_projection(outputs.pooler_output)  # E_I (B, D)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """The CLIP vision tower's output, as `CLIPModel.get_image_features` returns it: `pooler_output` is E_I, the
        projected, not normalised image embedding `(batch_size, projection_dim)`. A frozen tower builds no autograd
        graph."""
        outputs, image_embeds = self._encode_image(pixel_values, interpolate_pos_encoding, **kwargs)
        outputs.pooler_output = image_embeds
        return outputs

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VLLTRImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor` of shape `(batch_size, num_labels)`,
        *optional*): class ids in `[0, num_labels)`, or soft targets (mixup / cutmix). Gives `loss`.
        """
        vision_outputs, image_embeds = self._encode_image(pixel_values, interpolate_pos_encoding, **kwargs)  # E_I
        if labels is not None:
            _check_labels(labels, image_embeds.shape[0], self.config.num_labels)
        tower = {"hidden_states": vision_outputs.hidden_states, "attentions": vision_outputs.attentions}

        if self.config.head_type in ("fc", "cosine"):
            pooled = self.config.classifier_feature == "pooled"  # LIFT's feature, before the projection
            logits = self.classifier(vision_outputs.pooler_output if pooled else image_embeds)  # (B, C)
            loss = soft_target_cross_entropy(logits, labels) if labels is not None else None
            return VLLTRImageClassifierOutput(
                loss=loss, logits=logits, image_logits=logits, image_embeds=image_embeds, **tower
            )

        if not self._anchors_checked and not _is_tracing():
            self.check_anchors()
        image_logits = self.image_branch(image_embeds)  # P_I (B, C)
        # τ is the stage-1 learned temperature, frozen in stage 2 (reference LGR: requires_grad=False)
        logit_scale = self.clip.logit_scale.detach().exp()
        text_logits = self.text_branch(image_embeds, self.anchor_text_embeds, self.anchor_mask, logit_scale)  # P_T

        loss = None
        if labels is not None:
            # L_rec: the sum of two separate CEs, not a CE on the fused prediction (reference engine.py)
            loss = soft_target_cross_entropy(image_logits, labels) + soft_target_cross_entropy(text_logits, labels)
        logits = fused_log_probabilities(image_logits, text_logits, self.config.fusion_alpha, self._text_only_mask())
        return VLLTRImageClassifierOutput(
            loss=loss,
            logits=logits,
            image_logits=image_logits,
            text_logits=text_logits,
            image_embeds=image_embeds,
            **tower,
        )


__all__ = [
    "VLLTRAdaptFormer",
    "VLLTRCosineClassifier",
    "VLLTRForImageClassification",
    "VLLTRImageClassifierOutput",
    "VLLTRModel",
    "VLLTRModelOutput",
    "VLLTRPreTrainedModel",
    "anchors_closest_to_mean",
    "fused_log_probabilities",
    "soft_target_cross_entropy",
]

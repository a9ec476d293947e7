# Copyright 2026 The vlltr authors. Licensed under the Apache License, Version 2.0.
"""VL-LTR model configuration.

This file ships unchanged as Hub remote code: it imports only transformers and nothing of its own package.
"""

from typing import Any

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

HEAD_TYPES = ("lgr", "fc", "cosine")
# What the FC / cosine head classifies: E_I (the projected embedding) or the tower's pooled feature before the projection
CLASSIFIER_FEATURES = ("projected", "pooled")


# Test-time fusion weight α of the ImageNet-LT and Places-LT reference runs (official `configs/*/finetune/*.py`).
DEFAULT_FUSION_ALPHA = 0.2


class VLLTRConfig(PreTrainedConfig):
    r"""
    Configuration of a VL-LTR model (Tian et al., "VL-LTR: Learning Class-wise Visual-Linguistic Representation for
    Long-Tailed Visual Recognition", ECCV 2022). It wraps a [`CLIPConfig`] and adds the fields of the
    language-guided recognition (LGR) head. Optimisation settings (loss weights, sampling, learning rates) are not
    here: they live on the training configs (`training.CVLPConfig`, `training.LGRConfig`).

    Args:
        clip_config (`dict` or [`CLIPConfig`], *optional*):
            The CLIP model that VL-LTR wraps. `None` builds the default `CLIPConfig()` (ViT-B/32 sized), so pass the
            config of the CLIP checkpoint you start from, e.g. `CLIPConfig.from_pretrained("openai/clip-vit-base-patch16")`.
            `VLLTRConfig.from_pretrained` on a plain CLIP checkpoint does this for you.
        num_anchor_sentences (`int`, *optional*, defaults to 64):
            M, the number of anchor sentences kept per class by anchor sentence selection (AnSS). The anchor buffer
            of [`VLLTRForImageClassification`] has shape `(num_labels, num_anchor_sentences, projection_dim)`.
        mlp_ratio (`int`, *optional*, defaults to 4):
            Hidden width of the image-branch MLP as a multiple of the embedding size D: `Linear(D, mlp_ratio * D)`
            -> ReLU -> `Linear(mlp_ratio * D, num_labels)`.
        fusion_alpha (`float`, *optional*, defaults to 0.2):
            Test-time fusion weight α in `P = α·softmax(P_I) + (1 − α)·softmax(P_T)`. The reference code uses 0.2
            for ImageNet-LT and Places-LT and 0.7 for iNaturalist 2018. Must lie in [0, 1].
        head_type (`str`, *optional*, defaults to `"lgr"`):
            `"lgr"`: the language-guided recognition head (image branch P_I plus anchor-attention text branch P_T).
            `"fc"`: a single linear classifier on the image embedding E_I (the paper's FC-head ablation).
            `"cosine"`: a cosine classifier `s·cos(E_I, w_c)` (LIFT, Shi et al., ICML 2024), usually initialised
            from the class-name prompt embeddings; its logits are the prediction (no text branch, no anchors).
        detach_anchor_norm (`bool`, *optional*, defaults to `False`):
            Divide the aggregated text embedding G by its norm with the norm detached from the graph (the reference
            code's `v_detach` variant, used for iNaturalist). Forward values are unchanged; only gradients differ.
        cosine_scale (`float`, *optional*, defaults to 25.0):
            s, the fixed scale of the cosine head (`head_type="cosine"`); LIFT's default is 25.
        classifier_feature (`str`, *optional*, defaults to `"projected"`):
            The feature the `"fc"` / `"cosine"` head classifies. `"projected"`: E_I, the image embedding in CLIP's
            joint space (`projection_dim`). `"pooled"`: the vision tower's pooled feature before `visual_projection`
            (the final LayerNorm of the class token, `vision_config.hidden_size`), the feature LIFT classifies
            (shijxcs/LIFT `models/peft_vit.py`, `Peft_ViT.forward`: `ln_post(x[:, 0])`, the projection "not used").
            The LGR head needs `"projected"`.
        adaptformer_dim (`int`, *optional*):
            Bottleneck width r of the AdaptFormer adapters (Chen et al., NeurIPS 2022) in every layer of the vision
            tower, placed as LIFT places them ([`VLLTRAdaptFormer`]); their weights are part of the checkpoint.
            `None` (the default): no adapters.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal used for the image-branch MLP and the FC head.
        anchor_sentences (`list[list[str]]`, *optional*):
            The text of each class's anchor sentences, one list per class, in the order of the anchor slots
            (aligned with `anchor_mask`), so `VLLTRForImageClassification.explain` can show which sentences decided
            a prediction from the checkpoint alone. An empty list means "text unknown" (a checkpoint written before
            the sentences were stored); `None` (the default) means no text for any class.
        text_only_classes (`list[int]`, *optional*):
            Ids of classes added from their description alone (`VLLTRForImageClassification.add_classes`): the image
            branch has never seen them, so their fused probability is the text branch's and the image branch only
            splits the rest between the trained classes (see `fused_log_probabilities`). `None` or `[]`: none.
        anchor_class_names (`list[str]`, *optional*):
            The class names, in row order, that the anchors and the classifier rows (image-branch last layer or FC
            head) of a [`VLLTRForImageClassification`] checkpoint belong to. Written by `set_anchor_embeddings` and
            `save_pretrained`; `from_pretrained` with an `id2label` that orders the same names differently permutes
            the anchors and rows to follow it, and refuses unknown or missing names.
        kwargs (*optional*):
            Passed to [`PreTrainedConfig`], e.g. `id2label` and `label2id`.

    Example:

    ```python
    >>> from transformers import CLIPConfig
    >>> from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification

    >>> clip_config = CLIPConfig.from_pretrained("openai/clip-vit-base-patch16")
    >>> config = VLLTRConfig(clip_config=clip_config, id2label={0: "cat", 1: "dog"}, num_anchor_sentences=64)
    >>> model = VLLTRForImageClassification(config)
    ```
    """

    model_type = "vlltr"
    sub_configs_defaults = {"clip_config": CLIPConfig}
    # What `Trainer.evaluate` / `predict` leave out of `predictions`: a standard `compute_metrics` gets the fused
    # `logits` array alone (the classifier), or CLIP's `logits_per_image`, `logits_per_text` (VLLTRModel). The branch
    # logits stay on the model's output; `training.LGRTrainer` and `run_eval` keep them.
    keys_to_ignore_at_inference = [
        "image_logits",
        "text_logits",
        "image_embeds",
        "text_embeds",
        "logit_scale",
        "text_model_output",
        "vision_model_output",
    ]

    clip_config: dict | CLIPConfig | None = None
    num_anchor_sentences: int = 64
    mlp_ratio: int = 4
    fusion_alpha: float = DEFAULT_FUSION_ALPHA
    head_type: str = "lgr"
    detach_anchor_norm: bool = False
    initializer_range: float = 0.02
    anchor_sentences: list[list[str]] | None = None
    text_only_classes: list[int] | None = None
    cosine_scale: float = 25.0
    classifier_feature: str = "projected"
    adaptformer_dim: int | None = None
    anchor_class_names: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.clip_config is None:
            logger.info("`clip_config` is None: building the default CLIPConfig() (ViT-B/32 sized).")
        super().__post_init__(**kwargs)
        self._validate_head_fields()

    def _validate_head_fields(self) -> None:
        def _is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not _is_int(self.num_anchor_sentences) or self.num_anchor_sentences < 1:
            raise ValueError(
                f"VLLTRConfig.num_anchor_sentences must be an integer >= 1, got {self.num_anchor_sentences!r}."
            )
        if not _is_int(self.mlp_ratio) or self.mlp_ratio < 1:
            raise ValueError(f"VLLTRConfig.mlp_ratio must be an integer >= 1, got {self.mlp_ratio!r}.")
        if isinstance(self.fusion_alpha, bool) or not isinstance(self.fusion_alpha, (int, float)):
            raise ValueError(f"VLLTRConfig.fusion_alpha must be a number in [0, 1], got {self.fusion_alpha!r}.")
        if not 0.0 <= float(self.fusion_alpha) <= 1.0:
            raise ValueError(f"VLLTRConfig.fusion_alpha must lie in [0, 1], got {self.fusion_alpha}.")
        self.fusion_alpha = float(self.fusion_alpha)
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"VLLTRConfig.head_type must be one of {HEAD_TYPES}, got {self.head_type!r}.")
        if not isinstance(self.detach_anchor_norm, bool):
            raise ValueError(f"VLLTRConfig.detach_anchor_norm must be True or False, got {self.detach_anchor_norm!r}.")
        if isinstance(self.cosine_scale, bool) or not isinstance(self.cosine_scale, (int, float)):
            raise ValueError(f"VLLTRConfig.cosine_scale must be a number > 0, got {self.cosine_scale!r}.")
        if not self.cosine_scale > 0:
            raise ValueError(f"VLLTRConfig.cosine_scale must be > 0, got {self.cosine_scale}.")
        self.cosine_scale = float(self.cosine_scale)
        if self.classifier_feature not in CLASSIFIER_FEATURES:
            raise ValueError(
                f"VLLTRConfig.classifier_feature must be one of {CLASSIFIER_FEATURES}, got {self.classifier_feature!r}."
            )
        if self.classifier_feature == "pooled" and self.head_type == "lgr":
            raise ValueError("VLLTRConfig.classifier_feature='pooled' needs head_type 'fc' or 'cosine', not 'lgr'.")
        if self.adaptformer_dim is not None and (not _is_int(self.adaptformer_dim) or self.adaptformer_dim < 1):
            raise ValueError(
                f"VLLTRConfig.adaptformer_dim must be an integer >= 1 or None, got {self.adaptformer_dim!r}."
            )
        if self.num_labels < 1:
            raise ValueError(f"VLLTRConfig needs at least one class (id2label), got num_labels={self.num_labels}.")
        if self.anchor_sentences is not None:
            sentences = self.anchor_sentences
            if not isinstance(sentences, (list, tuple)) or len(sentences) != self.num_labels:
                got = len(sentences) if isinstance(sentences, (list, tuple)) else type(sentences).__name__
                raise ValueError(
                    f"VLLTRConfig.anchor_sentences must hold one list of sentences per class ({self.num_labels}), "
                    f"got {got}."
                )
            for c, class_sentences in enumerate(sentences):
                if not isinstance(class_sentences, (list, tuple)) or not all(
                    isinstance(t, str) for t in class_sentences
                ):
                    raise ValueError(f"VLLTRConfig.anchor_sentences[{c}] must be a list of strings.")
            self.anchor_sentences = [list(class_sentences) for class_sentences in sentences]
        if self.text_only_classes is not None:
            ids = self.text_only_classes
            if (
                not isinstance(ids, (list, tuple))
                or not all(_is_int(c) and 0 <= c < self.num_labels for c in ids)
                or len(set(ids)) != len(ids)
            ):
                raise ValueError(
                    f"VLLTRConfig.text_only_classes must be distinct class ids in [0, {self.num_labels}), got {ids!r}."
                )
            self.text_only_classes = sorted(ids)

    @property
    def projection_dim(self) -> int:
        """D, the size of CLIP's joint embedding space (image embeddings, text embeddings and anchors)."""
        return self.clip_config.projection_dim

    @property
    def classifier_input_dim(self) -> int:
        """Width of the feature the FC / cosine head classifies (`classifier_feature`)."""
        if self.classifier_feature == "pooled":
            return self.clip_config.vision_config.hidden_size
        return self.projection_dim

    @property
    def text_config(self) -> CLIPTextConfig:
        """The CLIP text tower's config, `clip_config.text_config` (read where transformers reads a composite model's
        `config.text_config`); not saved twice."""
        return self.clip_config.text_config

    @property
    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP vision tower's config, `clip_config.vision_config`; not saved twice."""
        return self.clip_config.vision_config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "VLLTRConfig":
        """Loads a VL-LTR config, or wraps the config of a plain CLIP checkpoint (see `from_dict`). Any other
        `model_type` raises a `ValueError` that names the checkpoint."""
        config_dict, unused_kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type not in (cls.model_type, CLIPConfig.model_type):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} config; VL-LTR starts from a CLIP checkpoint "
                f"(model_type 'clip', e.g. openai/clip-vit-base-patch16) or a VL-LTR checkpoint (model_type 'vlltr')."
            )
        return cls.from_dict(config_dict, **unused_kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "VLLTRConfig":
        """Builds a `VLLTRConfig`. A plain CLIP config (`model_type == "clip"`) is wrapped as `clip_config`, so
        `VLLTRConfig.from_pretrained("openai/clip-vit-base-patch16", id2label=...)` and
        `VLLTRModel.from_pretrained(<a CLIP checkpoint>)` start from that CLIP."""
        if config_dict.get("model_type") == CLIPConfig.model_type:
            clip_dict = {k: v for k, v in config_dict.items() if k not in ("architectures", "auto_map")}
            config_dict = {"clip_config": clip_dict, "model_type": cls.model_type}
            if "dtype" in clip_dict:
                config_dict["dtype"] = clip_dict["dtype"]
        result = super().from_dict(config_dict, **kwargs)
        # `from_dict` sets keyword overrides (e.g. `fusion_alpha=0.7`) after construction: validate them too.
        (result[0] if isinstance(result, tuple) else result)._validate_head_fields()
        return result


__all__ = ["VLLTRConfig"]

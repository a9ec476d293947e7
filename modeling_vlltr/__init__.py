"""VL-LTR for 🤗 Transformers: `VLLTRConfig`, `VLLTRModel` (stage 1) and `VLLTRForImageClassification` (stage 2).

Importing this package registers the config and models with the Auto classes in this process, so an installed user
needs no `trust_remote_code`. `save_pretrained` also writes the two flat module files and an `auto_map`, so a process
that never installed the package loads a checkpoint with `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
)

from .configuration_vlltr import VLLTRConfig
from .modeling_vlltr import (
    VLLTRForImageClassification,
    VLLTRImageClassifierOutput,
    VLLTRModel,
    VLLTRModelOutput,
    VLLTRPreTrainedModel,
)

# Copy the module files on save_pretrained (the auto_map entries themselves are written by save_pretrained).
VLLTRConfig.register_for_auto_class()
VLLTRModel.register_for_auto_class("AutoModel")
VLLTRForImageClassification.register_for_auto_class("AutoModelForImageClassification")

AutoConfig.register(VLLTRConfig.model_type, VLLTRConfig, exist_ok=True)
# As in transformers, AutoModel is the base model for every checkpoint (a stage-2 one included, without its head: so
# `pipeline("image-feature-extraction")` returns image features); AutoModelForImageClassification the classifier.
AutoModel.register(VLLTRConfig, VLLTRModel, exist_ok=True)
AutoModelForImageClassification.register(VLLTRConfig, VLLTRForImageClassification, exist_ok=True)
AutoModelForZeroShotImageClassification.register(VLLTRConfig, VLLTRModel, exist_ok=True)

__all__ = [
    "VLLTRConfig",
    "VLLTRForImageClassification",
    "VLLTRImageClassifierOutput",
    "VLLTRModel",
    "VLLTRModelOutput",
    "VLLTRPreTrainedModel",
]

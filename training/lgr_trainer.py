"""Stage 2 (LGR, language-guided recognition): the Trainer that fits the image-branch MLP and the anchor attention
with L_rec = CE(P_I, y) + CE(P_T, y) on mixed, smoothed targets, the vision tower frozen by default."""

import torch
from transformers.utils import logging

from modeling_vlltr.modeling_vlltr import soft_target_cross_entropy

from .adapters import AdapterError, has_adapters, unfreeze_adapters
from .data import MixupCutmixCollator, eval_collator
from .io_utils import normalize_class_name
from .losses import log_class_prior, logit_adjusted_cross_entropy
from .splits import class_counts
from .stage_trainer import StageTrainer

logger = logging.get_logger(__name__)

ATTENTION_PREFIX = "text_branch."
# Evaluation hands `LongTailMetrics` (logits, image_logits, text_logits): only these output keys are left out (the
# model config's `keys_to_ignore_at_inference` also leaves out the branch logits, for a stock `compute_metrics`).
BRANCH_EVAL_IGNORE_KEYS = ["image_embeds", "hidden_states", "attentions"]


class LGRTrainer(StageTrainer):
    """Trains a `VLLTRForImageClassification` with `LGRConfig` (reference `finetune.py` / `engine.py`).

    - With LoRA adapters in the vision tower (`training.adapters`) or AdaptFormer adapters (`config.adaptformer_dim`),
      the tower stays frozen and the adapters train at `adapter_learning_rate` (default `learning_rate`).
    - The text tower and `logit_scale` are frozen (the text branch uses the stored anchors and the stage-1 τ); the
      vision tower too unless `train_vision_tower` (then it builds no autograd graph at all).
    - Two learning rates: `learning_rate` for the image-branch MLP (and the vision tower), `attention_learning_rate`
      for W_q, W_k and their LayerNorms (the reference `text_lr`).
    - The training collator mixes batches (Mixup / CutMix, label smoothing): by default a `MixupCutmixCollator`
      built from the `LGRConfig` settings; evaluation batches are never mixed.
    - With `logit_adjustment` τ > 0 the image-branch term is the logit-adjusted CE(P_I + τ·log π, y), π from the
      training dataset's class counts (`train_dataset.labels`); the saved model's logits are not adjusted.
    - Evaluation hands `compute_metrics` the branch logits too: `(logits, image_logits, text_logits)`.
    """

    def __init__(self, model=None, args=None, data_collator=None, *more, **kwargs):
        if data_collator is None and model is not None and args is not None:
            data_collator = MixupCutmixCollator(
                model.config.num_labels,
                mixup_alpha=args.mixup_alpha,
                cutmix_alpha=args.cutmix_alpha,
                prob=args.mixup_prob,
                switch_prob=args.mixup_switch_prob,
                label_smoothing=args.label_smoothing,
            )
        super().__init__(model, args, data_collator, *more, **kwargs)
        clip = self.model.clip
        for module in (clip.text_model, clip.text_projection):
            module.requires_grad_(False)
        clip.logit_scale.requires_grad_(False)
        clip.vision_model.requires_grad_(self.args.train_vision_tower)
        clip.visual_projection.requires_grad_(self.args.train_vision_tower)
        adapters = has_adapters(self.model) or self.model.config.adaptformer_dim is not None
        if adapters:
            if self.args.train_vision_tower:
                raise AdapterError(
                    "--train_vision_tower trains the whole tower; with adapters (--peft lora, --adapter) only the "
                    "adapters train."
                )
            unfreeze_adapters(self.model)  # LoRA: the tower stays frozen, its adapters train at `learning_rate`
        self.log_prior = None  # log π (C,), only with logit adjustment
        if self.args.logit_adjustment > 0:
            if self.train_dataset is None or not hasattr(self.train_dataset, "labels"):
                raise ValueError("--logit_adjustment needs a training dataset with labels (the class prior).")
            num_labels = self.model.config.num_labels
            self.log_prior = log_class_prior(class_counts(self.train_dataset.labels, num_labels))
        self.train_class_ids = self._train_only_rows(self.args.train_classes)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        tower = "adapters" if adapters else ("trained" if self.args.train_vision_tower else "frozen")
        logger.info(f"Stage 2 trains {trainable:,} of {total:,} parameters (vision tower: {tower}).")

    def _train_only_rows(self, train_classes: str | None) -> list[int] | None:
        """`--train_classes`: everything frozen but the image branch's last layer, whose gradient is masked to the
        rows of those classes. Those rows get no weight decay, so with AdamW (a zero gradient gives a zero step)
        every other row stays exactly as it was."""
        if not train_classes:
            return None
        if self.args.train_vision_tower:
            raise ValueError("--train_classes trains only some rows of the head: drop --train_vision_tower.")
        label2id = {normalize_class_name(name): i for name, i in self.model.config.label2id.items()}
        names = [name.strip() for name in train_classes.split(",") if name.strip()]
        unknown = [name for name in names if normalize_class_name(name) not in label2id]
        if unknown or not names:
            raise ValueError(f"--train_classes {train_classes!r}: no class named {unknown[:3]} in this checkpoint.")
        ids = sorted({label2id[normalize_class_name(name)] for name in names})
        # A class without training images would train its row on nothing and then be fused through an image row
        # that has never seen it: refused (docs/method.md, classes added from text).
        if self.train_dataset is not None and hasattr(self.train_dataset, "labels"):
            counts = class_counts(self.train_dataset.labels, self.model.config.num_labels)
            unseen = [self.model.config.id2label[i] for i in ids if counts[i] == 0]
            if unseen:
                raise ValueError(
                    f"--train_classes: class {unseen[0]!r} has no image in the training split, so its image row "
                    f"would learn nothing and its text-only prediction would be replaced by a fused one through that "
                    f"untrained row: add training images of it, or leave it out of --train_classes (it keeps the "
                    f"text-only prediction add_classes gave it)."
                )
        fc2 = self.model.image_branch.fc2
        self.model.requires_grad_(False)
        fc2.requires_grad_(True)
        rows = torch.zeros(fc2.out_features, dtype=fc2.weight.dtype, device=fc2.weight.device)  # (C,)
        rows[ids] = 1.0
        fc2.weight.register_hook(lambda grad: grad * rows[:, None].to(grad))
        fc2.bias.register_hook(lambda grad: grad * rows.to(grad))
        return ids

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.args.train_classes:  # decay would shrink the frozen rows too
            names = [n for n in names if not n.startswith("image_branch.fc2.")]
        return names

    def create_optimizer(self, model=None):
        model = model if model is not None else self.model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[float, float], list] = {}
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                lr = (
                    self.args.attention_learning_rate if name.startswith(ATTENTION_PREFIX) else self.args.learning_rate
                )
                adapter = ".lora_" in name or name.startswith("adaptformer.")
                if adapter and self.args.adapter_learning_rate is not None:
                    lr = self.args.adapter_learning_rate  # LoRA / AdaptFormer adapters in the vision tower
                weight_decay = self.args.weight_decay if name in decay else 0.0
                groups.setdefault((lr, weight_decay), []).append(param)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
            self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(pixel_values=inputs["pixel_values"], labels=labels)
        loss = outputs.loss  # L_rec = CE(P_I, y) + CE(P_T, y)
        if self.log_prior is not None and model.training:
            # L_rec with the image term logit-adjusted: CE(P_I + τ·log π, y) + CE(P_T, y); evaluation keeps L_rec
            loss = logit_adjusted_cross_entropy(
                outputs.image_logits, labels, self.log_prior, self.args.logit_adjustment
            )
            if outputs.text_logits is not None:
                loss = loss + soft_target_cross_entropy(outputs.text_logits, labels)
            outputs.loss = loss
        self._check_finite(loss)
        if outputs.text_logits is not None:
            self._record(
                loss_image=soft_target_cross_entropy(outputs.image_logits.detach(), labels),
                loss_text=soft_target_cross_entropy(outputs.text_logits.detach(), labels),
            )
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        ignore_keys = BRANCH_EVAL_IGNORE_KEYS if ignore_keys is None else ignore_keys
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _with_eval_collator(self, make_loader, *args):
        collator, self.data_collator = self.data_collator, eval_collator
        try:
            return make_loader(*args)
        finally:
            self.data_collator = collator

    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

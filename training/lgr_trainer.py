"""Stage 2 (LGR, language-guided recognition): the Trainer that fits the image-branch MLP and the anchor attention
with L_rec = CE(P_I, y) + CE(P_T, y) on mixed, smoothed targets, the vision tower frozen by default."""

from transformers.utils import logging

from modeling_vlltr.modeling_vlltr import soft_target_cross_entropy

from .data import eval_collator
from .stage_trainer import StageTrainer

logger = logging.get_logger(__name__)

ATTENTION_PREFIX = "text_branch."
# Evaluation hands `LongTailMetrics` (logits, image_logits, text_logits): only these output keys are left out (the
# model config's `keys_to_ignore_at_inference` also leaves out the branch logits, for a stock `compute_metrics`).
BRANCH_EVAL_IGNORE_KEYS = ["image_embeds", "hidden_states", "attentions"]


class LGRTrainer(StageTrainer):
    """Trains a `VLLTRForImageClassification` with `LGRConfig` (reference `finetune.py` / `engine.py`).

    - The text tower and `logit_scale` are frozen (the text branch uses the stored anchors and the stage-1 τ); the
      vision tower too unless `train_vision_tower` (then it builds no autograd graph at all).
    - Two learning rates: `learning_rate` for the image-branch MLP (and the vision tower), `attention_learning_rate`
      for W_q, W_k and their LayerNorms (the reference `text_lr`).
    - The training collator mixes batches (Mixup / CutMix); evaluation batches are never mixed.
    - Evaluation hands `compute_metrics` the branch logits too: `(logits, image_logits, text_logits)`.
    """

    def __init__(self, model=None, args=None, *more, **kwargs):
        super().__init__(model, args, *more, **kwargs)
        clip = self.model.clip
        for module in (clip.text_model, clip.text_projection):
            module.requires_grad_(False)
        clip.logit_scale.requires_grad_(False)
        clip.vision_model.requires_grad_(self.args.train_vision_tower)
        clip.visual_projection.requires_grad_(self.args.train_vision_tower)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(f"Stage 2 trains {trainable:,} parameters (vision tower trained: {self.args.train_vision_tower}).")

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
                weight_decay = self.args.weight_decay if name in decay else 0.0
                groups.setdefault((lr, weight_decay), []).append(param)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
            self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        self._check_finite(outputs.loss)
        if outputs.text_logits is not None:
            labels = inputs["labels"]
            self._record(
                loss_image=soft_target_cross_entropy(outputs.image_logits.detach(), labels),
                loss_text=soft_target_cross_entropy(outputs.text_logits.detach(), labels),
            )
        return (outputs.loss, outputs) if return_outputs else outputs.loss

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

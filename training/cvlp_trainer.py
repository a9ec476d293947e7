"""Stage 1 (CVLP, class-wise visual-linguistic pre-training): the Trainer that optimises
L = (1 − β)·L_ccl + β·L_dis over the whole gathered batch, with a frozen CLIP teacher."""

import contextlib

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from transformers.utils import logging

from .corpus import TokenizedCorpus
from .data import CVLPCollator
from .distributed import gather_no_grad, gather_with_grad
from .embedding import embed_images, embed_texts
from .losses import class_wise_contrastive_loss, diagonal_distillation_loss, distillation_loss
from .metrics import sentence_retrieval_metrics
from .stage_trainer import StageTrainer

logger = logging.get_logger(__name__)

_MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")


class CVLPTrainer(StageTrainer):
    """Trains a `VLLTRModel` with `CVLPConfig`.

    Args:
        teacher_model: the frozen teacher, the CLIP the run started from (a `VLLTRModel` loaded from the same
            checkpoint). It is not a submodule of the student: not saved, not optimised, not wrapped by DDP.
        corpus_tokens: the tokenised corpus, for the training batches (each image paired with a sentence of its
            class), the teacher's sentence-embedding cache and evaluation.
        sentence_labels: class id of every corpus sentence.

    Without a `data_collator`, batches come from a `CVLPCollator` over `corpus_tokens` and `sentence_labels`.

    The contrastive loss sees the whole batch gathered from every process (with gradients). With gradient
    accumulation it sees the whole accumulation window too: the window is embedded without a graph, the loss and
    its gradient with respect to the embeddings are computed once, then each micro-batch is re-embedded with its
    graph and back-propagated (GradCache, Gao et al. 2021). The loss and gradients equal those of the larger batch,
    at the memory cost of one micro-batch.
    """

    def __init__(
        self,
        *args,
        teacher_model=None,
        corpus_tokens: TokenizedCorpus | None = None,
        sentence_labels: torch.Tensor | None = None,
        **kwargs,
    ):
        if kwargs.get("data_collator") is None and corpus_tokens is not None and sentence_labels is not None:
            kwargs["data_collator"] = CVLPCollator(corpus_tokens, sentence_labels)
        super().__init__(*args, **kwargs)
        self.teacher = None
        if self.args.distillation_beta > 0:
            if teacher_model is None:
                raise ValueError("distillation_beta > 0 needs a teacher_model (the CLIP the run starts from).")
            self.teacher = teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.corpus_tokens = corpus_tokens
        self.sentence_labels = sentence_labels
        self._teacher_text: torch.Tensor | None = None
        self._window: list[dict] = []
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        logger.info(f"Stage 1 trains {trainable:,} of {total:,} parameters.")

    # -- the loss ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _teacher_embeddings(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's normalised image and sentence embeddings of a batch, (B, D) each."""
        with self.accelerator.autocast():
            # DeepSpeed casts the batch to its bf16/fp16 student; the teacher is never wrapped and stays float32
            image = self.teacher.get_image_features(inputs["pixel_values"].to(self.teacher.dtype)).pooler_output
            if self.args.teacher_text_cache and self.corpus_tokens is not None:
                text = self._teacher_text_table()[inputs["sentence_ids"]]
            else:
                text = self.teacher.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def _teacher_text_table(self) -> torch.Tensor:
        """Every corpus sentence embedded once by the frozen teacher, in fixed batches (so a resumed run gets the
        same values); the teacher's text features do not depend on the image augmentation."""
        if self._teacher_text is None:
            with self.accelerator.autocast():
                table = embed_texts(
                    self.teacher, self.corpus_tokens, self.args.per_device_eval_batch_size * 8, desc="Teacher text"
                )
            self._teacher_text = F.normalize(table.float(), dim=-1)
        return self._teacher_text

    def _loss(self, image_embeds, text_embeds, logit_scale, labels, teacher=None) -> torch.Tensor:
        """L = (1 − β)·L_ccl + β·L_dis on the batch gathered from every process (reference `PretrainSentLoss`)."""
        labels = gather_no_grad(labels)  # (N,)
        image_embeds = gather_with_grad(image_embeds.float())  # E_I (N, D), normalised
        text_embeds = gather_with_grad(text_embeds.float())  # E_T (N, D), normalised
        logits_per_image = logit_scale.float() * image_embeds @ text_embeds.T  # (N, N)
        loss_ccl = class_wise_contrastive_loss(logits_per_image, labels, self.args.label_smoothing)
        loss_dis = None
        beta = self.args.distillation_beta
        loss = loss_ccl
        if teacher is not None:
            teacher_image, teacher_text = (gather_no_grad(t) for t in teacher)  # (N, D) each
            teacher_cosines = teacher_image @ teacher_text.T  # (N, N)
            if self.args.distillation_form == "paper":  # one shared τ: the student's learned scale on both sides
                loss_dis = diagonal_distillation_loss(
                    image_embeds @ text_embeds.T, teacher_cosines, logit_scale.float()
                )
            else:  # the official code: student at its own scale, teacher at CLIP's fixed one
                teacher_logits = self.teacher.clip.logit_scale.exp().float() * teacher_cosines  # (N, N)
                loss_dis = distillation_loss(logits_per_image, teacher_logits)
            loss = (1.0 - beta) * loss_ccl + beta * loss_dis
        self._check_finite(loss)
        self._record(loss_ccl=loss_ccl, loss_dis=loss_dis, logit_scale=logit_scale)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**{k: inputs[k] for k in _MODEL_INPUTS})
        teacher = self._teacher_embeddings(inputs) if self.teacher is not None else None
        loss = self._loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, inputs["labels"], teacher)
        return (loss, outputs) if return_outputs else loss

    # -- gradient accumulation over the whole contrastive window (GradCache) -------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.gradient_accumulation_steps == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        self._window.append(inputs)
        if len(self._window) < self.current_gradient_accumulation_steps:
            return torch.zeros((), device=self.args.device)  # the window's loss is returned with its last batch
        window, self._window = self._window, []
        return self._window_step(model, [self._prepare_inputs(x) for x in window])

    def _window_step(self, model, window: list[dict]) -> torch.Tensor:
        model.train()
        # 1. embed the whole window without a graph; loss and its gradient w.r.t. the embeddings
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = [model(**{k: x[k] for k in _MODEL_INPUTS}) for x in window]
        image = torch.cat([o.image_embeds.float() for o in outputs]).requires_grad_()  # (B·n, D)
        text = torch.cat([o.text_embeds.float() for o in outputs]).requires_grad_()  # (B·n, D)
        scale = outputs[0].logit_scale.detach().float().requires_grad_()
        labels = torch.cat([x["labels"] for x in window])
        teacher = None
        if self.teacher is not None:
            parts = [self._teacher_embeddings(x) for x in window]
            teacher = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        with self.compute_loss_context_manager():
            loss = self._loss(image, text, scale, labels, teacher)
        image_grad, text_grad, scale_grad = torch.autograd.grad(loss, [image, text, scale])
        sizes = [len(x["labels"]) for x in window]
        image_grads, text_grads = image_grad.split(sizes), text_grad.split(sizes)
        # 2. replay each micro-batch with its graph; DDP synchronises gradients on the last backward only
        for i, x in enumerate(window):
            last = i == len(window) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                with self.compute_loss_context_manager():
                    out = model(**{k: x[k] for k in _MODEL_INPUTS})
                    surrogate = (out.image_embeds.float() * image_grads[i]).sum()
                    surrogate = surrogate + (out.text_embeds.float() * text_grads[i]).sum()
                    if last:
                        surrogate = surrogate + out.logit_scale.float() * scale_grad
                self._replay_backward(surrogate, last)
        return loss.detach()

    def _replay_backward(self, surrogate: torch.Tensor, last: bool) -> None:
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            self.accelerator.backward(surrogate)
            return
        # DeepSpeed reduces and steps inside `backward` at an accumulation boundary, and divides by the accumulation
        # steps unless told not to: only the window's last replay is a boundary, and the surrogate's gradient is
        # already the window's (the Trainer's own DeepSpeed step passes scale_wrt_gas=False too).
        self.accelerator.gradient_state._set_sync_gradients(last)
        self.accelerator.backward(surrogate, scale_wrt_gas=False)

    # -- stage-1 evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Nearest-sentence top-1 and 5-nearest-sentence vote of the evaluation images (reference
        `evaluate_pretrain`: `image_acc1`, `knn_5`) against every corpus sentence."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or self.corpus_tokens is None:
            raise ValueError("CVLPTrainer.evaluate needs an eval_dataset and the corpus_tokens.")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        with self.accelerator.autocast():
            text = embed_texts(model, self.corpus_tokens, self.args.per_device_eval_batch_size * 8, desc="Eval text")
            image = embed_images(
                model, dataset, self.args.per_device_eval_batch_size, self.args.dataloader_num_workers, "Eval images"
            )
        model.train(was_training)
        scores = sentence_retrieval_metrics(image, torch.as_tensor(dataset.labels), text, self.sentence_labels)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

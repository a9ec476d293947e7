"""Stage-1 (CVLP) training step: `CVLPTrainer.compute_loss` (student CLIP forward, frozen teacher, L_ccl and L_dis)
+ backward, against the floor: `CLIPModel(return_loss=True)` forward + backward on the same batch and weights.

The teacher's sentence embeddings come from the trainer's `teacher_text_cache` (on by default): they do not depend
on the image augmentation, so each corpus sentence is embedded once. The cache is filled in the warm-up step, so the
timed steps measure the steady state of a run; the teacher still embeds every batch's (augmented) images.

    python -m benchmarks.stage1
"""

import copy
import statistics
import tempfile

import torch

from modeling_vlltr import VLLTRConfig, VLLTRModel
from training.corpus import TokenizedCorpus
from training.cvlp_config import CVLPConfig
from training.cvlp_trainer import CVLPTrainer

from . import common


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=2, help="images per step (the cost per image does not depend on it)")
    p.add_argument("--classes", type=int, default=1, help="classes in the batch (repeats make positives)")
    p.add_argument("--sentences-per-class", type=int, default=4)
    p.add_argument("--text-length", type=int, default=77)
    args = p.parse_args(argv)
    device = common.setup(args)

    config = VLLTRConfig(clip_config=common.vit_b16_clip_config())
    student = VLLTRModel(config).to(device)
    teacher = copy.deepcopy(student)  # the CLIP the run starts from
    num_sentences = args.classes * args.sentences_per_class
    input_ids, attention_mask = common.random_sentences(num_sentences, args.text_length, min_length=8)
    corpus = TokenizedCorpus(input_ids, attention_mask, 0)  # sentences of class c: rows c·k .. c·k + k − 1
    with tempfile.TemporaryDirectory() as output_dir:
        trainer_args = CVLPConfig(
            output_dir=output_dir,
            use_cpu=device.type == "cpu",
            report_to="none",
            disable_tqdm=True,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=8,
        )
        trainer = CVLPTrainer(
            model=student,
            args=trainer_args,
            teacher_model=teacher,
            corpus_tokens=corpus,
            sentence_labels=torch.arange(num_sentences) // args.sentences_per_class,
        )
    model = trainer.model
    model.train()

    g = torch.Generator().manual_seed(3)
    labels = torch.arange(args.batch) % args.classes  # (B,) with repeated classes: multi-positive L_ccl
    sentence_ids = labels * args.sentences_per_class + torch.randint(
        0, args.sentences_per_class, (args.batch,), generator=g
    )
    sentence_ids[0] = 0  # the corpus's longest sentence (77 tokens, as one truncated Wikipedia sentence makes it)
    batch_mask = attention_mask[sentence_ids]
    length = int(batch_mask.sum(-1).max())  # trimmed to the batch's longest sentence, as CVLPCollator does
    inputs = {
        "pixel_values": common.random_pixels(args.batch, device),
        "input_ids": input_ids[sentence_ids, :length].to(device),
        "attention_mask": batch_mask[:, :length].to(device),
        "labels": labels.to(device),
        "sentence_ids": sentence_ids.to(device),
    }

    def ours():
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        return loss.detach()

    def floor():
        out = model.clip(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            return_loss=True,
        )
        out.loss.backward()
        return out.loss.detach()

    def reset():
        model.zero_grad(set_to_none=True)  # the optimizer's zero_grad: the step allocates the gradients

    ours_side, floor_side = common.Side(ours, reset), common.Side(floor, reset)
    timings = common.time_sides(args, ours_side, floor_side, device)
    # what the distillation teacher alone costs per step (image tower forward, cached sentences): the floor plus this
    # is the least any implementation of L_dis can take
    teacher_times = [
        common.run_step(common.Side(lambda: trainer._teacher_embeddings(inputs)), device)[0] for _ in range(3)
    ]
    teacher_s = statistics.median(teacher_times)
    ours_peak = common.peak_memory_mb(ours_side, device)
    floor_peak = common.peak_memory_mb(floor_side, device)
    if trainer._teacher_text is None:
        raise RuntimeError("the teacher sentence cache was not filled: the benchmark would not be the steady state")

    resident = {
        "student_clip": common.tensors_mb(model),
        "teacher_clip": common.tensors_mb(trainer.teacher),
        "teacher_text_cache": common.tensors_mb(trainer._teacher_text),
        "gradients_allocated_per_step": round(
            sum(q.numel() * q.element_size() for q in model.parameters()) / common.MB, 1
        ),
    }
    common.emit(
        "stage-1 step",
        timings,
        1.35,
        ours_peak,
        floor_peak,
        1.3,
        batch=args.batch,
        note=(
            f"ViT-B/16 at 224 px, random weights; B = {args.batch} images from {args.classes} classes, text "
            f"trimmed to the batch's longest sentence ({length} tokens, the 77-token context, as one truncated "
            "Wikipedia sentence makes it). Ours: CVLPTrainer.compute_loss (student VLLTRModel forward, frozen "
            "teacher image features, teacher sentence features from teacher_text_cache, filled in warm-up: the "
            "steady state; (1 - beta) L_ccl + beta L_dis, beta = 0.5) + backward. Floor: student.clip(..., "
            "return_loss=True) + backward, same weights and batch. Gradients set to None before each step on both "
            "sides (their allocation counts in the peak). B = 2 keeps a step near 3 s on one core, so 17 rounds fit in "
            "two minutes; every part of both steps is per image, so B does not change the ratio. "
            "teacher_embeddings_s: the teacher's part of our step alone (image tower forward + cache lookup); "
            "floor_plus_teacher_ratio = (floor + teacher) / floor, the least any implementation of L_dis pays."
        ),
        device=device,
        text_length=length,
        teacher_embeddings_s=round(teacher_s, 4),
        floor_plus_teacher_ratio=round(
            (statistics.median(timings.floor) + teacher_s) / statistics.median(timings.floor), 3
        ),
        resident_mb=resident,
    )


if __name__ == "__main__":
    main()

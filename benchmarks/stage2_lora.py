"""Stage-2 (LGR) training step with LoRA adapters in the vision tower (`--peft lora`) against the same step with the
whole tower trained (`--train_vision_tower`, the iNaturalist recipe): same random ViT-B/16 CLIP weights, same batch,
same soft targets, both through `LGRTrainer.compute_loss` + backward + the optimizer step of `LGRTrainer`.

Memory is the training memory beyond the weights: the peak tensor memory allocated during one step (activations,
gradients; CPU: the torch profiler's allocator events, CUDA: max_memory_allocated, see common.peak_memory_mb) plus the
optimizer state the step keeps (AdamW's two moments per trainable parameter, allocated at the first step).
Goal (issue 13): time ≤ 1.0×, memory ≤ 0.6× of full fine-tuning.

    python -m benchmarks.stage2_lora            # ViT-B/16 at 224 px, B = 16, C = 1000
    python -m benchmarks.stage2_lora --quick --batch 4
"""

import copy
import tempfile

from training.adapters import AdapterArguments, add_lora, count_parameters
from training.lgr_config import LGRConfig
from training.lgr_trainer import LGRTrainer

from . import common
from .inference import build_classifier
from .stage2 import mixed_labels


def _trainer(model, device, output_dir: str, **config) -> LGRTrainer:
    args = LGRConfig(
        output_dir=output_dir, use_cpu=device.type == "cpu", report_to="none", disable_tqdm=True, **config
    )
    trainer = LGRTrainer(model=model, args=args)
    trainer.create_optimizer()
    return trainer


def _optimizer_state_mb(trainer: LGRTrainer) -> float:
    return common.tensors_mb(*[t for state in trainer.optimizer.state.values() for t in state.values()])


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lora-r", type=int, default=8)
    args = p.parse_args(argv)
    device = common.setup(args, common.LONG_REPEATS, common.QUICK_LONG_REPEATS)  # a round is ~28 s at B = 16

    base = build_classifier(args.num_classes, device)
    full_model = copy.deepcopy(base)
    lora_model = base
    add_lora(lora_model, AdapterArguments(peft="lora", lora_r=args.lora_r), towers=("vision",), seed=args.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        lora = _trainer(lora_model, device, output_dir)
        full = _trainer(full_model, device, output_dir, train_vision_tower=True)
    pixels = common.random_pixels(args.batch, device)
    inputs = {"pixel_values": pixels, "labels": mixed_labels(args.batch, args.num_classes).to(device)}

    def side(trainer: LGRTrainer) -> common.Side:
        model = trainer.model.train()

        def step():
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
            trainer.optimizer.step()
            return loss.detach()

        return common.Side(step, lambda: trainer.optimizer.zero_grad(set_to_none=True))

    ours, floor = side(lora), side(full)
    timings = common.time_sides(args, ours, floor, device)
    ours_step, floor_step = common.peak_memory_mb(ours, device), common.peak_memory_mb(floor, device)
    ours_state, floor_state = _optimizer_state_mb(lora), _optimizer_state_mb(full)
    lora_trainable, total = count_parameters(lora.model)
    full_trainable, _ = count_parameters(full.model)
    result = common.emit(
        "stage-2 step, LoRA vs whole tower",
        timings,
        1.0,
        ours_step + ours_state,
        floor_step + floor_state,
        0.6,
        batch=args.batch,
        note=(
            f"C = {args.num_classes}, ViT-B/16 at 224 px, random weights. Ours: LoRA r = {args.lora_r} on q_proj/v_proj "
            "of the frozen vision tower (training.adapters.add_lora), floor: the whole tower trained "
            "(train_vision_tower). Both: LGRTrainer.compute_loss + backward + AdamW step of LGRTrainer's optimizer. "
            "Memory = peak tensor memory allocated during the step (activations, gradients) + optimizer state."
        ),
        device=device,
        num_classes=args.num_classes,
        ours_step_peak_mb=round(ours_step, 1),
        floor_step_peak_mb=round(floor_step, 1),
        ours_optimizer_state_mb=ours_state,
        floor_optimizer_state_mb=floor_state,
        ours_trainable_parameters=lora_trainable,
        floor_trainable_parameters=full_trainable,
        total_parameters=total,
        trainable_fraction_lora=round(lora_trainable / total, 5),
        trainable_fraction_full=round(full_trainable / total, 5),
    )
    common.log(
        f"LoRA / whole tower: time {result['ratio']:.3f} (goal <= 1.0) {'ok' if result['ok'] else 'MISSED'}; "
        f"memory {result['memory_ratio']:.3f} (goal <= 0.6) {'ok' if result['memory_ok'] else 'MISSED'}; "
        f"trainable {lora_trainable:,} of {total:,} parameters ({100 * lora_trainable / total:.2f}%) against "
        f"{full_trainable:,} ({100 * full_trainable / total:.2f}%)"
    )


if __name__ == "__main__":
    main()

"""Training steps of a small CLIP (the demo's stand-in size) at 1 and at N intra-op threads, on an otherwise idle
machine and beside one CPU-bound process: why the package runs small models on one thread (training/threads.py).

    python -m benchmarks.busy_neighbour                # 1 vs all cores, 3 rounds of 10 steps
    python -m benchmarks.busy_neighbour --steps 30 --rounds 5

Unlike the other cases this one times wall seconds, since what a busy neighbour costs is exactly the time the
process spends waiting. Each (threads, neighbour) arm runs in its own process with `OMP_NUM_THREADS` set before
torch starts, the arms take turns within each round, and the lines report the median over rounds, the ratio of each
arm to one thread on the idle machine measured in the same rounds, and the slowdown a neighbour causes at each thread
count. The neighbour is a pure-Python loop pinned to nothing, like a second user's job.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKLOAD = r"""
import sys, time, torch
from transformers import CLIPModel
from training.standin_clip import small_clip_config
steps, batch = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = CLIPModel(small_clip_config(image_size=32, patch_size=4, width=64, layers=3, heads=4, projection_dim=64))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
pixels = torch.randn(batch, 3, 32, 32)
ids = torch.randint(2, 500, (batch, 40))
ids[:, -1] = 1
def step():
    loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(time.perf_counter() - start)
"""

NEIGHBOUR = "while True: pass"


def run_arm(threads: int, busy: bool, steps: int, batch: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, "-c", WORKLOAD, str(steps), str(batch)], env=env, capture_output=True, text=True
        )
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if out.returncode != 0:
        raise SystemExit(f"busy_neighbour: the workload failed: {out.stderr.strip().splitlines()[-1]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per arm and round (default 10)")
    parser.add_argument("--batch", type=int, default=64, help="images (and captions) per step (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once (default 3)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2, help="the many-thread arm (default: all CPUs)"
    )
    args = parser.parse_args(argv)
    arms = [(1, False), (args.threads, False), (1, True), (args.threads, True)]
    seconds: dict[tuple[int, bool], list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            seconds[arm].append(run_arm(*arm, args.steps, args.batch))
    median = {arm: statistics.median(v) for arm, v in seconds.items()}
    lines = []
    for threads, busy in arms:
        line = {
            "case": "busy neighbour",
            "threads": threads,
            "neighbour": busy,
            "steps": args.steps,
            "batch": args.batch,
            "seconds_per_step": round(median[(threads, busy)] / args.steps, 4),
            "ratio_to_1_thread_idle": round(median[(threads, busy)] / median[(1, False)], 2),
            "slowdown_from_neighbour": round(median[(threads, True)] / median[(threads, False)], 2),
            "rounds": [round(s, 2) for s in seconds[(threads, busy)]],
        }
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"busy_neighbour: {time.perf_counter() - start:.0f} s", file=sys.stderr)

"""Runs every benchmark case, each in a fresh process, prints one JSON line per case on stdout and a summary (with
the total wall time) on stderr; the lines are also written to `bench_output/bench.jsonl`.

    python -m benchmarks.run_all            # or: make bench
    python -m benchmarks.run_all --quick    # 9 timed rounds instead of 17 (7 / 13 in the long cases), warm-up 1-3 rounds instead of 2-4
    python -m benchmarks.run_all --device cuda --only inference
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import common

CASES = [  # (module, arguments)
    ("inference", ["--num-classes", "1000"]),
    ("inference", ["--num-classes", "8142"]),
    ("stage1", []),
    ("anchor_selection", []),
    ("stage2", []),
    ("stage2_lora", []),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads",
        type=common.at_least(1),
        default=common.DEFAULT_THREADS,
        help=f"intra-op threads of each case (default {common.DEFAULT_THREADS}, see benchmarks/common.py)",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer timed rounds and a shorter warm-up; nothing else changes"
    )
    p.add_argument("--only", nargs="*", default=None, help="run only the cases whose module names are given")
    p.add_argument("--output", default="bench_output/bench.jsonl")
    args = p.parse_args(argv)

    common.check_memory_probe()
    shared = ["--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    env = {"KINETO_LOG_LEVEL": "5", "TOKENIZERS_PARALLELISM": "false", **os.environ}  # kineto: no start/stop lines
    started = time.perf_counter()
    results, failed = [], []
    for module, case_args in CASES:
        if args.only and module not in args.only:
            continue
        command = [sys.executable, "-m", f"benchmarks.{module}", *case_args, *shared]
        common.log(" ".join(command[1:]))
        case_start = time.perf_counter()
        run = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode != 0 or not lines:
            failed.append(module)
            common.log(f"{module} {' '.join(case_args)} failed with exit code {run.returncode}")
            continue
        for line in lines:
            print(line, flush=True)
            results.append(json.loads(line))
        common.log(f"{module} {' '.join(case_args)}: {time.perf_counter() - case_start:.0f} s")
    total = time.perf_counter() - started

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in results))
    common.log("summary (time ratio <= bound, memory ratio <= bound):")
    for r in results:
        common.log(
            f"  {r['case']:<28} time {r['ratio']:.3f} [IQR {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}] (<= {r['bound']}) "
            f"{'ok' if r['ok'] else 'MISSED'}; "
            f"memory {r['memory_ratio']:.3f} (<= {r['memory_bound']}) {'ok' if r['memory_ok'] else 'MISSED'}"
        )
    common.log(f"total wall time {total:.0f} s; lines written to {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

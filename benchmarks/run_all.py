"""Runs every benchmark case, each in its own process, prints one JSON line per case on stdout and a summary (with
the total wall time) on stderr; the lines are also written to `bench_output/bench.jsonl`. The cases take turns: each
builds and warms up, then their timed rounds run in blocks spread over the whole run (see BLOCKS).

    python -m benchmarks.run_all            # or: make bench
    python -m benchmarks.run_all --quick    # 9 timed rounds instead of 17 (9 / 13 in the long cases), warm-up 1-3 rounds instead of 2-4
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
# Each case's timed rounds run in this many blocks, the cases taking turns (case 1 block 1, case 2 block 1, ...,
# case 1 block 2, ...): the machine's speed drifts over minutes, differently for a memory-bound and a compute-bound
# step, so a case timed in one stretch of a few minutes reads that stretch's conditions; spread over the whole run,
# every case samples them all alike. Each process stays alive (idle) between its blocks.
BLOCKS = 3
# Resident memory of the six CPU cases alive at once (2026-11-30, measured with ps between blocks: 14.5 GB, LoRA
# 3.6 GB, stage 1 2.7 GB, inference C = 8142 2.7 GB) with a margin for the memory steps at the end; with less
# available, run_all runs each case start to finish instead (as --blocks 1), one process alive at a time.
INTERLEAVED_MEMORY_GB = 17


def available_memory_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GB (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def split(repeats: int, blocks: int) -> list[int]:
    """`repeats` rounds in `blocks` nearly equal blocks (the first ones one larger), empty blocks left out."""
    sizes = [repeats // blocks + (1 if i < repeats % blocks else 0) for i in range(blocks)]
    return [n for n in sizes if n > 0]


class Case:
    """One case's process, started with --coordinated: it builds and warms up, says `#ready <repeats>`, then runs
    the blocks of rounds it is sent (`run K` -> `#done`) and, on `finish`, measures memory and prints its JSON line."""

    def __init__(self, name: str, command: list[str], env: dict, blocks: int):
        self.name = name
        common.log(" ".join(command[1:]))
        self.process = subprocess.Popen(
            [*command, "--coordinated"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []  # JSON result lines
        self.seconds = 0.0  # wall time this case held the machine
        self.sizes: list[int] = []
        self.failed = False
        started = time.perf_counter()
        ready = self._read_until("#ready")
        self.seconds += time.perf_counter() - started
        if ready is not None:
            self.sizes = split(int(ready.split()[1]), blocks)

    def _read_until(self, marker: str) -> str | None:
        """Reads the case's stdout up to a line starting with `marker` (returned), keeping JSON lines; None (and the
        case marked failed) if the process ends first."""
        for line in self.process.stdout:
            if line.startswith(marker):
                return line
            if line.startswith("{"):
                self.lines.append(line.strip())
        self.fail()
        return None

    def fail(self) -> None:
        if not self.failed:
            self.failed = True
            code = self.process.wait()
            common.log(f"{self.name} failed with exit code {code}")

    def run_block(self, block: int) -> None:
        if self.failed or block >= len(self.sizes):
            return
        started = time.perf_counter()
        try:
            self.process.stdin.write(f"run {self.sizes[block]}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.fail()
            return
        if self._read_until("#done") is not None:
            self.seconds += time.perf_counter() - started
            common.log(f"{self.name}: block {block + 1}/{len(self.sizes)} ({self.sizes[block]} rounds) done")

    def finish(self) -> list[dict]:
        if self.failed:
            return []
        started = time.perf_counter()
        try:
            self.process.stdin.write("finish\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        for line in self.process.stdout:
            if line.startswith("{"):
                self.lines.append(line.strip())
        code = self.process.wait()
        self.seconds += time.perf_counter() - started
        if code != 0 or not self.lines:
            self.fail()
            return []
        common.log(f"{self.name}: {self.seconds:.0f} s in all")
        return [json.loads(line) for line in self.lines]


def interleave(cases: list[Case], blocks: int) -> list[dict]:
    """Runs block 1 of every case, then block 2 of every case, ...; then each case's memory step and result line."""
    for block in range(blocks):
        for case in cases:
            case.run_block(block)
    results = []
    for case in cases:
        for result in case.finish():
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


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
    p.add_argument(
        "--blocks",
        type=common.at_least(1),
        default=BLOCKS,
        help=f"blocks each case's timed rounds are split into, the cases taking turns (default {BLOCKS}; 1: each case "
        "runs start to finish before the next)",
    )
    p.add_argument("--output", default="bench_output/bench.jsonl")
    args = p.parse_args(argv)

    common.check_memory_probe()
    shared = ["--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    env = {"KINETO_LOG_LEVEL": "5", "TOKENIZERS_PARALLELISM": "false", **os.environ}  # kineto: no start/stop lines
    started = time.perf_counter()
    selected = [(module, case_args) for module, case_args in CASES if not args.only or module in args.only]
    available = available_memory_gb()
    if args.blocks > 1 and len(selected) > 1 and available is not None and available < INTERLEAVED_MEMORY_GB:
        common.log(
            f"{available:.1f} GB of memory available, the cases alive at once take about {INTERLEAVED_MEMORY_GB} GB: "
            "running each case start to finish instead (--blocks 1)"
        )
        args.blocks = 1

    def start(module: str, case_args: list[str]) -> Case:
        command = [sys.executable, "-m", f"benchmarks.{module}", *case_args, *shared]
        return Case(" ".join([module, *case_args]), command, env, args.blocks)

    # One case at a time holds the CPU: each builds and warms up in turn (the others already built wait, idle).
    if args.blocks == 1:  # one process alive at a time
        cases, results = [], []
        for module, case_args in selected:
            cases.append(start(module, case_args))
            results += interleave(cases[-1:], 1)
    else:
        cases = [start(module, case_args) for module, case_args in selected]
        results = interleave(cases, args.blocks)
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
    return 1 if any(case.failed for case in cases) else 0


if __name__ == "__main__":
    sys.exit(main())

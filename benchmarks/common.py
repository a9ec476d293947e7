"""What every benchmark case shares: real-size random CLIP configs and inputs, paired timing of our step and the
floor's (back to back, order alternating; the headline is the median of the per-round ratios), peak memory of one
step, and the JSON line each case prints."""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPConfig

# CLIP ViT-B/16 (openai/clip-vit-base-patch16) dimensions; the weights are random, the cost is the real one.
VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    patch_size=16,
    image_size=224,
)
TEXT = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    vocab_size=49408,
)
PROJECTION_DIM = 512
NUM_ANCHORS = 64  # M
SOT, EOT = 49406, 49407  # CLIP's start / end-of-text ids; the HF tokenizer pads with EOT

MB = 2**20
# Timed rounds (one step per side each). Measured on a shared 2-core VM, idle: the paired ratio of one round scatters
# with a median absolute deviation (MAD) of 3-6% around its median and a heavy tail (single rounds 20-40% off),
# whether a step takes 1.3 s or 5.5 s; summing several pairs into one round lets the tail in, the median of single
# pairs keeps it out. The median of n rounds then has a standard error of about 1.9·MAD/√n (benchmarks.report prints
# it per case): 1.3-3.0% at 17 rounds, 2.1-4.8% at 13 in the run of 2026-11-30. Cases whose rounds take 15-28 s
# (anchor selection, LoRA) take the LONG_ counts.
REPEATS, QUICK_REPEATS = 17, 9
LONG_REPEATS, QUICK_LONG_REPEATS = 13, 9
WARMUP, MAX_WARMUP = 2, 4  # untimed rounds: at least, at most
QUICK_WARMUP, QUICK_MAX_WARMUP = 1, 3  # --quick: one untimed round at least (it fills caches and allocator pools)
WARMUP_TOLERANCE = 0.05  # warm-up ends once a round's ours/floor ratio is within 5% of the previous round's
# One intra-op thread by default: with two OpenMP threads on two cores, a neighbour process that preempts one thread
# leaves the other spinning at the next barrier, and that spin is counted as this process's CPU time, more on the
# side with more synchronisation points (measured: the stage-1 ratio fell 10% beside one spinning process at 2
# threads, 1.7% at 1 thread). With one thread each side's CPU seconds are its own work.
DEFAULT_THREADS = 1
# On the CPU a case asks glibc malloc to keep the memory it frees (`keep_freed_memory`), as a caching allocator
# (jemalloc, tcmalloc, or torch's own on CUDA) would: by default each large tensor is mmap'ed and unmapped again, and
# the heap's free top is returned to the system, so every step faults its pages back in, and how many varied from
# step to step. Measured (anchor selection, 12 rounds each, 2026-11-30): 60k-690k page faults a step (0.1-1.5 s of
# system time in a 7 s step), and the paired ratio's MAD was 5.4%; keeping freed memory: ~0 faults after warm-up,
# MAD 3.0%, steps ~15% faster on both sides. The LoRA ratio moved by under its noise (median 0.76 of 4 rounds, 0.747 before).
# On the CPU a case pins itself to `threads` CPUs (the last ones it may use; CPU 0 takes most interrupts): a thread
# that the scheduler moves between CPUs finds its caches cold. Measured (inference C = 1000 at B = 4, 40 rounds each,
# back to back, 2026-11-30): the per-round paired ratio's MAD was 1.9% pinned, 2.6% not.


def vit_b16_clip_config() -> CLIPConfig:
    return CLIPConfig(vision_config=dict(VISION), text_config=dict(TEXT), projection_dim=PROJECTION_DIM)


# --- command line and set-up


def at_least(low: int):
    """An argparse type: an integer >= `low` (argparse turns the ValueError into a one-line usage error)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer >= {low}"  # how argparse names the expected type in its message
    return parse


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument(
        "--threads",
        type=at_least(1),
        default=DEFAULT_THREADS,
        help=f"torch.set_num_threads (default {DEFAULT_THREADS}: CPU seconds then hold beside a busy process)",
    )
    p.add_argument(
        "--repeats",
        type=at_least(1),
        default=None,
        help="timed rounds (one step per side, order alternating; default per case, --quick about half)",
    )
    p.add_argument(
        "--warmup",
        type=at_least(0),
        default=None,
        help=f"untimed rounds before timing, at least (default {WARMUP}, --quick {QUICK_WARMUP}); more (up to {MAX_WARMUP}, "
        f"--quick {QUICK_MAX_WARMUP}) until two in a row agree within {100 * WARMUP_TOLERANCE:.0f}%%",  # argparse: %% is %
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"about half the timed rounds ({QUICK_REPEATS} instead of {REPEATS} in most cases) and a shorter warm-up; "
        "nothing else changes",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--coordinated",
        action="store_true",
        help="used by run_all: after the warm-up, run the timed rounds in the blocks that run_all asks for on stdin "
        "('run K' ... 'finish'), so the cases' rounds interleave over the whole run",
    )
    return p


def setup(args, repeats: int = REPEATS, quick_repeats: int = QUICK_REPEATS) -> torch.device:
    """Threads, seed, the rounds (`repeats`, or `quick_repeats` under --quick, unless --repeats is given) and the
    warm-up of a case; returns its device."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else repeats
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else WARMUP
    args.max_warmup = max(args.warmup, QUICK_MAX_WARMUP if args.quick else MAX_WARMUP)
    args.blocks = coordinated_blocks if args.coordinated else None
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {args.device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    args.pinned_cpus = pin_to_cpus(args.threads) if device.type == "cpu" else None
    if device.type == "cpu":
        keep_freed_memory()
    log(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, "
        f"warm-up {args.warmup}-{args.max_warmup} rounds, CPUs {args.pinned_cpus or 'not pinned'}, "
        f"allocator {_allocator}"
    )
    return device


_allocator = "default"  # what `keep_freed_memory` did; the JSON line reports it
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)


def keep_freed_memory() -> str:
    """Makes glibc malloc serve every allocation from its heap (no mmap per large block: M_MMAP_MAX 0) and keep the
    heap's free top (M_TRIM_THRESHOLD at its largest, 2 GiB), so a step reuses the pages the previous one freed
    instead of faulting them in again (see the measurement above). Elsewhere (not Linux, not glibc) nothing changes.
    Returns, and remembers for the JSON line, what was done. `release_free_memory` still hands freed memory back
    between run_all's blocks, on request."""
    global _allocator
    libc = _glibc()
    if libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1:
        _allocator = "glibc, freed memory kept (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)"
    return _allocator


def _glibc():
    """The C library through ctypes where it is glibc on Linux (it has malloc_trim and mallopt), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def pin_to_cpus(threads: int) -> list[int] | None:
    """Pins this process to the last `threads` of the CPUs it may run on (Linux); returns them, or None where
    pinning is not possible or would leave nothing out."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= threads:
        return None
    cpus = allowed[-threads:]
    os.sched_setaffinity(0, cpus)
    return cpus


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- inputs


def random_pixels(batch: int, device, seed: int = 0) -> torch.Tensor:
    size = VISION["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def random_sentences(
    num: int, length: int, seed: int = 0, min_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids laid out like the CLIP tokenizer's: SOT, words, EOT, then EOT padding to `length`. Each sentence
    has `min_length..length` real tokens (all `length` by default); the attention mask marks them."""
    g = torch.Generator().manual_seed(seed)
    min_length = length if min_length is None else min_length
    lengths = torch.randint(min_length, length + 1, (num,), generator=g)
    lengths[0] = length  # the longest sentence sets the padded length, as the collators trim to it
    ids = torch.randint(0, SOT, (num, length), generator=g)
    positions = torch.arange(length)[None, :]
    ids[:, 0] = SOT
    ids = torch.where(positions >= (lengths[:, None] - 1), EOT, ids)
    mask = (positions < lengths[:, None]).long()
    return ids, mask


# --- timing


@dataclass
class Side:
    """One side of a comparison: `step` is timed; `reset` runs before every step, untimed (e.g. grads to None)."""

    step: Callable[[], object]
    reset: Callable[[], None] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(side: Side, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    if side.reset is not None:
        side.reset()
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    side.step()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


@dataclass
class Timings:
    ours: list[float]  # wall seconds per step
    floor: list[float]
    ours_cpu: list[float]  # CPU seconds of the process per step (all threads)
    floor_cpu: list[float]
    warmup_rounds: int = 0
    blocks: int = 1  # how many stretches of the run the timed rounds came in (run_all interleaves the cases)
    clock: str = "wall"  # what the ratio compares: "wall" seconds (CUDA) or the process's "cpu" seconds (CPU runs)

    @property
    def paired_ratios(self) -> list[float]:
        """ours / floor within each round: the two steps ran back to back, so load that comes and goes (another
        process, frequency scaling) hits both alike and cancels in the ratio. On the CPU the ratio compares the
        process's CPU seconds: time spent preempted by another process is not counted on either side, so a busy
        neighbour does not move it (wall seconds do: a preemption lands on one side of a round at random)."""
        ours, floor = (self.ours_cpu, self.floor_cpu) if self.clock == "cpu" else (self.ours, self.floor)
        return [o / f for o, f in zip(ours, floor)]

    @property
    def ratio(self) -> float:
        """The headline: the median over rounds of the paired ratio (robust to a round disturbed on one side)."""
        return statistics.median(self.paired_ratios)

    @property
    def spread(self) -> dict[str, float]:
        """How far the paired ratios scatter: their quartiles, and the interquartile range relative to the median."""
        ratios = sorted(self.paired_ratios)
        if len(ratios) < 2:
            q1 = q3 = ratios[0]
        else:
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return {"q1": q1, "q3": q3, "min": ratios[0], "max": ratios[-1], "relative_iqr": (q3 - q1) / self.ratio}


def _round(ours: Side, floor: Side, device, ours_first: bool, into: Timings) -> float:
    """One round: a step of each side back to back, in the given order, appended to `into`. Returns the round's
    paired ratio (on `into`'s clock)."""
    if ours_first:
        o = run_step(ours, device)
        f = run_step(floor, device)
    else:
        f = run_step(floor, device)
        o = run_step(ours, device)
    (ow, oc), (fw, fc) = o, f
    into.ours.append(ow)
    into.floor.append(fw)
    into.ours_cpu.append(oc)
    into.floor_cpu.append(fc)
    return into.paired_ratios[-1]


def alternate(
    ours: Side,
    floor: Side,
    device,
    repeats: int,
    warmup: int = WARMUP,
    max_warmup: int = MAX_WARMUP,
    tolerance: float = WARMUP_TOLERANCE,
    blocks: Callable[[int], Iterable[int]] | None = None,
) -> Timings:
    """Times `ours` against `floor` in one process, in rounds of one step each, back to back, the order flipping
    every round (ours, floor | floor, ours | ...) so a drift of the machine hits both sides alike.

    Warm-up: at least `warmup` untimed rounds, continued (up to `max_warmup`) until a round's ours/floor ratio is
    within `tolerance` of the previous round's, so caches, allocator pools and lazily built state (e.g. stage 1's
    teacher sentence cache) are in place before the first timed round. Warm-up and timed rounds compare the same
    clock (`Timings.paired_ratios`).

    `blocks(repeats)`, when given, yields how many timed rounds to run next, block after block, and may pause before
    each (`coordinated_blocks`: run_all runs the other cases meanwhile, the first block included, and a waiting case
    returns its freed heap to the system); so each block starts with one more untimed round, which takes the cold
    caches and page faults of resuming (measured: LoRA's first timed round read 0.86-0.91 against 0.77 for the rest
    when block 1 had none). Without `blocks` all rounds run in one go, straight after the warm-up."""
    clock = "cpu" if torch.device(device).type == "cpu" else "wall"
    warm = Timings([], [], [], [], clock=clock)
    previous = None
    for i in range(max(max_warmup, warmup)):
        ratio = _round(ours, floor, device, i % 2 == 0, warm)
        log(f"warm-up {i + 1}: ours {warm.ours[-1]:.3f}s, floor {warm.floor[-1]:.3f}s, ratio {ratio:.3f} ({clock})")
        if i + 1 >= warmup and previous is not None and abs(ratio / previous - 1) <= tolerance:
            break
        previous = ratio
    t = Timings([], [], [], [], warmup_rounds=len(warm.ours), clock=clock)
    rounds = 0  # all rounds run so far, timed or not, so the order keeps alternating across blocks
    for block, size in enumerate(blocks(repeats) if blocks is not None else [repeats]):
        t.blocks = block + 1
        if blocks is not None:
            ratio = _round(ours, floor, device, rounds % 2 == 0, warm)
            t.warmup_rounds += 1
            rounds += 1
            log(f"block {block + 1}, untimed round: ratio {ratio:.3f} ({clock})")
        for _ in range(size):
            ratio = _round(ours, floor, device, rounds % 2 == 0, t)
            rounds += 1
            log(
                f"round {len(t.ours)}/{repeats}: ours {t.ours[-1]:.3f}s, floor {t.floor[-1]:.3f}s, ratio {ratio:.3f} "
                f"({clock})"
            )
    return t


def time_sides(args, ours: Side, floor: Side, device) -> Timings:
    """`alternate` with a case's command-line settings (after `setup`): its rounds, warm-up and blocks."""
    return alternate(ours, floor, device, args.repeats, args.warmup, args.max_warmup, blocks=args.blocks)


def coordinated_blocks(repeats: int, commands=None, replies=None) -> Iterator[int]:
    """The case's side of run_all's interleaving (`alternate(..., blocks=...)`): says `#ready <repeats>` on
    `replies` (stdout), then for each `run K` line read from `commands` (stdin) yields K and, once those rounds ran,
    says `#done`; stops at `finish` or at the end of the input."""
    commands = sys.stdin if commands is None else commands
    replies = sys.stdout if replies is None else replies
    print(f"#ready {repeats}", file=replies, flush=True)
    release_free_memory()
    for line in commands:
        words = line.split()
        if not words or words[0] == "finish":
            return
        if words[0] != "run" or len(words) != 2 or not words[1].isdigit():
            raise SystemExit(
                f"benchmark case: unexpected command {line.strip()!r} on stdin (expected 'run K' or 'finish')"
            )
        yield int(words[1])
        print("#done", file=replies, flush=True)
        release_free_memory()


def release_free_memory() -> None:
    """Hands the heap memory this process freed back to the system (glibc `malloc_trim`; elsewhere nothing), so the
    cases waiting idle between their blocks hold their live tensors only: with all six alive, their resident memory
    summed to ~17 GB without it. The next block's untimed first round takes the page faults of growing back."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# --- memory


def _profiled_peak_cpu(step: Callable[[], object]) -> int:
    """Peak CPU tensor memory allocated while `step` runs, above what was allocated before it: every allocation and
    free of the c10 CPU allocator is a profiler "[memory]" event (+/- bytes); their running sum over time peaks at
    the step's high-water mark. Memory freed during the step that was allocated before it counts negative."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory_mb(side: Side, device) -> float:
    """Peak tensor memory of one step above what was resident before it, in MiB (CUDA: max_memory_allocated)."""
    if side.reset is not None:
        side.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        side.step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MB
    return _profiled_peak_cpu(side.step) / MB


def check_memory_probe() -> None:
    """Validates the CPU method on a known pattern: 4 MB + 8 MB live, 4 MB freed, 2 MB more: the peak is 12 MB."""

    def step():
        a = torch.empty(1_000_000)
        b = torch.empty(2_000_000)
        del a
        c = torch.empty(500_000)
        return b, c

    peak = _profiled_peak_cpu(lambda: step())
    if peak != 12_000_000:
        raise RuntimeError(f"CPU memory probe measured {peak} bytes for a 12,000,000-byte pattern")
    log("memory probe ok: 12,000,000 bytes measured for a known 12,000,000-byte pattern")


def tensors_mb(*items) -> float:
    """MiB held by modules (parameters and buffers) and tensors, each storage counted once."""
    seen, total = set(), 0
    for item in items:
        tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, nn.Module) else [item]
        for t in tensors:
            if t is None:
                continue
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return round(total / MB, 1)


# --- the result line


def emit(
    case: str,
    timings: Timings,
    bound: float,
    ours_peak_mb: float,
    floor_peak_mb: float,
    memory_bound: float,
    batch,
    note: str,
    device,
    memory_ratio: float | None = None,
    **extra,
) -> dict:
    ours_s, floor_s = statistics.median(timings.ours), statistics.median(timings.floor)
    ratio = timings.ratio
    spread = timings.spread
    ours_cpu_s, floor_cpu_s = statistics.median(timings.ours_cpu), statistics.median(timings.floor_cpu)
    if memory_ratio is None:
        memory_ratio = ours_peak_mb / floor_peak_mb
    result = {
        "case": case,
        "ours_s": round(ours_s, 4),
        "floor_s": round(floor_s, 4),
        "ratio": round(ratio, 3),  # median over rounds of the paired ratio ours/floor
        "ratio_q1": round(spread["q1"], 3),
        "ratio_q3": round(spread["q3"], 3),
        "ratio_relative_iqr": round(spread["relative_iqr"], 3),
        "bound": bound,
        "ok": ratio <= bound,
        "ours_peak_mb": round(ours_peak_mb, 1),
        "floor_peak_mb": round(floor_peak_mb, 1),
        "memory_ratio": round(memory_ratio, 3),
        "memory_bound": memory_bound,
        "memory_ok": memory_ratio <= memory_bound,
        "batch": batch,
        "note": note,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "repeats": len(timings.ours),
        "warmup_rounds": timings.warmup_rounds,
        "blocks": timings.blocks,
        **extra,
        "ours_times_s": [round(t, 3) for t in timings.ours],
        "floor_times_s": [round(t, 3) for t in timings.floor],
        "clock": timings.clock,  # the paired ratios compare CPU seconds on the CPU, wall seconds on CUDA
        "paired_ratios": [round(r, 3) for r in timings.paired_ratios],
        # a second estimate, for comparison: the ratio of the medians (sensitive to load that hits one side only)
        "ratio_of_medians": round(ours_s / floor_s, 3),
        "cpu_time_ratio": round(ours_cpu_s / floor_cpu_s, 3),
        "ours_cpu_s": round(ours_cpu_s, 3),
        "floor_cpu_s": round(floor_cpu_s, 3),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,  # pinned (setup)
        "allocator": _allocator,
    }
    print(json.dumps(result), flush=True)
    return result

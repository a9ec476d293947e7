"""How many intra-op threads a run uses, chosen once at start-up and logged.

PyTorch's CPU kernels run on an OpenMP team of one thread per core. Between two operations every thread waits at a
barrier (spinning first, then sleeping). A small model is thousands of small operations a step, so when another
process holds one of the cores, each barrier waits for the thread that shares that core with it and a step takes
several times longer than at one thread (docs/speed.md has the measurements). On an idle machine the same small model
still gains from a second thread. So for a small model the package looks, once at start-up, at how busy the CPUs are
(/proc/stat over a fifth of a second): with at least two CPUs idle it keeps PyTorch's default, one thread per core;
otherwise it runs on one thread. A large model (ViT-B/16 CLIP: about 150 M parameters) always keeps the default:
each of its operations is long enough that a busy neighbour costs about its share of the cores.

`OMP_NUM_THREADS` (or an earlier `torch.set_num_threads`) always wins: set it to choose the count yourself.
"""

import os
import time

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Below this many parameters (both towers), a model runs on one intra-op thread when fewer than two CPUs are idle at
# start-up. The package's stand-in CLIPs are 0.1-2 M; the smallest pretrained CLIP (ViT-B/32) has 151 M.
SMALL_MODEL_PARAMETERS = 20_000_000

_chosen: int | None = None
_default_threads = torch.get_num_threads()  # before anything here changes it


def _tower_parameters(cfg) -> int:
    width = getattr(cfg, "hidden_size", 0) or 0
    inner = getattr(cfg, "intermediate_size", 4 * width) or 4 * width
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    return layers * (4 * width * width + 2 * width * inner)


def estimated_parameters(config) -> int:
    """The parameters of a CLIP-like config's transformer layers (both towers; embeddings left out): enough to tell a
    stand-in from a pretrained CLIP without building the model."""
    clip = getattr(config, "clip_config", None) or config
    towers = [getattr(clip, "vision_config", None), getattr(clip, "text_config", None)]
    towers = [t for t in towers if t is not None] or [clip]
    return sum(_tower_parameters(t) for t in towers)


def user_chose_threads() -> bool:
    """True when the thread count was set by the user: `OMP_NUM_THREADS` in the environment, or a
    `torch.set_num_threads` call before the package chose."""
    return bool(os.environ.get("OMP_NUM_THREADS")) or torch.get_num_threads() != _default_threads


def idle_cpus(window: float = 0.2) -> float | None:
    """How many CPUs were idle over the last `window` seconds (from /proc/stat, Linux), or None where it cannot be
    read. This process is counted as busy for what it does meanwhile, which at start-up is little."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields[:8])

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / (total1 - total0)


def configure_threads(config, idle: float | None = ...) -> int:
    """Chooses the intra-op thread count for a run of `config`'s model, once per process, and logs the choice.
    `idle`: the idle CPUs to decide on (default: measured now, `idle_cpus()`). Returns the count in use."""
    global _chosen
    if _chosen is not None:
        return torch.get_num_threads()
    if user_chose_threads():
        _chosen = torch.get_num_threads()
        logger.info(f"Using {_chosen} intra-op thread(s), as set (OMP_NUM_THREADS or torch.set_num_threads).")
        return _chosen
    parameters = estimated_parameters(config)
    if parameters < SMALL_MODEL_PARAMETERS and _default_threads > 1:
        idle = idle_cpus() if idle is ... else idle
        if idle is not None and idle < 1.5:  # fewer than two CPUs free: another process holds the rest
            torch.set_num_threads(1)
            _chosen = 1
            logger.info(
                f"Small model (about {parameters / 1e6:.1f} M parameters) and {idle:.1f} of {os.cpu_count()} CPUs idle: "
                f"1 intra-op thread instead of {_default_threads}, since beside a busy process the threads of a small "
                f"model wait for each other at every operation; set OMP_NUM_THREADS to choose."
            )
            return _chosen
        _chosen = torch.get_num_threads()
        logger.info(
            f"Small model (about {parameters / 1e6:.1f} M parameters) on an idle machine "
            f"({'unknown' if idle is None else f'{idle:.1f}'} CPUs idle): {_chosen} intra-op threads (PyTorch's "
            f"default; 1 if another process were busy); set OMP_NUM_THREADS to choose."
        )
        return _chosen
    _chosen = torch.get_num_threads()
    logger.info(f"Using {_chosen} intra-op thread(s) (PyTorch's default); set OMP_NUM_THREADS to choose.")
    return _chosen


def use_one_thread() -> None:
    """For a process that shares the CPUs with work of its own (the demo's second process, compare's seeds): one
    intra-op thread, as if chosen (later `configure_threads` calls keep it)."""
    global _chosen
    torch.set_num_threads(1)
    _chosen = 1

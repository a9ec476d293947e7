"""How many intra-op threads a run uses, chosen once at start-up and logged.

PyTorch's CPU kernels run on an OpenMP team of one thread per core. Between two operations every thread waits at a
barrier (spinning first, then sleeping). A small model is thousands of small operations a step, so when one core is
taken by another process, each barrier waits for the thread that shares that core with it and a step takes 10-20
times longer than at one thread (see docs/speed.md for the measurements). One thread does not meet any barrier, and
on operations this small a second thread gains little even on an idle machine. So a small model runs on one thread
unless the user says otherwise; a large one (ViT-B/16 CLIP: about 150 M parameters) keeps PyTorch's default, where
each operation is long enough for a busy neighbour to cost at most its share of the cores.

`OMP_NUM_THREADS` (or an earlier `torch.set_num_threads`) always wins: set it to choose the count yourself.
"""

import os

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Below this many parameters (both towers), a model runs on one intra-op thread by default. The package's stand-in
# CLIPs are 0.1-2 M; the smallest pretrained CLIP (ViT-B/32) has 151 M.
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


def configure_threads(config) -> int:
    """Chooses the intra-op thread count for a run of `config`'s model, once per process, and logs the choice.
    Returns the count in use."""
    global _chosen
    if _chosen is not None:
        return torch.get_num_threads()
    if user_chose_threads():
        _chosen = torch.get_num_threads()
        logger.info(f"Using {_chosen} intra-op thread(s), as set (OMP_NUM_THREADS or torch.set_num_threads).")
        return _chosen
    parameters = estimated_parameters(config)
    if parameters < SMALL_MODEL_PARAMETERS and _default_threads > 1:
        torch.set_num_threads(1)
        _chosen = 1
        logger.info(
            f"Small model (about {parameters / 1e6:.1f} M parameters): 1 intra-op thread instead of "
            f"{_default_threads}, as fast on an idle machine and many times faster beside a busy process; "
            f"set OMP_NUM_THREADS to choose."
        )
    else:
        _chosen = torch.get_num_threads()
        logger.info(f"Using {_chosen} intra-op thread(s) (PyTorch's default); set OMP_NUM_THREADS to choose.")
    return _chosen

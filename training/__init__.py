"""VL-LTR training: data, the two stages' configs and Trainers, anchor sentence selection, evaluation, and the
`run_*` command-line scripts (`python -m training.run_cvlp`, `run_select_anchors`, `run_lgr`, `run_eval`, `demo`)."""

import importlib

# Imported on first use (PEP 562): the Trainers import 🤗 datasets and the whole Trainer, which every
# `python -m training.<script> --help` would otherwise wait for.
_LAZY = {
    "CVLPConfig": "cvlp_config",
    "CVLPTrainer": "cvlp_trainer",
    "LGRConfig": "lgr_config",
    "LGRTrainer": "lgr_trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

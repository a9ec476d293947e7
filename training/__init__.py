"""VL-LTR training: data, the two stages' configs and Trainers, anchor sentence selection, evaluation, and the
`run_*` command-line scripts (`python -m training.run_cvlp`, `run_select_anchors`, `run_lgr`, `run_eval`, `demo`)."""

from .cvlp_config import CVLPConfig
from .cvlp_trainer import CVLPTrainer
from .lgr_config import LGRConfig
from .lgr_trainer import LGRTrainer

__all__ = ["CVLPConfig", "CVLPTrainer", "LGRConfig", "LGRTrainer"]

"""Training: ``Trainer`` (the loop, ``loop.py``), one step as public functions
(``step.py``), the extra loss inputs (``inputs.py``), checkpoints and resume
(``checkpointing.py``) and loss sweeps (``sweep.py``)."""

from mlx_pref.train.loop import Trainer, train
from mlx_pref.train.preflight import check_loss_fits_data

__all__ = ["Trainer", "check_loss_fits_data", "train"]

"""Metrics to the tools people already watch: TensorBoard and Weights & Biases.

``report_to: [tensorboard, wandb]`` sends every record written to metrics.jsonl, under the
same names and at the same step, plus the resolved config. Each tool is an optional extra
imported only when asked for: without ``report_to`` neither is imported.

- ``tensorboard`` writes event files under ``RUN_DIR/tensorboard`` through tensorboardX
  (``pip install 'mlx-pref[tensorboard]'``); a resumed run drops the events past its
  checkpoint (``purge_step``), as metrics.jsonl drops its records.
- ``wandb`` logs to a W&B run whose id is the run directory's, so a resumed run continues
  it (``pip install 'mlx-pref[wandb]'``). It honours the usual environment (``WANDB_MODE=
  offline``, ``WANDB_PROJECT``; default project ``mlx-pref``) and keeps its files in
  ``RUN_DIR/wandb``. The config it receives holds no token, and nothing here prints one.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from mlx_pref.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
FOLDERS = {"tensorboard": TENSORBOARD_DIR, "wandb": WANDB_DIR}


def _missing(tool: str, package: str) -> ConfigError:
    return ConfigError(
        f"report_to: {tool} needs the {package} package: pip install 'mlx-pref[{tool}]'"
    )


def _scalars(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, start_step: int, run_id: str | None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboardX") from None
        purge = start_step + 1 if start_step > 0 else None  # events past the checkpoint go
        self.writer = SummaryWriter(
            logdir=str(run_dir / TENSORBOARD_DIR),
            purge_step=purge,
            filename_suffix=f".step{start_step}",  # a resumed run's file never replaces one
        )
        if start_step == 0:
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict, start_step: int, run_id: str | None):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mlx-pref"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),  # wandb keeps its files in dir/wandb
            config=config,
        )

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


TOOLS = {"tensorboard": TensorBoard, "wandb": WandB}


class Reporters:
    """The tools a run reports to; opened when training starts, closed when it ends."""

    def __init__(self, names: list[str], enabled: bool = True):
        self.names = list(names) if enabled else []
        self.open_tools: list = []

    def folders(self) -> list[str]:
        """The names the tools write in the run directory (listed in its marker)."""
        return [FOLDERS[name] for name in self.names]

    def open(self, run_dir: Path, config: dict, start_step: int) -> None:
        """Start each tool for the run in ``run_dir`` (its marker's id names the W&B run)."""
        from mlx_pref.rundir import read_marker

        self.close()
        if not self.names:
            return
        marker = read_marker(run_dir)
        run_id = marker.id if marker else None
        for name in self.names:
            self.open_tools.append(TOOLS[name](Path(run_dir), config, start_step, run_id))

    def log(self, record: dict) -> None:
        for tool in self.open_tools:
            tool.log(record)

    def close(self) -> None:
        for tool in self.open_tools:
            tool.close()
        self.open_tools = []

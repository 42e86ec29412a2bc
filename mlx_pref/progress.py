"""What a run shows and records: a live progress line and ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from mlx_pref.checkpoint import write_atomic

METRICS_FILE = "metrics.jsonl"


def _fmt(value: float) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
        return f"{value:.3g}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MetricsLog:
    """Append-only JSON lines, one object per logged step (train or ``eval/``)."""

    def __init__(self, run_dir: Path, enabled: bool = True, name: str = METRICS_FILE):
        self.path = run_dir / name
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a run resumed from that step writes them again."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the usable log
        text = "".join(line + "\n" for line in keep)
        write_atomic(self.path, lambda tmp: tmp.write_text(text))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(self.path.parent)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A one-line live bar on a terminal; plain periodic lines otherwise (CI, pipes)."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        unit: str = "step",
        plain_lines: bool = False,
    ):
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.start = start
        self.unit = unit
        self.plain_lines = plain_lines
        """Off a terminal, print a plain progress line at every tenth of the way."""
        self.shown = 0

    def eta(self, step: int) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        if math.isinf(eta):
            return "?"
        return time.strftime("%H:%M:%S" if eta >= 3600 else "%M:%S", time.gmtime(eta))

    def update(self, step: int, metrics: dict) -> None:
        if not self.live:
            tenth = step * 10 // max(self.total, 1)
            if self.enabled and self.plain_lines and tenth > self.shown:
                self.shown = tenth
                self.stream.write(f"{self.unit} {step}/{self.total}, eta {self.eta(step)}\n")
                self.stream.flush()
            return
        width = 24
        frac = step / max(self.total, 1)
        bar = "=" * int(width * frac) + ">" + " " * (width - int(width * frac))
        eta_s = self.eta(step)
        parts = [f"{self.unit} {step}/{self.total} [{bar[:width]}]"]
        for key, label in (
            ("loss", "loss"),
            ("rewards/accuracies", "acc"),
            ("tokens_per_sec", "tok/s"),
        ):
            if key in metrics:
                parts.append(f"{label} {_fmt(metrics[key])}")
        parts.append(f"eta {eta_s}")
        columns = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + "  ".join(parts)[: columns - 1] + "\033[K")
        self.stream.flush()

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (evaluation) out of the ETA."""
        self.t0 += seconds

    def message(self, text: str) -> None:
        """A line that stays (logged metrics, eval results, checkpoints)."""
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def format_metrics(record: dict, keys: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {_fmt(record[k])}" for k in keys if k in record)

"""Stopping a run cleanly: Ctrl-C and SIGTERM (what schedulers send) end it after the
current step with a checkpoint; a second signal aborts at once. Every process of a
distributed run stops at the same step. Too many non-finite steps stop it too."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from mlx_pref import backend


class StopRequest:
    """The signal (or call) that asked a run to stop, and the handlers that catch it."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signum = 0
        self.previous: dict = {}

    def request(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + int(self.signum or signal.SIGINT)

    def requested(self, world: int = 1) -> bool:
        """Whether any process was asked to stop (a collective when ``world > 1``)."""
        if world == 1:
            return bool(self.signum)
        return float(backend.all_sum(mx.array(float(bool(self.signum))))) > 0

    def install(self) -> None:
        """Catch SIGINT and SIGTERM until ``uninstall``; handlers exist only on the main
        thread, so elsewhere none is set."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum:  # a second signal stops at once
            raise KeyboardInterrupt
        self.request(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        self.log(f"{name}: stopping after this step and saving...{again}")


def non_finite_message(trainer, checkpoint: Path) -> str:
    """Why a run stopped after ``max_nonfinite`` non-finite steps, and what to do."""
    return (
        f"stopped at step {trainer.step}: {trainer.nonfinite_in_a_row} steps in a row had a "
        f"non-finite loss or gradient ({trainer.skipped_steps} skipped in all). Checkpoint: "
        f"{checkpoint}. Lower learning_rate or beta, or check the data, then resume with "
        "--resume."
    )

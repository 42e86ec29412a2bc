"""What a run says before the wait: its size, what it trains, its cost per step, and,
once the first steps are timed, when it will finish."""

from __future__ import annotations

import time

from mlx_pref import backend, native
from mlx_pref.memory import step_size
from mlx_pref.trainable import parameter_counts


def _millions(n: int) -> str:
    return f"{n / 1e6:.3f}M"


def tokens_per_step(trainer) -> float:
    """Mean tokens per optimizer step over an epoch, every process together, as packed
    (each prompt once when pairs share it)."""
    packed = step_size(trainer.train_set.examples, trainer.config.share_prompt).tokens
    return packed / max(trainer.steps_per_epoch, 1)


def memory_plan(trainer) -> str | None:
    """The header's line on the run's peak memory and what was chosen to keep it there."""
    return trainer.memory.line()


def attention_line() -> str:
    """Which attention kernel a CPU run uses (building the native one now, once)."""
    if native.load() is not None:
        return f"attention: native CPU kernels, {native.threads()} thread(s)"
    return f"attention: MLX blocks (native CPU kernels unavailable: {native.reason()})"


def header_lines(trainer) -> list[str]:
    """The run header: steps and data, trainable parameters and their share (as mlx-lm
    prints them), tokens per step, memory, and the reference."""
    cfg = trainer.config
    kind = "pairs" if trainer.train_set.paired else "rows"
    epochs = trainer.total_steps / trainer.steps_per_epoch
    lines = [
        f"training {trainer.total_steps} steps ({epochs:.3g} epochs of "
        f"{trainer.steps_per_epoch}): {len(trainer.train_set)} {kind}, loss {cfg.loss}, "
        f"output {trainer.run_dir}"
    ]
    trainable, total = parameter_counts(trainer.model)
    if cfg.full:
        what = "every weight (full fine-tuning)"
    else:
        params = trainer.adapter_config["lora_parameters"]
        kind_name = "DoRA" if trainer.adapter_config.get("fine_tune_type") == "dora" else "LoRA"
        keys = params.get("keys")
        if keys and trainer.loaded.vision:  # full paths, block by block
            keys = keys[: len(keys) // trainer.adapter_config["num_layers"]]
        where = f"{len(keys)} modules per block" if keys else "mlx-lm's default modules"
        what = f"{kind_name} rank {params['rank']} on {where}"
    lines.append(
        f"trainable parameters: {100 * trainable / max(total, 1):.3f}% "
        f"({_millions(trainable)}/{_millions(total)}), {what}"
    )
    per_step = cfg.batch_size * cfg.grad_accum * trainer.world
    lines.append(
        f"tokens per step: {tokens_per_step(trainer):,.0f} on average "
        f"({per_step} {kind} = batch {cfg.batch_size} x accumulation {cfg.grad_accum}"
        + (f" x {trainer.world} processes)" if trainer.world > 1 else ")")
    )
    memory = memory_plan(trainer)
    if memory:
        lines.append(memory)
    if backend.backend_name() == "cpu":
        lines.append(attention_line())
    lines.append(f"reference: {trainer.reference.describe()}")
    router = trainer.objective.router
    if router is not None:
        lines.append(router.describe(cfg.router_aux_loss_coef))
    return lines


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Eta:
    """Times the first steps (after a warm-up step) and says once when the run will end,
    evaluations included (timed by the step-0 evaluation, or estimated from a step)."""

    TIMED = 3

    def __init__(self, trainer):
        self.total, self.eval_every = trainer.total_steps, trainer.config.eval_every
        self.start = trainer.step
        self.times: list[float] = []
        self.eval_seconds: float | None = None
        self.done = False

    def timed_eval(self, seconds: float, scored_reference: bool) -> None:
        """Time an evaluation, unless it also scored reference rows (a first pass)."""
        if self.eval_seconds is None and not scored_reference:
            self.eval_seconds = seconds

    def after_step(self, step: int, step_time: float) -> str | None:
        """The ETA line, once, when enough steps are timed; else None."""
        if self.done or step - self.start <= 1:  # the first step warms caches up
            return None
        self.times.append(step_time)
        if len(self.times) < self.TIMED or step >= self.total:
            return None
        self.done = True
        per_step = sum(self.times) / len(self.times)
        left = self.total - step
        evals = left // self.eval_every + 1
        seconds = left * per_step
        if self.eval_seconds is not None:
            seconds += evals * self.eval_seconds
            what = f"{left} steps and {evals} evaluations ({self.eval_seconds:.2g} s each)"
        else:
            what = f"{left} steps (evaluations not timed yet, not counted)"
        finish = time.strftime("%H:%M", time.localtime(time.time() + seconds))
        return (
            f"timed: {per_step:.3g} s/step; {what} left: about {_clock(seconds)} "
            f"(ends near {finish})"
        )

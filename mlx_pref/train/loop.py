"""The training loop: batches in, adapters, checkpoints and metrics out. No loss math here.

Read top to bottom: ``Trainer.__init__`` assembles the run from a Config (model and
adapters, data and its batch plan, the reference, the loss and its inputs, the
optimizer); ``train_step`` does one optimizer step; ``evaluate`` scores the held-out set;
``train`` loops with logging, evaluation, checkpoints, stop requests and a guard against
non-finite steps. ``Trainer.resume`` continues a run from its last intact checkpoint.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_pref import backend
from mlx_pref.checkpoint import CHECKPOINTS
from mlx_pref.config import RUN_CONFIG, Config, load_config
from mlx_pref.data import Batch, BatchPlan, Dataset, load_datasets
from mlx_pref.errors import ConfigError, Interrupted, NonFiniteError
from mlx_pref.generate import answer
from mlx_pref.logps import set_compile
from mlx_pref.losses import beta_at, prepare_loss
from mlx_pref.memory import apply_plan, epoch_steps, plan_run
from mlx_pref.models import LoadedModel, load_model
from mlx_pref.moe import has_experts
from mlx_pref.progress import METRICS_FILE, MetricsLog, Progress, format_metrics
from mlx_pref.reference import make_reference, refresh, start_reference
from mlx_pref.reporting import Reporters
from mlx_pref.rundir import check_output, claim, record
from mlx_pref.train import checkpointing
from mlx_pref.train.evaluation import eval_order, evaluate_dataset
from mlx_pref.train.header import Eta, header_lines
from mlx_pref.train.preflight import (
    check_context,
    check_data,
    check_hub_login,
    check_model_fits_config,
)
from mlx_pref.train.step import StepResult, loss_and_grad, lr_schedule, make_objective, train_step
from mlx_pref.train.stopping import StopRequest, non_finite_message
from mlx_pref.train.watch import BEST, EvalWatch, save_best
from mlx_pref.trainable import make_trainable

SAMPLES_FILE = "samples.jsonl"
LOG_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "aux_loss", "tokens_per_sec")
EVAL_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
EVAL_LOG_KEYS = (*EVAL_KEYS, "eval/aux_loss")
"""What each evaluation prints (``aux_loss``: Mixture-of-Experts models only)."""


class Trainer:
    """Preference optimisation of one model (LoRA/DoRA adapters or every weight), driven by
    a Config."""

    def __init__(self, config: Config, *, loaded: LoadedModel | None = None, verbose: bool = True):
        self.config = cfg = config
        if cfg.push_to_hub:  # before any model loads: fail now, not after hours of training
            check_hub_login(cfg.push_to_hub)
        group = backend.distributed_group()
        self.world, self.is_main = group.size(), group.rank() == 0
        """Only the first process writes checkpoints, metrics, logs and exports."""
        self.verbose = verbose and self.is_main
        self.progress = Progress(0, enabled=self.verbose)
        self.run_dir = Path(cfg.output)
        mx.random.seed(cfg.seed)
        self.loaded = loaded or load_model(
            cfg.model, quantization_bits=cfg.quantization_bits, dtype=cfg.dtype,
            dequantize=cfg.dequantize,
        )  # fmt: skip
        # What was chosen for the base, recorded so that a resume and exports agree with it.
        quantization = cfg.quantization if self.loaded.quantization_bits else None
        self.config = cfg = dataclasses.replace(
            cfg, dequantize=self.loaded.dequantized, quantization=quantization
        )
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        check_model_fits_config(cfg, self.loaded)
        backend.set_wired_limit()  # Metal: keep the weights resident between steps
        for note in [*cfg.notes, *self.loaded.notes]:  # foreign names read, the base's dtype
            self.log(note)
        self.trainable = make_trainable(self.loaded, cfg)
        loss = prepare_loss(cfg.loss, label_smoothing=cfg.label_smoothing, **cfg.loss_params)
        # A router's load-balancing loss is not a sum over rows: sub-batches would change it.
        split_ok = loss.decomposable and not (cfg.router_aux_loss_coef and has_experts(self.model))
        # Before any data is read: the settings must fit the model and the memory.
        check_context(cfg, self.loaded.config)
        plan_run(self.model, cfg, None, split_ok)
        set_compile(cfg.compile)
        self.train_set, self.eval_set = load_datasets(cfg, self.tokenizer)
        for line in check_data(cfg, self.train_set, self.eval_set):
            self.log(line)
        self.watch = EvalWatch(cfg, has_eval=self.eval_set is not None)
        rank = group.rank()
        self.plan = BatchPlan(
            self.train_set.examples, cfg.batch_size, cfg.grad_accum, cfg.seed,
            cfg.share_prompt, self.world, rank,
        )  # fmt: skip
        self.steps_per_epoch = self.plan.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{self.train_set.name}: too few examples for {self.world} processes")
        reference = make_reference(
            cfg, self.loaded, sft_weights=self.trainable.start_weights,
            steps_per_epoch=self.steps_per_epoch, log=self.log, show_progress=self.verbose,
        )  # fmt: skip
        separate = getattr(getattr(reference, "scorer", reference), "model", self.model)
        self.memory = plan_run(
            self.model, cfg, epoch_steps(self.plan), split_ok,
            None if separate is self.model else separate,
        )  # fmt: skip
        apply_plan(self.memory, self.model, self.plan)
        orders = {"train": self.plan.epoch(0)}  # the batches steps and evaluations use
        if self.eval_set is not None:
            orders["eval"] = eval_order(cfg, self.eval_set, self.world, rank)
        start_reference(reference, {"train": self.train_set, "eval": self.eval_set}, orders)
        self.objective = make_objective(
            cfg, self.model, loss, reference, self.train_set, self.log, self.verbose,
            recompute=self.memory.settings.recompute,
        )  # fmt: skip
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.optimizer = optim.AdamW(
            learning_rate=lr_schedule(cfg, self.total_steps), weight_decay=cfg.weight_decay
        )
        self.grad_fn = loss_and_grad(self.objective)
        self.step = self.nonfinite_in_a_row = self.skipped_steps = 0
        self.window: list[dict] = []
        """Per-step metrics since the last logged record (checkpointed: exact logs on resume)."""
        self.metrics_log = MetricsLog(self.run_dir, enabled=self.is_main)
        self.samples_log = MetricsLog(self.run_dir, enabled=self.is_main, name=SAMPLES_FILE)
        self.progress.total = self.total_steps
        self.stop = StopRequest(self.log)
        self.reporters = Reporters(cfg.report_to, enabled=self.is_main)
        self.eta: Eta | None = None
        self.resumed = False
        """Built by ``resume``: the run directory is already this run's."""

    @property
    def reference(self):
        return self.objective.reference

    @property
    def adapter_config(self) -> dict:
        return self.trainable.config

    @property
    def finished(self) -> bool:
        """All steps taken, or stopped early (``early_stopping_patience``)."""
        return self.step >= self.total_steps or self.watch.stopped

    def log(self, text: str | None) -> None:
        if self.verbose and text:
            self.progress.message(text)

    def beta(self) -> float:
        """β at the current step (the schedule is resolved against the real total steps)."""
        cfg = self.config
        return beta_at(self.step, self.total_steps, cfg.beta, cfg.beta_end, cfg.beta_schedule)

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step ``step`` (0-based), a pure function of it."""
        return self.plan.step(step)

    def train_step(self, batches: Batch | list[Batch]) -> StepResult:
        """One optimizer step over one batch, or several accumulated micro-batches."""
        batches = [batches] if isinstance(batches, Batch) else batches
        mx.random.seed(self.config.seed * 1_000_003 + self.step)  # dropout: exact on resume
        self.objective.beta = self.beta()
        result = train_step(self.objective, self.optimizer, batches, self.train_set, self.grad_fn)
        self.nonfinite_in_a_row = 0 if result.finite else self.nonfinite_in_a_row + 1
        self.skipped_steps += not result.finite
        result.metrics["skipped_steps"] = self.skipped_steps
        self.step += 1
        return result

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Mean loss and TRL metrics over the held-out set, prefixed ``eval/``."""
        split = "eval" if dataset is None else "custom"
        dataset = dataset or self.eval_set
        if dataset is None:
            return {}
        if split == "custom":
            self.reference.attach({"custom": dataset})
            if self.objective.udm is not None:
                self.objective.udm.forget("custom")
        return evaluate_dataset(self.objective, dataset, split, world=self.world,
                                rank=self.plan.rank)  # fmt: skip

    def train(self) -> dict[str, float]:
        """Train to ``total_steps`` (or an early stop); returns the final metrics."""
        cfg = self.config
        if self.step == 0:
            if self.is_main:
                if not self.resumed:
                    check_output(self.run_dir, "run")
                claim(self.run_dir, "run", self.run_files())
                cfg.save(self.run_dir / RUN_CONFIG)
            self.metrics_log.truncate_after(-1)
            self.samples_log.truncate_after(-1)
        for line in header_lines(self):
            self.log(line)
        self.eta = Eta(self)
        last: dict[str, float] = {}
        self.stop.install()
        try:
            self.reporters.open(self.run_dir, cfg.to_dict(), self.step)
            if self.step == 0 and cfg.eval_on_start and self.eval_set is not None:
                last = self._log_eval()
            while not self.finished:
                for line in refresh(self.reference, self.model, cfg, self.step,
                                    self.steps_per_epoch):  # fmt: skip
                    self.log(line)
                result = self.train_step(self.step_batches(self.step))
                self.window.append(result.metrics)
                self.progress.update(self.step, result.metrics)
                self.log(self.eta.after_step(self.step, result.metrics["step_time"]))
                if self.step % cfg.log_every == 0 or self.finished:
                    last = self._log_window()
                if self.step % cfg.eval_every == 0 or self.finished:
                    last.update(self._log_eval())
                if self.nonfinite_in_a_row >= cfg.max_nonfinite:
                    raise NonFiniteError(non_finite_message(self, self.save_checkpoint()))
                if self.step % cfg.save_every == 0 or self.finished:
                    self.save_checkpoint()
                if self.stop.requested(self.world):
                    self.save_checkpoint()
                    raise Interrupted(
                        f"interrupted at step {self.step}; checkpoint saved. Resume with: "
                        f"mlx-pref train --resume {self.run_dir}",
                        self.stop.exit_code,
                    )
        finally:
            self.stop.uninstall()
            self.progress.close()
            self.reporters.close()
        if not self.is_main:
            return last
        record(self.run_dir, *self.trainable.save(self.run_dir))
        what = "model" if cfg.full else "adapters"
        self.log(f"{what} saved to {self.run_dir}")
        if cfg.push_to_hub:
            from mlx_pref.export import export_and_push

            folder = export_and_push(self.run_dir, cfg.push_to_hub, private=cfg.hub_private)
            self.log(f"exported to {folder} and pushed to https://huggingface.co/{cfg.push_to_hub}")
        return last

    def run_files(self) -> list[str]:
        """The names this run writes in its directory (listed in its ownership marker)."""
        cfg = self.config
        files = [RUN_CONFIG, METRICS_FILE, CHECKPOINTS, *self.trainable.files()]
        files += [SAMPLES_FILE] if cfg.generate_during_eval else []
        files += [BEST] if cfg.save_best else []
        return files + self.reporters.folders()

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint for the current step (skipped if it exists)."""
        return checkpointing.save(self)

    @classmethod
    def resume(
        cls, run_dir: str | Path, overrides: dict | None = None, *, verbose: bool = True
    ) -> Trainer:
        """A trainer for the run in ``run_dir``, at its newest intact checkpoint, ready to
        continue; see ``checkpointing.resumed_config`` for which settings may change."""
        return checkpointing.resume(cls, Path(run_dir), overrides, verbose=verbose)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step with a checkpoint (what Ctrl-C and SIGTERM do)."""
        self.stop.request(signum)

    def _log_window(self) -> dict:
        window, self.window = self.window, []
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        for key in window[-1]:
            record[key] = float(np.mean([m[key] for m in window if key in m]))
        self._record(record)
        self.log(f"step {self.step}: " + format_metrics(record, LOG_KEYS))
        return record

    def _record(self, record: dict) -> None:
        """One record to metrics.jsonl and to the ``report_to`` tools."""
        self.metrics_log.write(record)
        if self.is_main:
            self.reporters.log(record)

    def generate_samples(self) -> list[dict]:
        """Greedy completions for the first few eval prompts from the policy and the
        reference, side by side (written to samples.jsonl at each evaluation)."""
        cfg = self.config
        dataset = self.eval_set or self.train_set
        prompts = list(dict.fromkeys(e.prompt for e in dataset.examples))[: cfg.generate_prompts]
        out = []
        for prompt in prompts:
            row = {"step": self.step, "prompt": self.tokenizer.decode(list(prompt))}
            row["policy"] = answer(self.model, self.tokenizer, prompt, cfg.generate_max_tokens)
            with self.reference.as_model() as reference:
                if reference is not None:
                    row["reference"] = answer(
                        reference, self.tokenizer, prompt, cfg.generate_max_tokens
                    )
            out.append(row)
        return out

    def _log_eval(self) -> dict:
        t0 = time.perf_counter()
        scored = getattr(self.reference, "computed_rows", 0)
        metrics = self.evaluate()
        if self.config.generate_during_eval and self.is_main:
            for row in self.generate_samples():
                self.samples_log.write(row)
        if metrics:
            self._record({"step": self.step, **metrics})
            self.log(f"eval step {self.step}: " + format_metrics(metrics, EVAL_LOG_KEYS))
        if self.watch.observe(self.step, metrics) and self.is_main:
            save_best(self, self.watch)
        if self.watch.stopped:
            self.log(self.watch.stop_message(self.step) + "; checkpoint saved")
            if self.window:  # the steps since the last logged record
                metrics = {**self._log_window(), **metrics}
        mx.clear_cache()  # evaluation's buffers are not the training step's
        elapsed = time.perf_counter() - t0
        self.progress.exclude(elapsed)
        if self.eta is not None:  # an evaluation that scored the reference is not typical
            self.eta.timed_eval(elapsed, scored != getattr(self.reference, "computed_rows", 0))
        return metrics


def train(config: Config | str | Path | None = None, **overrides) -> dict[str, float]:
    """Train from a Config, a YAML path, or the embedded default; returns final metrics."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    return Trainer(config).train()

"""The training loop: batches in, adapters, checkpoints and metrics out. No loss math here.

Read top to bottom: ``Trainer.__init__`` builds the model, adapters, data, reference
and optimizer from a Config; ``train_step`` does one optimizer step; ``evaluate`` scores
the held-out set; ``train`` loops with logging, evaluation, checkpoints, Ctrl-C
handling and a guard against non-finite steps. ``Trainer.resume`` rebuilds a run
from its directory and continues where its last intact checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.utils import load_adapters

from mlx_pref import backend
from mlx_pref.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    adapter_parameters,
    apply_lora,
    load_adapter_weights,
    save_adapters,
    set_adapter_parameters,
)
from mlx_pref.checkpoint import (
    CHECKPOINTS,
    STATE,
    checkpoint_dir,
    latest_valid,
    read_state,
    remove_after,
    write_checkpoint,
)
from mlx_pref.config import RUN_CONFIG, Config, load_config
from mlx_pref.data import Batch, Dataset, collate, data_warnings, load_datasets
from mlx_pref.data.batching import batch_order, mismatched
from mlx_pref.errors import ConfigError, Interrupted, NonFiniteError
from mlx_pref.logps import row_logps, sequence_logps, set_compile, split_lm, wpo_weights
from mlx_pref.losses import (
    LossState,
    beta_at,
    density_ratio_weights,
    fit_density_ratio_classifier,
    get_loss,
    mean_pool,
    parse_loss,
    preference_loss,
    sample_prompt_indices,
)
from mlx_pref.models import LoadedModel, enable_grad_checkpoint, load_model
from mlx_pref.progress import METRICS_FILE, MetricsLog, Progress, format_metrics
from mlx_pref.reference import (
    CachedReference,
    LiveReference,
    Reference,
    SeparateModel,
    describe,
    mix_adapters,
    model_fingerprint,
    reference_weights,
)
from mlx_pref.rundir import check_output, claim, legacy_run, read_marker

OPTIMIZER_FILE = "optimizer.safetensors"
REF_ADAPTER_FILE = "reference_adapters.safetensors"
SAMPLES_FILE = "samples.jsonl"
RESUMABLE = {"max_steps", "epochs", "eval_every", "save_every", "log_every", "keep_last"}
"""Settings a resumed run may change: none alters the steps already taken."""
LOG_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "tokens_per_sec")
EVAL_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")


@dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]


@dataclass
class BatchContext:
    """What a batch's loss needs besides the policy forward; none of it is differentiated."""

    ref: mx.array | None = None
    policy_kl: mx.array | None = None
    ref_kl: mx.array | None = None
    udm: mx.array | None = None


def lr_schedule(cfg: Config, total_steps: int) -> Callable[[mx.array], mx.array]:
    """Linear warmup from 0, then constant, linear decay to 0, or cosine decay to 0."""
    peak, warm = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
    rest = max(total_steps - warm, 1)
    decay = {
        "constant": lambda: lambda step: mx.array(peak),
        "linear": lambda: optim.linear_schedule(peak, 0.0, rest),
        "cosine": lambda: optim.cosine_decay(peak, rest, 0.0),
    }[cfg.lr_schedule]()
    if warm == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warm), decay], [warm])


def _mean(x: mx.array) -> mx.array:
    """Mean that is 0, not NaN, for an empty side (an unpaired batch with one label only)."""
    return x.sum() / max(x.size, 1)


def batch_metrics(
    chosen_rewards: mx.array,
    rejected_rewards: mx.array,
    chosen_logps: mx.array,
    rejected_logps: mx.array,
    paired: bool,
) -> dict[str, mx.array]:
    """TRL's reward and log-prob metrics for one batch (means over its rows)."""
    out = {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "logps/chosen": _mean(chosen_logps),
        "logps/rejected": _mean(rejected_logps),
    }
    if paired:
        out["rewards/accuracies"] = (chosen_rewards > rejected_rewards).astype(mx.float32).mean()
        out["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    else:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def check_loss_fits_data(loss, train_set: Dataset, eval_set: Dataset | None) -> None:
    """Paired losses need pairs; the held-out set must be of the training set's kind."""
    paired_only = [get_loss(name).name for name in parse_loss(loss) if get_loss(name).paired]
    if paired_only and not train_set.paired:
        raise ConfigError(
            f"loss {', '.join(paired_only)} needs paired data (prompt/chosen/rejected) but "
            f"{train_set.name} holds unpaired rows (prompt/completion/label): "
            "use loss: bco or kto"
        )
    if eval_set is not None and eval_set.paired != train_set.paired:
        raise ConfigError(
            f"eval_data {eval_set.name} is {'paired' if eval_set.paired else 'unpaired'} but "
            f"the training data is {'paired' if train_set.paired else 'unpaired'}"
        )


class Trainer:
    """Preference optimisation of LoRA adapters on one model, driven by a Config."""

    def __init__(
        self,
        config: Config,
        *,
        loaded: LoadedModel | None = None,
        verbose: bool = True,
    ):
        self.config = cfg = config
        self.group = backend.distributed_group()
        self.world, self.rank = self.group.size(), self.group.rank()
        self.is_main = self.rank == 0
        """Only the first process writes checkpoints, metrics, logs and exports."""
        self.verbose = verbose and self.is_main
        self.progress = Progress(0, enabled=self.verbose)
        self.run_dir = Path(cfg.output)
        mx.random.seed(cfg.seed)
        self.loaded = loaded or load_model(
            cfg.model,
            quantization_bits=cfg.quantization_bits,
            dtype=cfg.dtype,
            dequantize=cfg.dequantize,
        )
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        backend.set_wired_limit()  # Metal: keep the weights resident between steps
        for note in self.loaded.notes:
            self._log(note)
        self.adapter_config, sft_weights = self._attach_adapters()
        if cfg.grad_checkpoint:
            enable_grad_checkpoint(self.model)
        set_compile(cfg.compile)
        self.train_set, self.eval_set = load_datasets(cfg, self.tokenizer)
        self._orders: dict[int, list[np.ndarray]] = {}
        self.loss_weights = parse_loss(cfg.loss)
        self.loss_specs = [get_loss(name) for name in self.loss_weights]
        check_loss_fits_data(cfg.loss, self.train_set, self.eval_set)
        for line in data_warnings(self.train_set, cfg):
            self._log(line)
        if (cfg.use_weighting or cfg.ld_alpha is not None) and not self.train_set.paired:
            raise ConfigError(
                "use_weighting (WPO) and ld_alpha (LD-DPO) weigh pairs: they need paired data"
            )
        if cfg.sync_ref_model and cfg.ref_model_mixup_alpha < 1 and cfg.lora.dora:
            raise ConfigError(
                "TR-DPO blends (ref_model_mixup_alpha < 1) are not defined for DoRA adapters; "
                "use ref_model_mixup_alpha: 1.0 or LoRA"
            )
        if cfg.push_to_hub:  # fail now, not after hours of training
            from huggingface_hub import get_token

            from mlx_pref.export import ExportError, validate_repo_id

            try:
                validate_repo_id(cfg.push_to_hub)
            except ExportError as exc:
                raise ConfigError(str(exc)) from None
            if not get_token():
                raise ConfigError(
                    "push_to_hub: not logged in to the Hugging Face Hub; run `hf auth login` "
                    "or set HF_TOKEN before training"
                )
        self.loss_state = LossState()
        # ``reference_free: true`` drops the reference from the loss only: as in TRL, the
        # logged rewards still subtract it, unless ``reference: none`` says to skip it.
        self.reference_free = not any(s.needs_reference for s in self.loss_specs) or (
            bool(cfg.loss_params.get("reference_free")) and cfg.reference == "none"
        )
        self.kto_kl = "kto" in self.loss_weights
        self._check_loss_options()
        self.steps_per_epoch = math.ceil(len(self._epoch_batches(0)) / cfg.grad_accum)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{self.train_set.name}: too few examples for {self.world} processes")
        self.kto_kl = "kto" in self.loss_weights
        self.reference = self._make_reference(sft_weights)
        self.reference.attach({"train": self.train_set, "eval": self.eval_set})
        self.udm: dict[str, np.ndarray] = {}
        self.udm_classifier = None
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.optimizer = optim.AdamW(
            learning_rate=lr_schedule(cfg, self.total_steps), weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.window: list[dict] = []
        """Per-step metrics since the last logged record (checkpointed: exact logs on resume)."""
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.metrics_log = MetricsLog(self.run_dir, enabled=self.is_main)
        self.samples_log = MetricsLog(self.run_dir, enabled=self.is_main, name=SAMPLES_FILE)
        self.progress.total = self.total_steps
        self._loss_and_grad = nn.value_and_grad(self.model, self._loss)
        self._interrupted = False
        self.resumed = False
        """Built by ``resume``: the run directory is already this run's."""

    # ----------------------------------------------------------------- pieces
    def _attach_adapters(self) -> tuple[dict, dict | None]:
        """Fresh LoRA adapters, or (``adapter``) the SFT adapter to start from.

        An SFT adapter is rebuilt with its own settings (mlx-lm's loader checks that every
        tensor fits), and a frozen copy of its weights becomes the reference (TRL's
        ``ref_adapter_name``); the base is never copied.
        """
        cfg = self.config
        self.model.freeze()
        if cfg.adapter is None:
            config = apply_lora(self.model, cfg.lora)
        else:
            config, _ = load_adapter_weights(cfg.adapter)  # clear errors for a bad directory
            try:
                load_adapters(self.model, cfg.adapter)
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"adapter {cfg.adapter} does not fit the model: {exc}") from None
        self.model.train()  # dropout on in the adapters; evaluation switches it off
        mx.eval(self.model.parameters())
        return config, (adapter_parameters(self.model) if cfg.adapter else None)

    def _make_reference(self, sft_weights: dict | None) -> Reference:
        """The reference strategy for this config, with the reason it was chosen."""
        cfg = self.config
        ignores_reference = self.reference_free or cfg.loss_params.get("reference_free")
        if ignores_reference and (cfg.ref_regen_epochs or cfg.sync_ref_model):
            raise ConfigError(
                f"loss {cfg.loss} is reference-free: ref_regen_epochs / sync_ref_model do not apply"
            )
        if self.reference_free:
            if cfg.reference not in ("auto", "none"):
                self._log(
                    f"note: loss {cfg.loss} is reference-free; ignoring reference: {cfg.reference}"
                )
            why = "reference: none" if cfg.reference == "none" else "the loss is reference-free"
            return Reference(why + " (rewards are beta * log pi)")
        if cfg.reference == "none":
            raise ConfigError(
                f"loss {cfg.loss} needs a reference; 'reference: none' is for reference-free "
                "losses (simpo, cpo, orpo, or reference_free: true)"
            )
        if cfg.ref_model:
            if cfg.reference == "adapters-off":
                raise ConfigError(
                    "reference: adapters-off uses the policy's own base; drop ref_model"
                )
            ref = load_model(
                cfg.ref_model,
                quantization_bits=cfg.quantization_bits,
                dtype=cfg.dtype,
                dequantize=cfg.dequantize,
            )
            if (
                ref.tokenizer.vocab_size != self.tokenizer.vocab_size
                or ref.tokenizer.get_vocab() != self.tokenizer.get_vocab()
            ):
                raise ConfigError(
                    f"ref_model {cfg.ref_model} has a different tokenizer from the model"
                )
            scorer: Reference = SeparateModel(
                ref.model, "a separate reference model was given", cfg.ld_alpha, cfg.share_prompt
            )
            scored_by = ref
        else:
            if cfg.reference == "model":
                raise ConfigError("reference: model needs ref_model (--ref-model DIR_OR_HUB_ID)")
            what = (
                "the base plus the SFT adapter, frozen"
                if sft_weights
                else "the base with adapters off"
            )
            scorer = LiveReference(
                self.model,
                sft_weights,
                f"{what}, no second copy of the weights",
                cfg.ld_alpha,
                cfg.share_prompt,
            )
            scored_by = self.loaded
        live_refresh = cfg.sync_ref_model and cfg.ref_model_sync_steps < self.steps_per_epoch
        if cfg.reference == "cache" or (cfg.reference == "auto" and not live_refresh):
            cache_dir = (
                Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else backend.cache_dir() / "ref-logps"
            )
            reason = "reference log-probs are computed once per dataset and reused from disk"
            if cfg.reference == "auto":
                reason = "auto: " + reason
            # Everything about the scoring model that changes its values (the examples and
            # the reference adapter are added per dataset by the cache itself).
            base = (
                f"{scored_by.path.name}|{model_fingerprint(scored_by.path)}|"
                f"q{scored_by.quantization_bits}|{cfg.dtype}|dequantize={cfg.dequantize}"
            )
            return CachedReference(
                scorer, base, cache_dir, reason, log=self._log, show_progress=self.verbose
            )
        if cfg.reference == "auto":
            scorer.reason = f"auto: TR-DPO syncs every {cfg.ref_model_sync_steps} steps, so a cache would be recomputed often; {scorer.reason}"
        return scorer

    def _log(self, text: str) -> None:
        if self.verbose:
            self.progress.message(text)

    def beta(self) -> float:
        """β at the current step (the schedule is resolved against the real total steps)."""
        cfg = self.config
        return beta_at(self.step, self.total_steps, cfg.beta, cfg.beta_end, cfg.beta_schedule)

    def _check_loss_options(self) -> None:
        """Run the loss once on placeholder values, so that an option it rejects (an
        f-divergence it does not take, WPO with AOT, a reference-free BCO, ...) is a config
        error now rather than a traceback at the first step; and say which loss
        parameters the selected losses do not use."""
        cfg = self.config
        one, pair = mx.zeros((1,)), mx.zeros((2,))
        extra = {}
        if cfg.use_weighting:
            extra["policy_weights"] = mx.ones((1,))
        if self.kto_kl:
            extra["policy_kl_logps"] = extra["ref_kl_logps"] = pair
        if cfg.bco_udm:
            extra["udm_weights"] = mx.ones((1,))
        ref = None if self.reference_free else one
        try:
            out = preference_loss(
                cfg.loss, one, one, ref, ref, mx.ones((1,)), mx.ones((1,)), beta=cfg.beta,
                label_smoothing=cfg.label_smoothing, state=LossState(), train=False,
                **extra, **cfg.loss_params,
            )  # fmt: skip
            mx.eval(out.loss)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"loss {cfg.loss}: {exc}") from None
        used = {k for spec in self.loss_specs for k in spec.params}
        for key in sorted(set(cfg.loss_params) - used):
            self._log(f"note: {key} has no effect on loss {cfg.loss}")

    # ------------------------------------------------------------------ BCO UDM
    def _prompt_embeddings(self, prompts: list[tuple[int, ...]]) -> np.ndarray:
        """Mean-pooled last hidden state of the frozen base over each prompt's tokens."""
        split = split_lm(self.model)
        if split is None:
            raise ConfigError("bco_udm needs a llama-family model whose hidden states can be read")
        body = split[0]
        out = []
        with reference_weights(self.model, None):
            for i in range(0, len(prompts), 16):
                chunk = prompts[i : i + 16]
                width = max(len(p) for p in chunk)
                ids = np.zeros((len(chunk), width), dtype=np.int32)
                mask = np.zeros((len(chunk), width), dtype=np.float32)
                for k, p in enumerate(chunk):
                    ids[k, : len(p)], mask[k, : len(p)] = p, 1.0
                pooled = mean_pool(body(mx.array(ids)), mx.array(mask))
                out.append(np.asarray(pooled.astype(mx.float32)))
        return np.concatenate(out)

    def _fit_udm(self) -> None:
        """BCO's underlying distribution matching: a classifier telling desirable from
        undesirable prompts gives each undesirable row a clipped density-ratio weight."""
        cfg = self.config

        def rows(dataset):
            if dataset.paired:
                prompts = [e.prompt for e in dataset.examples]
                return prompts, prompts
            good = [e.prompt for e in dataset.examples if e.label]
            bad = [e.prompt for e in dataset.examples if not e.label]
            return good, bad

        good, bad = rows(self.train_set)
        take_good = sample_prompt_indices(len(good), cfg.prompt_sample_size, seed=cfg.seed)
        take_bad = sample_prompt_indices(len(bad), cfg.prompt_sample_size, seed=cfg.seed + 1)
        self.udm_classifier = fit_density_ratio_classifier(
            self._prompt_embeddings([good[i] for i in take_good]),
            self._prompt_embeddings([bad[i] for i in take_bad]),
        )
        weights = self._udm_weights("train", self.train_set)
        self._log(
            f"bco_udm: density-ratio classifier fitted on {len(take_good)} + {len(take_bad)} "
            f"prompts (mean weight on the training prompts {weights.mean():.3f})"
        )

    def _udm_weights(self, split: str, dataset: Dataset) -> np.ndarray:
        """The UDM weight of each example's prompt in ``dataset`` (computed once per split)."""
        if split not in self.udm:
            cfg = self.config
            emb = self._prompt_embeddings([e.prompt for e in dataset.examples])
            self.udm[split] = np.asarray(
                density_ratio_weights(
                    self.udm_classifier,
                    emb,
                    min_density_ratio=cfg.min_density_ratio,
                    max_density_ratio=cfg.max_density_ratio,
                )
            )
        return self.udm[split]

    def _shard(self, dataset: Dataset, seed: int, epoch: int, drop_short: bool) -> list[np.ndarray]:
        """This process's share of each batch: the epoch is ordered in global batches of
        ``batch_size x world`` examples and each process takes its slice, so N processes
        with batch B see exactly what one process with batch N x B sees."""
        order = batch_order(
            self._bucket_keys(dataset), self.config.batch_size * self.world, seed=seed, epoch=epoch
        )
        if self.world == 1:
            return order
        if drop_short and order and len(order[-1]) < self.world:
            order = order[:-1]  # every process needs at least one example per step
        return [np.array_split(idx, self.world)[self.rank] for idx in order]

    def _bucket_keys(self, dataset: Dataset) -> np.ndarray:
        """Length-bucketing sort keys. Rows are sorted by total length; with prompt sharing,
        by prompt-length quartile and then completion length, so that both the shared
        prompt pass and the completion pass pad little (on hh-rlhf, 16% fewer padded slots
        than sorting by total length)."""
        if dataset.paired and self.config.share_prompt:
            prompts = np.array([len(e.prompt) for e in dataset.examples])
            completions = np.array([max(len(e.chosen), len(e.rejected)) for e in dataset.examples])
            quartile = np.searchsorted(np.quantile(prompts, [0.25, 0.5, 0.75]), prompts)
            return quartile * (completions.max() + 1) + completions
        return np.array([e.length for e in dataset.examples])

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This process's batches of training epoch ``epoch`` (the last epoch's is kept)."""
        if epoch not in self._orders:
            self._orders = {epoch: self._shard(self.train_set, self.config.seed, epoch, True)}
        return self._orders[epoch]

    def _step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step ``step`` (0-based), a pure function of it."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._epoch_batches(epoch)
        ga = self.config.grad_accum
        examples = self.train_set.examples
        return [
            collate([examples[i] for i in idx], idx)
            for idx in order[within * ga : (within + 1) * ga]
        ]

    def _context(self, batch: Batch, split: str, dataset: Dataset) -> BatchContext:
        """Reference log-probs, KTO's KL terms and UDM weights for a batch (no gradient)."""
        ctx = BatchContext(ref=self.reference.logps(batch, split))
        if self.kto_kl:
            kl_batch = mismatched(batch)
            ctx.policy_kl = mx.stop_gradient(sequence_logps(self.model, kl_batch).sums)
            ctx.ref_kl = self.reference.live_logps(kl_batch)
        if self.config.bco_udm:
            if self.udm_classifier is None:
                self._fit_udm()
            weights = self._udm_weights(split, dataset)[batch.indices]
            ctx.udm = mx.array(weights if batch.paired else weights[~batch.labels])
        return ctx

    def _forward(self, batch: Batch, ctx: BatchContext, train: bool):
        """Loss and per-batch metrics for one batch under the current policy."""
        cfg = self.config
        # The prefix cache must not be replayed by a checkpointed backward pass.
        share = cfg.share_prompt and not cfg.grad_checkpoint
        seq = sequence_logps(self.model, batch, with_p2=cfg.use_weighting, share_prompt=share)
        logps = row_logps(seq, batch, cfg.ld_alpha)
        chosen_idx = mx.array(np.flatnonzero(batch.labels))
        rejected_idx = mx.array(np.flatnonzero(~batch.labels))
        lengths = mx.array(batch.completion_lengths)
        chosen, rejected = logps[chosen_idx], logps[rejected_idx]
        extra = {}
        if cfg.use_weighting:
            extra["policy_weights"] = wpo_weights(seq, batch)
        if cfg.ld_alpha is not None:  # the NLL term uses true sums, not LD-weighted ones
            tokens = mx.maximum(lengths[chosen_idx].sum(), 1).astype(mx.float32)
            extra["chosen_nll"] = -seq.sums[chosen_idx].sum() / tokens
        if ctx.policy_kl is not None:
            extra["policy_kl_logps"], extra["ref_kl_logps"] = ctx.policy_kl, ctx.ref_kl
        if ctx.udm is not None:
            extra["udm_weights"] = ctx.udm
        out = preference_loss(
            cfg.loss,
            chosen,
            rejected,
            None if ctx.ref is None else ctx.ref[chosen_idx],
            None if ctx.ref is None else ctx.ref[rejected_idx],
            lengths[chosen_idx],
            lengths[rejected_idx],
            beta=self.beta(),
            label_smoothing=cfg.label_smoothing,
            state=self.loss_state,
            train=train,
            **extra,
            **cfg.loss_params,
        )
        metrics = batch_metrics(
            out.chosen_rewards, out.rejected_rewards, chosen, rejected, batch.paired
        )
        metrics.update(out.metrics)
        return out.loss, metrics

    def _loss(self, batch: Batch, ctx: BatchContext):
        return self._forward(batch, ctx, train=True)

    # ------------------------------------------------------------- one step
    def train_step(self, batches: Batch | list[Batch]) -> StepResult:
        """One optimizer step over one batch, or several accumulated micro-batches."""
        batches = [batches] if isinstance(batches, Batch) else batches
        mx.random.seed(self.config.seed * 1_000_003 + self.step)  # dropout: exact on resume
        t0 = time.perf_counter()
        backend.reset_peak_memory()
        # Weights n_b / n_total over every micro-batch of every process: the step's
        # gradient and metrics are those of one big batch.
        total = float(backend.all_sum(mx.array(sum(b.num_examples for b in batches), mx.float32)))
        loss_state = self.loss_state.state_dict()  # restored if the step is skipped
        grads, metrics = None, {}
        for batch in batches:
            ctx = self._context(batch, "train", self.train_set)
            (loss, m), g = self._loss_and_grad(batch, ctx)
            w = batch.num_examples / total
            g = tree_map(lambda x, w=w: x * w, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            m = {"loss": loss, **m}
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + w * v
            mx.eval(grads, metrics)
        if self.world > 1:
            grads = nn.average_gradients(tree_map(lambda x: x * self.world, grads))
            metrics = self._sum_metrics(metrics)
        if self.config.max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grads, math.inf)[1]
        out = {k: float(v) for k, v in metrics.items()}
        out["grad_norm"] = float(norm)
        if math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"]):
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
            self.nonfinite_in_a_row = 0
        else:  # skip the update: weights and running loss statistics stay as they were
            self.loss_state.load_state_dict(loss_state)
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
        out["skipped_steps"] = self.skipped_steps
        elapsed = time.perf_counter() - t0
        out["beta"] = self.beta()
        out["learning_rate"] = float(self.optimizer.learning_rate)
        tokens = sum(b.num_tokens for b in batches)
        completion = sum(b.num_completion_tokens for b in batches)
        out["tokens_per_sec"] = tokens / elapsed
        out["completion_tokens_per_sec"] = completion / elapsed
        out["step_time"] = elapsed
        out["peak_memory_gb"] = backend.memory_stats()["peak"] / 1e9
        self.step += 1
        return StepResult(out["loss"], out)

    def _sum_metrics(self, metrics: dict) -> dict:
        """Sum a dict of scalars over processes (one collective, keys in a fixed order)."""
        keys = sorted(metrics)
        summed = backend.all_sum(mx.stack([mx.array(metrics[k], mx.float32) for k in keys]))
        return dict(zip(keys, summed))

    # ------------------------------------------------------------ evaluation
    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Mean loss and TRL metrics over the held-out set, prefixed ``eval/``."""
        split = "eval" if dataset is None else "custom"
        dataset = dataset or self.eval_set
        if dataset is None:
            return {}
        if split == "custom":
            self.reference.attach({"custom": dataset})
            self.udm.pop("custom", None)
        # With several processes, a last batch too small to give each one a row is left
        # out: every process must take part in every collective.
        order = self._shard(dataset, seed=0, epoch=0, drop_short=True)
        if not order:
            raise ConfigError(f"{dataset.name}: fewer eval examples than processes ({self.world})")
        if self.config.eval_batches:
            order = order[: self.config.eval_batches]
        sums: dict[str, mx.array] = {}
        self.model.eval()
        try:
            for idx in order:
                batch = collate([dataset.examples[i] for i in idx], idx)
                ctx = self._context(batch, split, dataset)
                loss, metrics = self._forward(batch, ctx, train=False)
                n = batch.num_examples
                for k, v in {"loss": loss, "count": mx.array(1.0), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + n * v
                mx.eval(sums)
        finally:
            self.model.train()
        if self.world > 1:
            sums = self._sum_metrics(sums)
        count = float(sums.pop("count"))
        return {f"eval/{k}": float(v) / count for k, v in sums.items()}

    # ------------------------------------------------------------- the loop
    def train(self) -> dict[str, float]:
        """Train to ``total_steps``; returns the final metrics (train and eval)."""
        cfg = self.config
        if self.step == 0:
            if self.is_main:
                if not self.resumed:
                    check_output(self.run_dir, "run")
                claim(self.run_dir, "run", self.run_files())
                cfg.save(self.run_dir / RUN_CONFIG)
            self.metrics_log.truncate_after(0)
            self.samples_log.truncate_after(0)
        self._log(
            f"training {self.total_steps} steps: {len(self.train_set)} "
            f"{'pairs' if self.train_set.paired else 'rows'}, loss {cfg.loss}, output {self.run_dir}"
        )
        self._log(f"reference: {describe(self.reference)}")
        self.reference.prepare({"train": self.train_set, "eval": self.eval_set})
        last: dict[str, float] = {}
        previous = self._install_signal_handlers()
        try:
            while self.step < self.total_steps:
                self._refresh_reference()
                result = self.train_step(self._step_batches(self.step))
                self.window.append(result.metrics)
                self.progress.update(self.step, result.metrics)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    last = self._log_window(self.window)
                    self.window = []
                if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                    last.update(self._log_eval())
                if self.nonfinite_in_a_row >= cfg.max_nonfinite:
                    path = self.save_checkpoint()
                    raise NonFiniteError(
                        f"stopped at step {self.step}: {self.nonfinite_in_a_row} steps in a row "
                        f"had a non-finite loss or gradient ({self.skipped_steps} skipped in "
                        f"all). Checkpoint: {path}. Lower learning_rate or beta, or check the "
                        "data, then resume with --resume."
                    )
                if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                if self._stop_requested():
                    self.save_checkpoint()
                    raise Interrupted(
                        f"interrupted at step {self.step}; checkpoint saved. Resume with: "
                        f"mlx-pref train --resume {self.run_dir}",
                        128 + int(self._interrupted or signal.SIGINT),
                    )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.progress.close()
        if not self.is_main:
            return last
        save_adapters(self.model, self.run_dir, self.adapter_config)
        self._log(f"adapters saved to {self.run_dir}")
        if cfg.push_to_hub:
            from mlx_pref.export import export_and_push

            folder = export_and_push(self.run_dir, cfg.push_to_hub, private=cfg.hub_private)
            self._log(
                f"exported to {folder} and pushed to https://huggingface.co/{cfg.push_to_hub}"
            )
        return last

    def run_files(self) -> list[str]:
        """The names this run writes in its directory (listed in its ownership marker)."""
        files = [RUN_CONFIG, METRICS_FILE, CHECKPOINTS, ADAPTER_FILE, ADAPTER_CONFIG]
        return files + ([SAMPLES_FILE] if self.config.generate_during_eval else [])

    def _refresh_reference(self) -> None:
        """Regenerate (every N epochs, never at 0) or TR-DPO-sync the reference before a step."""
        cfg, step = self.config, self.step
        if step == 0:
            return
        if cfg.ref_regen_epochs and step % self.steps_per_epoch == 0:
            epoch = step // self.steps_per_epoch
            if epoch % cfg.ref_regen_epochs == 0:
                self.reference.set_weights(adapter_parameters(self.model))
                self._log(f"epoch {epoch}: reference regenerated from the student")
        if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
            alpha = cfg.ref_model_mixup_alpha
            try:
                mixed = mix_adapters(adapter_parameters(self.model), self.reference.weights, alpha)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            mx.eval(mixed)
            self.reference.set_weights(mixed)
            self._log(f"step {step}: reference synced (alpha {alpha})")

    # ------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything besides weights that the next step depends on."""
        return {
            "step": self.step,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "skipped_steps": self.skipped_steps,
            "loss_state": self.loss_state.state_dict(),
            "log_window": self.window,
        }

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint for the current step (skipped if it exists)."""

        def write(tmp: Path) -> None:
            save_adapters(self.model, tmp, self.adapter_config)
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(self.optimizer.state)))
            (tmp / STATE).write_text(json.dumps(self.state_dict(), indent=1))
            if self.reference.weights is not None:
                mx.save_safetensors(str(tmp / REF_ADAPTER_FILE), self.reference.weights)

        if not self.is_main:
            return checkpoint_dir(self.run_dir, self.step)
        return write_checkpoint(self.run_dir, self.step, write, self.config.keep_last)

    def load_checkpoint(self, path: Path) -> None:
        """Restore adapters, optimizer and loop state from a checkpoint directory."""
        set_adapter_parameters(self.model, mx.load(str(path / ADAPTER_FILE)))
        self.optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
        state = read_state(path)
        if (path / REF_ADAPTER_FILE).exists():
            self.reference.set_weights(mx.load(str(path / REF_ADAPTER_FILE)))
        self.step = state["step"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.skipped_steps = state["skipped_steps"]
        self.loss_state.load_state_dict(state["loss_state"])
        self.window = state["log_window"]
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.progress.start = self.step

    @classmethod
    def resume(
        cls, run_dir: str | Path, overrides: dict | None = None, *, verbose: bool = True
    ) -> Trainer:
        """A trainer for the run in ``run_dir``, at its newest intact checkpoint.

        ``overrides`` equal to the saved settings are fine (the original command with
        ``--resume`` added works); changed ones may extend the run (``max_steps``,
        ``epochs``, which also stretches the schedules from here on) or change logging and
        checkpointing, and are saved into the run's config. Anything else is refused.
        """
        run_dir = Path(run_dir)
        if not (run_dir / RUN_CONFIG).exists():
            raise ConfigError(f"{run_dir} is not a run directory: {RUN_CONFIG} is missing")
        if read_marker(run_dir) is None and not legacy_run(run_dir):
            raise ConfigError(f"{run_dir} is not an mlx-pref run directory (no marker)")
        saved = load_config(run_dir / RUN_CONFIG)
        overrides = {k: v for k, v in (overrides or {}).items() if k != "output"}
        config = load_config(run_dir / RUN_CONFIG, {**overrides, "output": str(saved.output)})
        changed = sorted(
            f.name
            for f in dataclasses.fields(Config)
            if getattr(config, f.name) != getattr(saved, f.name)
        )
        refused = [k for k in changed if k not in RESUMABLE]
        if refused:
            detail = ", ".join(
                f"{k} ({getattr(saved, k)!r} -> {getattr(config, k)!r})" for k in refused
            )
            raise ConfigError(
                f"--resume continues a run with its saved config; only {', '.join(sorted(RESUMABLE))} "
                f"can change, not {detail}"
            )
        config = dataclasses.replace(config, output=str(run_dir))
        trainer = cls(config, verbose=verbose)
        trainer.resumed = True
        path = latest_valid(run_dir, warn=trainer._log)
        if path is None:
            trainer._log(f"no intact checkpoint in {run_dir}: starting from step 0")
        else:
            trainer.load_checkpoint(path)
        if trainer.step > trainer.total_steps:
            raise ConfigError(
                f"{run_dir} is at step {trainer.step}, past the {trainer.total_steps} steps "
                "asked for; pass a larger --max-steps (or --epochs) to train longer"
            )
        if trainer.step == trainer.total_steps:
            return trainer  # finished: nothing is written
        if trainer.is_main:
            claim(run_dir, "run", trainer.run_files())
            if changed:
                config.save(run_dir / RUN_CONFIG)
            # checkpoints and log records past this one were damaged or are stale now
            remove_after(run_dir, trainer.step if path else -1)
        trainer.metrics_log.truncate_after(trainer.step)
        trainer.samples_log.truncate_after(trainer.step)
        if path is not None:
            trainer._log(f"resumed from {path} (step {trainer.step})")
        return trainer

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def _install_signal_handlers(self) -> dict:
        """Ctrl-C and SIGTERM (what schedulers send) stop after the current step with a
        checkpoint. Signal handlers exist only on the main thread; elsewhere none is set."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_sigint)
        return previous

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop: all processes stop at the same step."""
        if self.world == 1:
            return bool(self._interrupted)
        return float(backend.all_sum(mx.array(float(bool(self._interrupted))))) > 0

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # a second signal stops at once
            raise KeyboardInterrupt
        self._interrupted = signum
        if signum == signal.SIGINT:
            self._log("stopping after this step (Ctrl-C again to abort without saving)...")
        else:
            self._log(f"{signal.Signals(signum).name}: stopping after this step and saving...")

    def _log_window(self, window: list[dict]) -> dict:
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        for key in window[-1]:
            record[key] = float(np.mean([m[key] for m in window if key in m]))
        self.metrics_log.write(record)
        self._log(f"step {self.step}: " + format_metrics(record, LOG_KEYS))
        return record

    def generate_samples(self) -> list[dict]:
        """Greedy completions for the first few eval prompts from the policy and the
        reference, side by side (written to samples.jsonl at each evaluation)."""
        from mlx_lm import generate

        cfg = self.config
        dataset = self.eval_set or self.train_set
        prompts = list(dict.fromkeys(e.prompt for e in dataset.examples))[: cfg.generate_prompts]
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            for prompt in prompts:
                row = {"step": self.step, "prompt": self.tokenizer.decode(list(prompt))}
                row["policy"] = generate(
                    self.model, self.tokenizer, list(prompt), max_tokens=cfg.generate_max_tokens
                )
                with self.reference.as_model() as reference:
                    if reference is not None:
                        row["reference"] = generate(
                            reference,
                            self.tokenizer,
                            list(prompt),
                            max_tokens=cfg.generate_max_tokens,
                        )
                out.append(row)
        finally:
            self.model.train(was_training)
        return out

    def _log_eval(self) -> dict:
        t0 = time.perf_counter()
        metrics = self.evaluate()
        if self.config.generate_during_eval and self.is_main:
            for row in self.generate_samples():
                self.samples_log.write(row)
        if metrics:
            self.metrics_log.write({"step": self.step, **metrics})
            self._log(f"eval step {self.step}: " + format_metrics(metrics, EVAL_KEYS))
        mx.clear_cache()  # evaluation's buffers are not the training step's
        self.progress.exclude(time.perf_counter() - t0)
        return metrics


def train(config: Config | str | Path | None = None, **overrides) -> dict[str, float]:
    """Train from a Config, a YAML path, or the embedded default; returns final metrics."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    return Trainer(config).train()

"""Worker: mlx-pref's DPO step, in its own process.

    python bench/ours.py SPEC.json OUT.json

``SPEC.json`` names the model directory, the text data file the Trainer is built on,
the token ids of the step's pairs, config overrides and a mode:

- ``train``: ``Trainer.train_step`` on the step's batch, ``warmup + steps`` times.
- ``naive``: the "before" of the LM-head techniques, written here: full logits at every
  position and a log-softmax over the vocabulary (``head: log_softmax``) or a
  logsumexp without the log-softmax copy (``head: logsumexp``), cached reference.
- ``phases``: the step cut at ``mx.eval`` boundaries (reference, policy forward, LM head,
  backward, optimizer), plus MLX's ``exp`` rate and the step's count of exponentials.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.hide_torch()

from mlx_pref import backend  # noqa: E402

# OpenBLAS must be in the global symbol scope before mlx.core is first imported, or
# libmlx binds cblas_sgemm to the reference BLAS bundled with MLX (~30x slower). This
# call is a statement, so import sorting cannot move mlx.core above it.
backend.load_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from mlx_pref.config import load_config  # noqa: E402
from mlx_pref.data import BatchPlan, Dataset, PairExample, collate  # noqa: E402
from mlx_pref.memory import MemoryPlan, apply_plan, epoch_steps, plan_run  # noqa: E402
from mlx_pref.models import load_model  # noqa: E402
from mlx_pref.train import Trainer  # noqa: E402
from mlx_pref.train.step import (  # noqa: E402
    Objective,
    StepResult,
    batch_context,
    loss_and_grad,
    train_step,
)


def build(spec: dict, workdir: Path) -> tuple[Trainer, Dataset, dict]:
    """A Trainer for the spec's config, trained on exactly the spec's token ids."""
    pairs = common.pairs_from_spec(spec)
    overrides = {
        "model": spec["model"],
        "data": spec["data_file"],
        "output": str(workdir / "run"),
        "batch_size": common.PAIRS_PER_STEP,
        "learning_rate": common.LEARNING_RATE,
        "beta": common.BETA,
        "lora": {
            "r": common.LORA["r"],
            "alpha": common.LORA["alpha"],
            "dropout": common.LORA["dropout"],
            "target_modules": common.LORA["targets"],
        },
        "max_length": max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs),
        "ref_cache_dir": str(workdir / "ref-cache"),
        "eval_every": 10**6,
        "save_every": 10**6,
        "log_every": 10**6,
        "seed": 0,
        **spec.get("config", {}),
    }
    if overrides.get("reference") == "model":
        overrides["ref_model"] = spec["model"]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    loaded = load_model(
        cfg.model,
        quantization_bits=cfg.quantization_bits,
        dtype=cfg.dtype,
        dequantize=cfg.dequantize,
    )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer = Trainer(cfg, loaded=loaded, verbose=False)
    init_s = time.perf_counter() - t0
    examples = [PairExample(tuple(p.prompt), tuple(p.chosen), tuple(p.rejected)) for p in pairs]
    dataset = Dataset(examples, "bench")
    trainer.reference.attach({"train": dataset})
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    trainer.reference.prepare({"train": dataset})
    prepare_s = time.perf_counter() - t0
    one_off = {
        "model_load_s": load_s,
        "trainer_init_s": init_s,
        "reference_prepare_s": prepare_s,
        "reference_prepare_peak_gb": mx.get_peak_memory() / 1e9,
        "reference": trainer.reference.name,
    }
    mx.clear_cache()
    return trainer, dataset, one_off


def _timed_steps(spec: dict, step: Callable[[], tuple[float, float]]) -> dict:
    """Warm-up plus timed calls of ``step`` (which returns its loss and peak GB)."""
    times, peaks, losses = [], [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        loss, peak = step()
        times.append(time.perf_counter() - t0)
        peaks.append(peak)
        losses.append(loss)
    return {**common.summarize(times, spec["warmup"]), "mlx_peak_gb": max(peaks), "losses": losses}


def one_train_step(trainer: Trainer, batch, dataset: Dataset) -> StepResult:
    """mlx-pref's optimizer step on the bench's own batch (the Trainer's objective)."""
    return train_step(trainer.objective, trainer.optimizer, [batch], dataset, trainer.grad_fn)


def planned_step(trainer: Trainer, dataset: Dataset) -> tuple[Objective, list, MemoryPlan]:
    """The bench's pairs as one optimizer step, under the memory plan a run on exactly
    these pairs would choose (sub-batches, recomputation, checkpointed blocks): the
    objective to step with, the micro-batches, and the plan."""
    cfg = trainer.config
    plan = BatchPlan(dataset.examples, len(dataset), 1, cfg.seed, cfg.share_prompt, 1, 0)
    memory = plan_run(trainer.model, cfg, epoch_steps(plan), trainer.objective.loss.decomposable)
    apply_plan(memory, trainer.model, plan)
    objective = dataclasses.replace(trainer.objective, recompute=memory.settings.recompute)
    return objective, plan.step(0), memory


def run_train(spec: dict, trainer: Trainer, dataset: Dataset) -> dict:
    objective, batches, memory = planned_step(trainer, dataset)
    grad_fn = loss_and_grad(objective)
    padded = collate(dataset.examples, np.arange(len(dataset)))

    def step() -> tuple[float, float]:
        result = train_step(objective, trainer.optimizer, batches, dataset, grad_fn)
        return result.loss, result.metrics["peak_memory_gb"]

    return {
        **_timed_steps(spec, step),
        "padding_fraction": padded.padding_fraction,
        "memory_plan": memory.line(),
        "estimate_gb": {k: v / 1e9 for k, v in vars(memory.estimate).items()},
        "allocator_cache_gb": mx.get_cache_memory() / 1e9,
    }


def naive_loss_fn(model: nn.Module, batch, ref: mx.array, head: str):
    """DPO (sigmoid) from full logits at every position: what a plain MLX step does."""
    tokens = mx.array(batch.tokens)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = mx.array(batch.completion_mask().astype(np.float32))
    b = batch.num_examples

    def loss(model):
        logits = model(inputs).astype(mx.float32)
        if head == "log_softmax":
            logp = nn.log_softmax(logits, axis=-1)
            token = mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        else:
            picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            token = picked - mx.logsumexp(logits, axis=-1)
        sums = (token * mask).sum(-1)
        margin = (sums[:b] - ref[:b]) - (sums[b:] - ref[b:])
        return -nn.log_sigmoid(common.BETA * margin).mean()

    return nn.value_and_grad(model, loss)


def run_naive(spec: dict, trainer: Trainer, dataset: Dataset) -> dict:
    batch = collate(dataset.examples, np.arange(len(dataset)))
    ref = trainer.reference.logps(batch, "train")
    model = trainer.model
    step = naive_loss_fn(model, batch, ref, spec["head"])
    optimizer = optim.AdamW(learning_rate=common.LEARNING_RATE, weight_decay=0.0)

    def one_step() -> tuple[float, float]:
        mx.reset_peak_memory()
        loss, grads = step(model)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        return float(loss), mx.get_peak_memory() / 1e9

    return _timed_steps(spec, one_step)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def exp_rate(n: int = 1 << 23) -> float:
    """MLX's elementwise ``exp`` throughput on this device, in elements per second."""
    x = mx.random.normal((n,))
    mx.eval(x)
    mx.eval(mx.exp(x))
    runs = sorted(_timed(lambda: mx.eval(mx.exp(x))) for _ in range(5))
    return n / runs[2]


def exp_counts(shape: dict, batch, share_prompt: bool) -> dict[str, float]:
    """Exponentials in one forward: vocabulary logsumexp at scored tokens, SiLU in every
    MLP, and attention softmax (causal, per head)."""
    lengths = batch.lengths.astype(np.int64)
    prompts = batch.prompt_lengths.astype(np.int64)
    b = batch.num_examples
    if share_prompt:
        tokens = int(prompts[:b].sum() + (lengths - prompts).sum())
    else:
        tokens = int(lengths.sum())
    attention = float((lengths * (lengths + 1) // 2).sum()) * shape["heads"] * shape["layers"]
    if share_prompt:
        attention -= (
            float((prompts[:b] * (prompts[:b] + 1) // 2).sum()) * shape["heads"] * shape["layers"]
        )
    return {
        "vocab_logsumexp": float(batch.num_completion_tokens * shape["vocab"]),
        "silu": float(tokens * shape["intermediate"] * shape["layers"]),
        "attention_softmax": attention,
    }


def run_phases(spec: dict, trainer: Trainer, dataset: Dataset) -> dict:
    """Medians of each phase of the default step, cut at ``mx.eval`` boundaries."""
    from mlx_pref.logps import score_hidden, sequence_logps, split_lm
    from mlx_pref.reference import reference_weights

    cfg = trainer.config
    share = cfg.share_prompt and not cfg.grad_checkpoint
    batch = collate(dataset.examples, np.arange(len(dataset)))
    model = trainer.model
    head = split_lm(model)[1]
    m = batch.num_completion_tokens
    hidden = mx.random.normal((1, m, model.args.hidden_size)).astype(mx.float32)
    flat = np.arange(m)
    targets = batch.tokens[batch.tokens > 0][:m].astype(np.int32)
    mx.eval(hidden)
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for _ in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        ctx = batch_context(trainer.objective, batch, "train", dataset)
        add("reference (cache lookup)", time.perf_counter() - t0)
        with reference_weights(model, None):
            t0 = time.perf_counter()
            mx.eval(sequence_logps(model, batch, share_prompt=share).sums)
            add("reference forward, adapters-off (not in a cached step)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        mx.eval(sequence_logps(model, batch, share_prompt=share).sums)
        add("policy forward (body + head)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        mx.eval(score_hidden(hidden, head, flat, targets, False)[0])
        add("LM head + logsumexp alone (completion rows)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        (loss, _), grads = trainer.grad_fn(batch, ctx)
        mx.eval(loss, grads)
        add("policy forward + backward", time.perf_counter() - t0)
        t0 = time.perf_counter()
        clipped, _ = optim.clip_grad_norm(grads, 1.0)
        trainer.optimizer.update(model, clipped)
        mx.eval(model.trainable_parameters(), trainer.optimizer.state)
        add("optimizer (clip + AdamW)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        one_train_step(trainer, batch, dataset)
        add("whole train_step", time.perf_counter() - t0)
    med = {k: float(np.median(v[spec["warmup"] :] or v)) for k, v in rows.items()}
    med["backward (forward + backward - forward)"] = (
        med["policy forward + backward"] - med["policy forward (body + head)"]
    )
    med["transformer body (forward - head)"] = (
        med["policy forward (body + head)"] - med["LM head + logsumexp alone (completion rows)"]
    )
    rate = exp_rate()
    counts = exp_counts(common.model_shape(Path(spec["model"])), batch, share)
    return {
        "step_s": med["whole train_step"],
        "phases_s": med,
        "exp_gelem_s": rate / 1e9,
        "forward_exps": counts,
        "forward_exp_s_estimate": {k: v / rate for k, v in counts.items()},
        "matmul_gflops": backend.matmul_gflops(),
    }


def main() -> None:
    spec = common.load_spec(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="mlx-pref-bench-") as tmp:
        trainer, dataset, one_off = build(spec, Path(tmp))
        mode = spec.get("mode", "train")
        runner = {"train": run_train, "naive": run_naive, "phases": run_phases}[mode]
        result = runner(spec, trainer, dataset)
    result.update(one_off)
    result["blas"] = backend.blas_info().name
    result["mlx_matmul_gflops"] = backend.matmul_gflops(n=512)
    result["torch_imported"] = bool(sys.modules.get("torch"))
    common.write_result(sys.argv[2], result)


if __name__ == "__main__":
    main()

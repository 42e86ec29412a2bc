"""The training loop: learning, adapters on disk, checkpoints, exact resume, signals, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from _numerics import NUMERICS
from mlx_lm.utils import load

from mlx_pref.adapters import ADAPTER_FILE, adapter_parameters
from mlx_pref.checkpoint import latest_valid, list_checkpoints
from mlx_pref.config import config_from_dict
from mlx_pref.data import collate
from mlx_pref.errors import ConfigError, Interrupted, NonFiniteError
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer
from mlx_pref.train.step import batch_context, forward

# Per-step figures that depend on the machine, not on the computation.
TIMING_KEYS = {"tokens_per_sec", "completion_tokens_per_sec", "step_time", "peak_memory_gb"}


def adapters(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in mx.load(str(Path(run_dir) / ADAPTER_FILE)).items()}


def assert_same_adapters(a: Path, b: Path, atol: float | None = None) -> None:
    """Run ``b``'s adapters are run ``a``'s: as exactly as a resume promises on this
    backend (``_numerics``), or within ``atol``."""
    wa, wb = adapters(a), adapters(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if atol is None:
            NUMERICS.assert_repeated(wb[key], wa[key], err_msg=key)
        else:
            np.testing.assert_allclose(wa[key], wb[key], atol=atol, rtol=0, err_msg=key)


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_training_lowers_the_loss_on_its_data(make_config):
    trainer = Trainer(make_config(max_steps=12, eval_every=100, learning_rate=2e-3), verbose=False)
    before = trainer.evaluate(trainer.train_set)["eval/loss"]
    trainer.train()
    after = trainer.evaluate(trainer.train_set)["eval/loss"]
    # Adapters start at zero: policy == reference.
    assert before == pytest.approx(np.log(2), abs=NUMERICS.tolerance(1e-5))
    assert after < before - 0.01


def test_saved_adapter_reloads_in_mlx_lm_with_identical_logits(make_config, tiny_model):
    cfg = make_config(max_steps=3)
    trainer = Trainer(cfg, verbose=False)
    trainer.train()
    batch = collate(trainer.eval_set.examples[:3])
    tokens = mx.array(batch.tokens)
    ours = trainer.model(tokens)
    model, _ = load(str(tiny_model), adapter_path=cfg.output)
    theirs = model(tokens)
    assert float(mx.abs(ours - theirs).max()) == 0.0
    config = json.loads((Path(cfg.output) / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4


def test_metrics_use_trl_names(make_config):
    cfg = make_config(max_steps=2, eval_every=2)
    Trainer(cfg, verbose=False).train()
    records = read_metrics(cfg.output)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    # The step-0 baseline: adapters start at zero, so the policy is the reference.
    assert evals[0]["eval/loss"] == pytest.approx(np.log(2), abs=NUMERICS.tolerance(1e-6))
    assert evals[0]["eval/rewards/margins"] == NUMERICS.invariant(0.0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "beta", "learning_rate", "tokens_per_sec",
                "peak_memory_gb"):  # fmt: skip
        assert key in train[0], key
        if key in ("beta", "learning_rate", "tokens_per_sec", "peak_memory_gb"):
            continue
        assert f"eval/{key}" in evals[0]
    assert evals[1]["eval/rewards/margins"] == pytest.approx(
        evals[1]["eval/rewards/chosen"] - evals[1]["eval/rewards/rejected"],
        abs=NUMERICS.tolerance(1e-6),
    )


def test_beta_schedule_is_logged_against_the_real_step_count(make_config):
    cfg = make_config(max_steps=5, beta=0.4, beta_schedule="linear", beta_end=0.1, eval_every=10)
    Trainer(cfg, verbose=False).train()
    betas = [r["beta"] for r in read_metrics(cfg.output) if "beta" in r]
    np.testing.assert_allclose(betas, [0.4, 0.325, 0.25, 0.175, 0.1])


def test_grad_accumulation_equals_one_big_batch(make_config, tmp_path):
    big = make_config(batch_size=4, grad_accum=1, output=str(tmp_path / "a"))
    small = make_config(batch_size=2, grad_accum=2, output=str(tmp_path / "b"))
    ta, tb = Trainer(big, verbose=False), Trainer(small, verbose=False)
    idx = ta.plan.epoch(0)[0]
    examples = ta.train_set.examples
    one = ta.train_step(collate([examples[i] for i in idx], idx))
    two = tb.train_step([collate([examples[i] for i in half], half) for half in (idx[:2], idx[2:])])
    # The accumulated gradient is the big batch's: same loss, same gradient norm, same update.
    tol = NUMERICS.tolerance
    assert two.loss == pytest.approx(one.loss, rel=tol(1e-6))
    assert two.metrics["grad_norm"] == pytest.approx(one.metrics["grad_norm"], rel=tol(1e-5))
    margins = one.metrics["rewards/margins"]
    assert two.metrics["rewards/margins"] == pytest.approx(margins, abs=tol(1e-6))
    # Adam's first step is ~lr * sign(g); gradients near zero make single entries differ
    # by float rounding, so compare updates to 1% of the learning rate.
    for key, value in adapter_parameters(ta.model).items():
        np.testing.assert_allclose(
            np.asarray(value), np.asarray(adapter_parameters(tb.model)[key]), atol=tol(1e-4)
        )


def test_resume_after_interruption_matches_an_uninterrupted_run(make_config, tmp_path, monkeypatch):
    straight = make_config(max_steps=6, output=str(tmp_path / "straight"))
    Trainer(straight, verbose=False).train()

    cfg = make_config(max_steps=6, output=str(tmp_path / "cut"))
    first = Trainer(cfg, verbose=False)
    step = first.train_step

    def stop_after_three(batches):
        result = step(batches)
        if first.step == 3:
            first.request_stop()  # what Ctrl-C does
        return result

    monkeypatch.setattr(first, "train_step", stop_after_three)
    with pytest.raises(Interrupted, match="Resume with: mlx-pref train --resume"):
        first.train()
    assert latest_valid(Path(cfg.output)).name == "step-00000003"
    resumed = Trainer.resume(cfg.output, verbose=False)
    assert resumed.step == 3
    resumed.train()
    assert_same_adapters(Path(straight.output), Path(cfg.output))
    NUMERICS.assert_repeated_metrics(
        comparable(read_metrics(cfg.output)), comparable(read_metrics(straight.output))
    )


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(make_config, tmp_path):
    straight = make_config(max_steps=6, output=str(tmp_path / "straight"))
    Trainer(straight, verbose=False).train()
    cfg = make_config(max_steps=4, output=str(tmp_path / "damaged"))
    Trainer(cfg, verbose=False).train()
    newest = list_checkpoints(Path(cfg.output))[-1]
    data = (newest / ADAPTER_FILE).read_bytes()
    (newest / ADAPTER_FILE).write_bytes(data[: len(data) // 2])
    warnings = []
    assert latest_valid(Path(cfg.output), warn=warnings.append).name == "step-00000002"
    assert "step-00000004" in warnings[0] and "adapters.safetensors has" in warnings[0]
    resumed = Trainer.resume(cfg.output, {"max_steps": 6}, verbose=False)
    assert resumed.step == 2
    resumed.train()
    assert_same_adapters(Path(straight.output), Path(cfg.output))


def test_resume_refuses_changes_that_alter_the_result(make_config):
    cfg = make_config(max_steps=2)
    Trainer(cfg, verbose=False).train()
    with pytest.raises(ConfigError, match="only .* can change, not beta"):
        Trainer.resume(cfg.output, {"beta": 0.5}, verbose=False)


def test_a_new_run_does_not_overwrite_an_old_one(make_config):
    cfg = make_config(max_steps=2)
    Trainer(cfg, verbose=False).train()
    with pytest.raises(ConfigError, match="already holds a run; continue it with"):
        Trainer(cfg, verbose=False).train()


def test_non_finite_steps_are_skipped_and_counted(make_config, monkeypatch):
    cfg = make_config(max_steps=4, max_nonfinite=3)
    trainer = Trainer(cfg, verbose=False)
    real = trainer.objective.loss
    calls = {"n": 0}

    def nan_on_second_step(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("train") and trainer.step == 1:
            out.loss = out.loss * mx.array(float("nan"))
        return out

    monkeypatch.setattr(trainer.objective, "loss", nan_on_second_step)
    before = {}

    def snapshot(batches, step=trainer.train_step):
        before[trainer.step] = {
            k: np.asarray(v) for k, v in adapter_parameters(trainer.model).items()
        }
        calls["n"] += 1
        return step(batches)

    monkeypatch.setattr(trainer, "train_step", snapshot)
    trainer.train()
    after_skip = before[2]
    for key, value in before[1].items():
        np.testing.assert_array_equal(value, after_skip[key])  # the NaN step changed nothing
    records = [r for r in read_metrics(cfg.output) if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert trainer.skipped_steps == 1 and calls["n"] == 4


def test_too_many_non_finite_steps_stop_with_a_checkpoint(make_config, monkeypatch):
    cfg = make_config(max_steps=10, max_nonfinite=2)
    trainer = Trainer(cfg, verbose=False)
    real = trainer.objective.loss

    def always_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("train"):
            out.loss = out.loss * mx.array(float("inf"))
        return out

    monkeypatch.setattr(trainer.objective, "loss", always_nan)
    with pytest.raises(NonFiniteError, match="2 steps in a row had a non-finite loss"):
        trainer.train()
    assert latest_valid(Path(cfg.output)).name == "step-00000002"


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_pref.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


HOLD_AFTER_STEP_3 = """
import sys, time
import mlx_pref
from mlx_pref.config import load_config
from mlx_pref.train import Trainer

trainer = Trainer(load_config(sys.argv[1]), verbose=False)
step = trainer.train_step

def hold(batches):
    result = step(batches)
    if trainer.step == 4:  # step 3's checkpoint is on disk: say so, then wait to be killed
        print("step 3 saved", flush=True)
        time.sleep(600)
    return result

trainer.train_step = hold
trainer.train()
"""


def test_sigkill_mid_run_then_resume_gives_the_same_adapters(make_config, tmp_path):
    straight = make_config(max_steps=6, save_every=1, output=str(tmp_path / "straight"))
    Trainer(straight, verbose=False).train()
    cfg = make_config(max_steps=6, save_every=1, output=str(tmp_path / "killed"))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_AFTER_STEP_3, str(_write_config(cfg, tmp_path / "c.yaml"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "step 3 saved"  # the run says when, not a timer
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest_valid(Path(cfg.output)).name == "step-00000003"  # killed in step 4
    resume = _cli("train", "--resume", cfg.output, "--quiet")
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert_same_adapters(Path(straight.output), Path(cfg.output))
    NUMERICS.assert_repeated_metrics(
        comparable(read_metrics(cfg.output)), comparable(read_metrics(straight.output))
    )


def test_ctrl_c_leaves_a_resumable_checkpoint(make_config, tmp_path):
    cfg = make_config(max_steps=40, save_every=1000, eval_every=1000, output=str(tmp_path / "int"))
    proc = _cli("train", str(_write_config(cfg, tmp_path / "c.yaml")))
    _wait_for(Path(cfg.output) / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"Resume with: mlx-pref train --resume {cfg.output}" in err
    assert "Traceback" not in err
    path = latest_valid(Path(cfg.output))
    assert path is not None and 0 < int(path.name.split("-")[1]) < 40
    resumed = Trainer.resume(
        cfg.output, {"max_steps": int(path.name.split("-")[1]) + 1}, verbose=False
    )
    resumed.train()
    assert resumed.step == int(path.name.split("-")[1]) + 1


@pytest.mark.parametrize("template", ["dpo", "ipo", "simpo", "orpo", "bco", "kto", "weighted"])
def test_every_init_template_runs(template, tiny_model, prefs, tmp_path, monkeypatch):
    from importlib.resources import files

    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))
    raw = yaml.safe_load((files("mlx_pref") / "templates" / f"{template}.yaml").read_text())
    raw.update(
        model=str(tiny_model), data=str(prefs[0]), eval_data=str(prefs[1]), max_steps=2,
        eval_every=2, batch_size=2, output=str(tmp_path / template),
    )  # fmt: skip
    final = Trainer(config_from_dict(raw), verbose=False).train()
    assert np.isfinite(final["eval/loss"])


def test_grad_checkpointing_and_compile_leave_the_step_unchanged(make_config, tmp_path):
    results, batches = {}, None
    for name, extra in {
        "plain": {},
        "checkpointed": {"grad_checkpoint": True},
        "compiled": {"compile": True},
        "unshared": {"share_prompt": False},
    }.items():
        trainer = Trainer(make_config(output=str(tmp_path / name), **extra), verbose=False)
        batches = batches or trainer.step_batches(0)  # the same examples for every variant
        results[name] = trainer.train_step(batches).metrics
    for name in ("checkpointed", "compiled", "unshared"):
        plain = results["plain"]
        assert results[name]["loss"] == pytest.approx(plain["loss"], rel=NUMERICS.tolerance(1e-6))
        assert results[name]["grad_norm"] == pytest.approx(
            plain["grad_norm"], rel=NUMERICS.tolerance(1e-4)
        )


def test_generate_during_eval_writes_policy_and_reference_samples(make_config):
    cfg = make_config(max_steps=2, eval_every=2, generate_during_eval=True, generate_prompts=2,
                      generate_max_tokens=5)  # fmt: skip
    trainer = Trainer(cfg, verbose=False)
    trainer.train()
    rows = [
        json.loads(line) for line in (Path(cfg.output) / "samples.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [0, 0, 2, 2]  # the step-0 baseline, then step 2
    assert all(r["policy"] == r["reference"] for r in rows[:2])  # zero adapters at step 0
    rows = rows[2:]
    prompts = list(dict.fromkeys(e.prompt for e in trainer.eval_set.examples))[:2]
    assert [r["prompt"] for r in rows] == [trainer.tokenizer.decode(list(p)) for p in prompts]
    assert all(isinstance(r["policy"], str) and r["policy"] for r in rows)
    assert trainer.generate_samples() == rows  # greedy: the final policy reproduces them


def test_lora_dropout_stays_on_in_training_and_off_in_evaluation(make_config):
    trainer = Trainer(
        make_config(lora={"r": 4, "alpha": 8, "dropout": 0.5}, reference="adapters-off"),
        verbose=False,
    )
    layer = trainer.model.model.layers[0].self_attn.q_proj
    assert layer.dropout.training
    seen = []
    real = trainer.objective.loss

    def spy(*args, **kwargs):
        seen.append((kwargs["train"], layer.dropout.training))
        return real(*args, **kwargs)

    trainer.objective.loss = spy
    trainer.train_step(trainer.step_batches(0))  # runs a reference pass first
    trainer.evaluate()
    trainer.train_step(trainer.step_batches(1))
    assert seen[0] == (True, True) and seen[-1] == (True, True)
    assert all(mode is False for train, mode in seen[1:-1]) and len(seen) > 2


def test_a_skipped_step_leaves_bco_delta_untouched(make_config, monkeypatch):
    trainer = Trainer(make_config(loss="bco", max_steps=3, max_nonfinite=3), verbose=False)
    real = trainer.objective.loss

    def nan_rewards_on_second_step(chosen, *args, **kwargs):
        if kwargs.get("train") and trainer.step == 1:
            chosen = chosen * mx.array(float("nan"))
        return real(chosen, *args, **kwargs)

    monkeypatch.setattr(trainer.objective, "loss", nan_rewards_on_second_step)
    states = []
    step = trainer.train_step

    def record(batches):
        result = step(batches)
        states.append(json.dumps(trainer.objective.loss_state.state_dict()))
        return result

    trainer.train_step = record
    trainer.train()
    assert trainer.skipped_steps == 1
    assert states[1] == states[0]  # the NaN batch did not move delta
    assert "nan" not in states[2].lower() and states[2] != states[1]


def test_resume_is_exact_with_bco_state_regen_and_averaged_logs(make_config, tmp_path, monkeypatch):
    common = dict(loss="bco", max_steps=None, epochs=3, batch_size=16, ref_regen_epochs=1,
                  log_every=2, eval_every=4, save_every=100)  # fmt: skip
    straight = make_config(output=str(tmp_path / "straight"), **common)
    Trainer(straight, verbose=False).train()
    cfg = make_config(output=str(tmp_path / "cut"), **common)
    first = Trainer(cfg, verbose=False)
    step = first.train_step

    def stop_after_five(batches):
        result = step(batches)
        if first.step == 5:
            first.request_stop()
        return result

    first.train_step = stop_after_five
    with pytest.raises(Interrupted):
        first.train()
    resumed = Trainer.resume(cfg.output, verbose=False)
    assert resumed.step == 5 and resumed.reference.weights is not None  # regenerated at step 3
    resumed.train()
    assert_same_adapters(Path(straight.output), Path(cfg.output))
    NUMERICS.assert_repeated_metrics(
        comparable(read_metrics(cfg.output)), comparable(read_metrics(straight.output))
    )


def test_resume_accepts_the_original_command_and_saves_extensions(make_config, tmp_path):
    cfg = make_config(max_steps=2)
    Trainer(cfg, verbose=False).train()
    same = {"max_steps": 2, "batch_size": cfg.batch_size, "output": cfg.output}
    assert Trainer.resume(cfg.output, same, verbose=False).step == 2
    extended = Trainer.resume(cfg.output, {"max_steps": 4}, verbose=False)
    extended.train()
    assert yaml.safe_load((Path(cfg.output) / "config.yaml").read_text())["max_steps"] == 4
    assert Trainer.resume(cfg.output, verbose=False).step == 4


@pytest.mark.parametrize(
    "options",
    [{"loss": "kto"}, {"use_weighting": True}, {"ld_alpha": 0.5}, {"loss": "bco", "bco_udm": True}],
    ids=["kto-kl", "wpo", "ld-dpo", "bco-udm"],
)
def test_model_stage_options_change_the_loss(make_config, tmp_path, options):
    base = dict(loss=options.get("loss", "sigmoid"), reference="adapters-off")
    plain = Trainer(make_config(output=str(tmp_path / "a"), **base), verbose=False)
    other = Trainer(make_config(output=str(tmp_path / "b"), **{**base, **options}), verbose=False)
    rng = np.random.default_rng(3)
    weights = [(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
               for k, v in adapter_parameters(plain.model).items()]  # fmt: skip
    for trainer in (plain, other):
        trainer.model.load_weights(weights, strict=False)
    batch = plain.step_batches(0)[0]
    losses, contexts, metrics = [], [], []
    for trainer in (plain, other):
        ctx = batch_context(trainer.objective, batch, "train", trainer.train_set)
        loss, m = forward(trainer.objective, batch, ctx, train=False)
        losses.append(float(loss))
        contexts.append(ctx)
        metrics.append(m)
    assert np.isfinite(losses).all()
    ctx = contexts[1]
    if options == {"loss": "kto"}:  # the KL rows pair each prompt with another completion
        assert ctx.inputs["policy_kl_logps"].shape == (len(batch.lengths),) and "kl" in metrics[1]
        assert float(metrics[1]["kl"]) >= 0
    else:
        assert abs(losses[0] - losses[1]) > 1e-6
    if options.get("bco_udm"):
        w = np.asarray(ctx.inputs["udm_weights"])
        assert w.shape == (batch.num_examples,) and np.all((w >= 0.5) & (w <= 10.0))

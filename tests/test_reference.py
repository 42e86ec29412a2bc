"""Reference strategies: the same values every way, a cache that is never stale, refreshes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from _numerics import NUMERICS
from click.testing import CliRunner
from conftest import head_rows, write_random_llama
from mlx.utils import tree_unflatten

from mlx_pref.adapters import adapter_parameters, save_adapters
from mlx_pref.cli import cli
from mlx_pref.data import collate
from mlx_pref.errors import ConfigError
from mlx_pref.reference import AdaptersOff, Cached, SeparateModel, mix_adapters
from mlx_pref.train import Trainer
from mlx_pref.train.step import batch_context, forward


def randomize_adapters(trainer: Trainer, seed: int = 7) -> dict[str, mx.array]:
    """Nonzero adapters (fresh LoRA has B = 0, where policy and reference coincide)."""
    rng = np.random.default_rng(seed)
    weights = {
        k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
        for k, v in adapter_parameters(trainer.model).items()
    }
    trainer.model.update(tree_unflatten(list(weights.items())))
    return weights


def batch_loss(trainer: Trainer, split: str = "train") -> float:
    dataset = trainer.train_set if split == "train" else trainer.eval_set
    idx = np.arange(4)
    batch = collate([dataset.examples[i] for i in idx], idx)
    ctx = batch_context(trainer.objective, batch, split, dataset)
    loss, _ = forward(trainer.objective, batch, ctx, train=False)
    return float(loss)


def test_cache_adapters_off_and_separate_model_agree(make_config, tiny_model):
    losses, kinds = {}, {}
    for strategy in ("cache", "adapters-off", "model"):
        extra = {"ref_model": str(tiny_model)} if strategy == "model" else {}
        trainer = Trainer(make_config(reference=strategy, **extra), verbose=False)
        randomize_adapters(trainer)
        kinds[strategy] = type(trainer.reference)
        losses[strategy] = batch_loss(trainer)
    assert kinds == {
        "cache": Cached,
        "adapters-off": AdaptersOff,
        "model": SeparateModel,
    }
    rel = NUMERICS.tolerance(1e-5)
    assert losses["cache"] == pytest.approx(losses["adapters-off"], rel=rel)
    assert losses["model"] == pytest.approx(losses["adapters-off"], rel=rel)
    assert abs(losses["cache"] - np.log(2)) > 1e-3  # the adapters really moved the policy


def test_held_out_reference_values_are_scored_once_per_reference(make_config, monkeypatch):
    import mlx_pref.reference.strategies as reference

    trainer = Trainer(make_config(reference="adapters-off"), verbose=False)
    randomize_adapters(trainer)
    calls = []
    scored = reference.sequence_logps
    monkeypatch.setattr(
        reference, "sequence_logps", lambda *a, **k: calls.append(1) or scored(*a, **k)
    )
    first = trainer.evaluate()
    per_eval = len(calls)
    assert per_eval > 0
    # The same values (as exactly as a repeat is on this backend), the reference not run again.
    NUMERICS.assert_repeated_metrics(trainer.evaluate(), first)
    assert len(calls) == per_eval
    trainer.reference.set_weights(adapter_parameters(trainer.model))  # reference = policy
    moved = trainer.evaluate()
    assert len(calls) == 2 * per_eval
    assert moved["eval/rewards/margins"] == pytest.approx(0.0, abs=NUMERICS.tolerance(1e-5))
    assert abs(first["eval/rewards/margins"]) > 1e-3


def test_auto_picks_cache_or_none_and_says_why(make_config):
    dpo = Trainer(make_config(), verbose=False)
    assert isinstance(dpo.reference, Cached) and dpo.reference.reason.startswith("auto:")
    simpo = Trainer(make_config(loss="simpo"), verbose=False)
    assert simpo.reference.name == "none" and "reference-free" in simpo.reference.reason
    # reference_free drops the reference from the loss; TRL's rewards still use it.
    free = Trainer(make_config(reference_free=True), verbose=False)
    assert isinstance(free.reference, Cached)
    bare = Trainer(make_config(reference_free=True, reference="none"), verbose=False)
    assert bare.reference.name == "none" and "reference: none" in bare.reference.reason
    with pytest.raises(ConfigError, match="needs a reference; 'reference: none' is for"):
        Trainer(make_config(reference="none"), verbose=False)
    with pytest.raises(ConfigError, match="reference: model needs ref_model"):
        Trainer(make_config(reference="model"), verbose=False)


def test_a_matching_cache_is_reused_without_recomputation(make_config, tmp_path):
    first = Trainer(make_config(output=str(tmp_path / "a")), verbose=False)
    first.reference.prepare({"train": first.train_set, "eval": first.eval_set})
    assert first.reference.computed_rows == 48 + 16
    # Another run, another loss, another output: same model, data and truncation.
    second = Trainer(make_config(loss="ipo", output=str(tmp_path / "b")), verbose=False)
    second.reference.prepare({"train": second.train_set, "eval": second.eval_set})
    assert second.reference.computed_rows == 0
    for split in ("train", "eval"):
        np.testing.assert_array_equal(first.reference.values[split], second.reference.values[split])


def fingerprints(trainer: Trainer) -> tuple[str, str]:
    ref = trainer.reference
    return ref.path_for("train").name, ref.path_for("eval").name


def test_changing_data_model_tokenizer_or_max_length_invalidates_the_cache(
    make_config, prefs, tmp_path
):
    base = fingerprints(Trainer(make_config(), verbose=False))
    assert base == fingerprints(Trainer(make_config(), verbose=False))

    other_data = head_rows(prefs[0], tmp_path / "fewer.jsonl", 40)
    assert fingerprints(Trainer(make_config(data=str(other_data)), verbose=False))[0] != base[0]

    other_model = write_random_llama(tmp_path / "other-model", seed=1)
    assert set(
        fingerprints(Trainer(make_config(model=str(other_model)), verbose=False))
    ).isdisjoint(base)

    retok = write_random_llama(tmp_path / "retok", seed=0)  # same weights, different template
    config = json.loads((retok / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (retok / "tokenizer_config.json").write_text(json.dumps(config))
    assert set(fingerprints(Trainer(make_config(model=str(retok)), verbose=False))).isdisjoint(base)

    assert set(fingerprints(Trainer(make_config(max_length=20), verbose=False))).isdisjoint(base)


def test_the_cache_never_serves_values_for_other_reference_weights(make_config):
    trainer = Trainer(make_config(), verbose=False)
    before = trainer.reference.path_for("train")
    trainer.reference.set_weights(randomize_adapters(trainer))
    assert trainer.reference.path_for("train") != before
    assert "train" not in trainer.reference.values  # recomputed on next use


def test_regen_copies_the_student_at_the_configured_epochs_only(make_config, monkeypatch):
    cfg = make_config(max_steps=None, epochs=3, ref_regen_epochs=1, batch_size=16, eval_every=100)
    trainer = Trainer(cfg, verbose=False)
    assert trainer.steps_per_epoch == 3
    calls = []
    real = trainer.reference.set_weights

    def record(weights):
        calls.append(trainer.step)
        snapshot = {k: np.asarray(v) for k, v in adapter_parameters(trainer.model).items()}
        for key, value in weights.items():
            np.testing.assert_array_equal(np.asarray(value), snapshot[key])
        real(weights)

    monkeypatch.setattr(trainer.reference, "set_weights", record)
    trainer.train()
    assert calls == [3, 6]  # start of epochs 1 and 2; never epoch 0


def test_mixup_blends_the_adapter_updates_exactly():
    rng = np.random.default_rng(0)

    def lora(rank):
        return {
            "l.lora_a": mx.array(rng.normal(size=(12, rank)).astype(np.float32)),
            "l.lora_b": mx.array(rng.normal(size=(rank, 10)).astype(np.float32)),
        }

    def update(w):
        return np.asarray(w["l.lora_a"]) @ np.asarray(w["l.lora_b"])

    policy, ref = lora(4), lora(4)
    mixed = mix_adapters(policy, ref, 0.6)
    np.testing.assert_allclose(update(mixed), 0.6 * update(policy) + 0.4 * update(ref), atol=1e-5)
    from_base = mix_adapters(policy, None, 0.6)
    np.testing.assert_allclose(update(from_base), 0.6 * update(policy), atol=1e-5)
    # Repeated syncs grow the rank up to the layer's full rank, then stay exact.
    expected = update(ref)
    for _ in range(4):
        ref = mix_adapters(policy, ref, 0.6)
        expected = 0.6 * update(policy) + 0.4 * expected
    assert ref["l.lora_a"].shape[1] == 10
    np.testing.assert_allclose(update(ref), expected, atol=1e-4)


def test_tr_dpo_sync_sets_the_reference_to_the_blend(make_config):
    cfg = make_config(
        sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, max_steps=3
    )
    trainer = Trainer(cfg, verbose=False)
    assert isinstance(trainer.reference, AdaptersOff)  # syncs every 2 steps: a cache would churn
    policy_at_sync = {}
    step = trainer.train_step

    def capture(batches):
        if trainer.step == 2:
            policy_at_sync.update(
                {k: np.asarray(v) for k, v in adapter_parameters(trainer.model).items()}
            )
        return step(batches)

    trainer.train_step = capture
    trainer.train()
    ref = trainer.reference.weights
    for key in policy_at_sync:
        if key.endswith(".lora_a"):
            stem = key[: -len(".lora_a")]
            got = np.asarray(ref[stem + ".lora_a"]) @ np.asarray(ref[stem + ".lora_b"])
            want = 0.5 * policy_at_sync[key] @ policy_at_sync[stem + ".lora_b"]
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_sft_adapter_start_keeps_the_adapter_in_the_reference(make_config, tmp_path):
    sft = Trainer(make_config(output=str(tmp_path / "sft")), verbose=False)
    weights = randomize_adapters(sft)
    save_adapters(sft.model, tmp_path / "sft-adapter", sft.adapter_config)
    for strategy in ("adapters-off", "cache"):
        trainer = Trainer(
            make_config(adapter=str(tmp_path / "sft-adapter"), reference=strategy,
                        output=str(tmp_path / strategy)),
            verbose=False,
        )  # fmt: skip
        for key, value in adapter_parameters(trainer.model).items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(weights[key]))
        # Policy == base + SFT == reference, so DPO starts exactly at log 2.
        assert batch_loss(trainer) == pytest.approx(np.log(2), abs=NUMERICS.tolerance(1e-6))
        assert (
            "SFT adapter" in trainer.reference.reason
            or "SFT adapter" in trainer.reference.scorer.reason
        )
    shutil.rmtree(tmp_path / "sft-adapter")


def test_cache_ref_command_fills_the_cache(make_config, tmp_path):
    cfg = make_config()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(cli, ["cache-ref", str(path)])
    assert result.exit_code == 0, result.output
    files = [
        Path(line.split(": ", 1)[1])
        for line in result.output.splitlines()
        if line.startswith(("train:", "eval:"))
    ]
    assert len(files) == 2 and all(f.exists() for f in files)
    trainer = Trainer(cfg, verbose=False)
    trainer.reference.prepare({"train": trainer.train_set, "eval": trainer.eval_set})
    assert trainer.reference.computed_rows == 0

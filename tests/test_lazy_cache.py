"""The reference cache fills as training goes: a step scores only the rows it uses, the
first time it uses them; checkpoints persist them; a resumed run, a second epoch, a second
run or another loss reads them back; a stale cache (other model, tokenizer, truncation or
data) is never read. Reference forwards are counted at the scorer."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import head_rows, write_random_llama

from mlx_pref.reference import Cached
from mlx_pref.train import Trainer


def counted(trainer: Trainer) -> list[int]:
    """Rows of every reference forward the trainer's cache runs from now on."""
    calls: list[int] = []
    scorer = trainer.reference.scorer
    live = scorer.live_logps

    def count(batch):
        calls.append(batch.num_examples)
        return live(batch)

    scorer.live_logps = count
    return calls


def stored(trainer: Trainer) -> tuple[np.ndarray, np.ndarray]:
    """The train split's cache file: (values, which rows are scored)."""
    saved = mx.load(str(trainer.reference.path_for("train")))
    return np.asarray(saved["logps"]), np.asarray(saved["known"]).astype(bool)


def used_rows(trainer: Trainer, steps: range) -> set[int]:
    return {int(i) for s in steps for b in trainer.step_batches(s) for i in b.indices}


@pytest.fixture
def lazy(make_config):
    def build(**overrides) -> Trainer:
        settings = {
            "reference": "cache",
            "eval_data": None,
            "batch_size": 2,
            "max_steps": 3,
            "save_every": 2,
            "eval_every": 100,
        }
        trainer = Trainer(make_config(**{**settings, **overrides}), verbose=False)
        assert isinstance(trainer.reference, Cached)
        return trainer

    return build


def test_a_three_step_run_scores_the_six_rows_it_uses(lazy):
    trainer = lazy()
    calls = counted(trainer)
    trainer.train()
    assert len(trainer.train_set) == 48
    assert calls == [2, 2, 2] and trainer.reference.computed_rows == 6
    values, known = stored(trainer)  # flushed at the final checkpoint
    assert set(np.flatnonzero(known)) == used_rows(trainer, range(3))
    assert np.all(values[known] < 0) and np.all(values[~known] == 0)


def test_checkpoints_persist_what_was_scored_and_a_resume_reuses_it(lazy, tmp_path):
    first = lazy(max_steps=2)
    first.train()
    _, known = stored(first)
    assert known.sum() == 4 and set(np.flatnonzero(known)) == used_rows(first, range(2))
    resumed = Trainer.resume(tmp_path / "run", {"max_steps": 4}, verbose=False)
    assert resumed.step == 2
    calls = counted(resumed)
    resumed.train()
    # Steps 3 and 4 use new rows: each is scored once; the first two steps' rows are not.
    assert calls == [2, 2] and resumed.reference.computed_rows == 4
    _, known = stored(resumed)
    assert set(np.flatnonzero(known)) == used_rows(resumed, range(4))


def test_a_second_epoch_a_second_run_and_another_loss_read_the_rows_back(lazy, prefs, tmp_path):
    small = head_rows(prefs[0], tmp_path / "eight.jsonl", 8)
    trainer = lazy(data=str(small), max_steps=None, epochs=2)
    assert trainer.steps_per_epoch == 4
    calls = counted(trainer)
    trainer.train()
    assert calls == [2, 2, 2, 2] and trainer.reference.computed_rows == 8  # epoch 2: none
    first_values, _ = stored(trainer)
    again = lazy(data=str(small), max_steps=None, epochs=2, loss="ipo", output=str(tmp_path / "b"))
    calls = counted(again)
    again.train()
    assert calls == [] and again.reference.computed_rows == 0
    np.testing.assert_array_equal(again.reference.values["train"], first_values)


def test_a_stale_cache_is_never_read(lazy, prefs, tmp_path):
    base = lazy()
    base.train()
    path = base.reference.path_for("train")
    values, known = stored(base)
    # Poison the stored values: any run that read them would get these.
    mx.save_safetensors(
        str(path),
        {"logps": mx.array(np.full_like(values, 123.0)), "known": mx.array(known.astype(np.uint8))},
    )
    other_model = write_random_llama(tmp_path / "other-model", seed=3)
    retok = write_random_llama(tmp_path / "retok", seed=0)  # same weights, other template
    config = json.loads((retok / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (retok / "tokenizer_config.json").write_text(json.dumps(config))
    fewer = head_rows(prefs[0], tmp_path / "fewer.jsonl", 47)
    changes = {
        "model": {"model": str(other_model)},
        "tokenizer": {"model": str(retok)},
        "truncation": {"max_length": 40},
        "data": {"data": str(fewer)},
    }
    for name, change in changes.items():
        trainer = lazy(output=str(tmp_path / name), **change)
        assert trainer.reference.path_for("train") != path, name
        calls = counted(trainer)
        trainer.train()
        assert sum(calls) == 6, name  # every used row scored anew, none read
        assert not np.any(trainer.reference.values["train"] == 123.0), name
    # The same settings do read the (poisoned) file: it was the one that matched.
    same = lazy(output=str(tmp_path / "same"))
    calls = counted(same)
    batch = same.step_batches(0)[0]
    assert np.all(np.asarray(same.reference.logps(batch, "train")) == 123.0) and calls == []


def test_cache_ref_shows_a_progress_bar_with_an_eta(lazy):
    import io

    import mlx_pref.reference.cache as cache

    stream = io.StringIO()
    stream.isatty = lambda: True
    trainer = lazy()
    trainer.reference.show_progress = True  # the trainer was built quiet
    real = cache.Progress
    cache.Progress = lambda total, **kw: real(total, stream=stream, **kw)
    try:
        trainer.reference.prepare({"train": trainer.train_set})
    finally:
        cache.Progress = real
    text = stream.getvalue()
    assert "scoring reference log-probs for train (48 examples)" in text
    assert "batch 6/6 [" in text and "eta 00:00" in text
    assert trainer.reference.computed_rows == 48

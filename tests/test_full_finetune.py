"""Full fine-tuning: every weight trained, the reference from the starting weights, a model
folder that mlx-lm and transformers load, exact resume, exports."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from _numerics import NUMERICS
from mlx.utils import tree_flatten

from mlx_pref.config import config_from_dict
from mlx_pref.data import collate
from mlx_pref.errors import ConfigError, Interrupted
from mlx_pref.export import ExportError, export_run
from mlx_pref.model_folder import load_folder_weights
from mlx_pref.progress import read_metrics
from mlx_pref.reference import Cached, FrozenCopy, StartingWeights
from mlx_pref.train import Trainer


def weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_folder_weights(folder).items()}


def test_full_fine_tuning_of_the_embedded_default_lifts_accuracy_and_loads_in_mlx_lm(
    tmp_path, monkeypatch
):
    """The embedded model and data, every weight trained: 100 steps at 5e-5 take the
    held-out reward accuracy from 0 (policy = reference, every reward 0) to 0.98."""
    from mlx_lm import load

    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))
    cfg = config_from_dict({
        "fine_tune": "full", "learning_rate": 5e-5, "max_steps": 100, "eval_every": 1000,
        "save_every": 1000, "output": str(tmp_path / "full"),
    })  # fmt: skip
    trainer = Trainer(cfg, verbose=False)
    assert isinstance(trainer.reference, Cached)
    assert isinstance(trainer.reference.scorer, StartingWeights) and trainer.reference.scorer.sealed
    final = trainer.train()
    evals = [r for r in read_metrics(cfg.output) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 100]
    assert evals[0]["eval/rewards/accuracies"] == 0.0
    assert final["eval/rewards/accuracies"] > 0.85
    run = Path(cfg.output)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in run.iterdir()}
    model, tokenizer = load(str(run))
    batch = collate(trainer.eval_set.examples[:4])
    tokens = mx.array(batch.tokens)
    trainer.model.eval()
    assert float(mx.abs(model(tokens) - trainer.model(tokens)).max()) == 0.0


def test_the_output_folder_loads_in_transformers_with_the_same_logits(make_config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = make_config(fine_tune="full", max_steps=2, learning_rate=1e-3)
    trainer = Trainer(cfg, verbose=False)
    trainer.train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(cfg.output, torch_dtype=torch.float32)
    batch = collate(trainer.eval_set.examples[:2])
    trainer.model.eval()
    ours = np.asarray(trainer.model(mx.array(batch.tokens)))
    with torch.no_grad():
        theirs = hf(torch.tensor(batch.tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_every_weight_moves_and_the_marker_lists_the_model_folder(make_config):
    cfg = make_config(fine_tune="full", max_steps=2, eval_every=2)
    trainer = Trainer(cfg, verbose=False)
    before = {k: np.asarray(v) for k, v in tree_flatten(trainer.model.parameters())}
    trainer.train()
    after = weights(Path(cfg.output))
    assert after.keys() == before.keys()
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(moved) == len(before)  # embeddings, norms, attention, MLP: all trained
    marker = json.loads((Path(cfg.output) / ".mlx-pref.json").read_text())
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(marker["files"])
    assert not (Path(cfg.output) / "adapters.safetensors").exists()
    checkpoint = Path(cfg.output) / "checkpoints" / "step-00000002"
    assert (checkpoint / "config.json").is_file()  # a checkpoint is a loadable model folder too


def test_resume_is_exact(make_config, tmp_path):
    straight = make_config(fine_tune="full", max_steps=4, output=str(tmp_path / "straight"))
    Trainer(straight, verbose=False).train()
    cfg = make_config(fine_tune="full", max_steps=4, output=str(tmp_path / "cut"))
    first = Trainer(cfg, verbose=False)
    step = first.train_step

    def stop_after_two(batches):
        result = step(batches)
        if first.step == 2:
            first.request_stop()
        return result

    first.train_step = stop_after_two
    with pytest.raises(Interrupted):
        first.train()
    resumed = Trainer.resume(cfg.output, verbose=False)
    assert resumed.step == 2 and resumed.reference.scorer.sealed
    resumed.train()
    a, b = weights(Path(straight.output)), weights(Path(cfg.output))
    for key in a:  # as exactly as a resume promises on this backend (``_numerics``)
        NUMERICS.assert_repeated(b[key], a[key], full=True, err_msg=key)
    drop = {"tokens_per_sec", "completion_tokens_per_sec", "step_time", "peak_memory_gb"}
    records = [[{k: v for k, v in r.items() if k not in drop} for r in read_metrics(p)]
               for p in (straight.output, cfg.output)]  # fmt: skip
    NUMERICS.assert_repeated_metrics(records[1], records[0], full=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reference": "adapters-off"}, "fine_tune: full has no adapters to switch off"),
        ({"quantization": "4bit"}, "fine_tune: full trains float weights"),
        ({"adapter": "some/adapter"}, "starts from a model, not an adapter"),
        ({"lora": {"dora": True}}, "lora.dora does not apply"),
        ({"loss": "bco", "bco_udm": True}, "bco_udm reads the frozen base"),
    ],
)
def test_what_full_fine_tuning_cannot_do_is_refused_at_config_time(options, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"fine_tune": "full", **options})


def test_a_live_reference_is_a_frozen_copy(make_config, tmp_path):
    kto = Trainer(
        make_config(fine_tune="full", loss="kto", output=str(tmp_path / "k")), verbose=False
    )
    assert isinstance(kto.reference.scorer, FrozenCopy)  # KTO's KL rows need live scoring
    assert "KTO's KL rows" in kto.reference.describe()
    model = Trainer(make_config(fine_tune="full", reference="model", output=str(tmp_path / "m")),
                    verbose=False)  # fmt: skip
    assert isinstance(model.reference, FrozenCopy)
    result = model.train_step(model.step_batches(0))
    margins = result.metrics["rewards/margins"]
    assert result.finite and margins == pytest.approx(0.0, abs=NUMERICS.tolerance(1e-6))


def test_regen_copies_the_student_into_the_frozen_copy(make_config):
    cfg = make_config(fine_tune="full", max_steps=None, epochs=2, batch_size=16, ref_regen_epochs=1,
                      eval_every=100, save_every=100)  # fmt: skip
    trainer = Trainer(cfg, verbose=False)
    trainer.train()
    ref = trainer.reference.weights
    assert ref is not None  # regenerated at the start of epoch 1
    student = dict(tree_flatten(trainer.model.parameters()))
    assert ref.keys() == student.keys()
    assert any(not np.array_equal(np.asarray(ref[k]), np.asarray(student[k])) for k in ref)


def test_exports_copy_the_model_folder_and_peft_is_refused(make_config, tmp_path):
    cfg = make_config(fine_tune="full", max_steps=2)
    Trainer(cfg, verbose=False).train()
    folder = export_run(cfg.output, "fused", tmp_path / "fused")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    np.testing.assert_array_equal(
        weights(folder)["model.embed_tokens.weight"],
        weights(Path(cfg.output))["model.embed_tokens.weight"],
    )
    card = (folder / "README.md").read_text()
    assert "every weight fine-tuned" in card and "full-fine-tuning" in card
    step = Path(cfg.output) / "checkpoints" / "step-00000002"
    assert (export_run(step, "mlx", tmp_path / "from-checkpoint") / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="no adapter to write in PEFT's format"):
        export_run(cfg.output, "peft", tmp_path / "peft")

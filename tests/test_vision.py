"""Vision-language preference data: rows with images, a tiny random Qwen2-VL made in the
test and loaded by mlx-vlm, DPO and KTO steps, the reference cache's key, bad image rows,
parquet image bytes, and ``data check``'s image summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")
pytest.importorskip("PIL")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from _tiny_vlm import png, write_tiny_qwen2_vl  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_pref.config import config_from_dict  # noqa: E402
from mlx_pref.data import collate, load_dataset  # noqa: E402
from mlx_pref.data.check import check_dataset, load_tokenizer  # noqa: E402
from mlx_pref.errors import DataError  # noqa: E402
from mlx_pref.logps import sequence_logps  # noqa: E402
from mlx_pref.models import load_model  # noqa: E402
from mlx_pref.progress import read_metrics  # noqa: E402
from mlx_pref.reference import dataset_fingerprint  # noqa: E402
from mlx_pref.train import Trainer  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 40)}
QUESTION = "What colour is the square?"


def user(text: str, image: bool = True) -> list[dict]:
    parts = [{"type": "image"}] if image else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_images(folder: Path, n: int) -> list[str]:
    """``n`` PNGs in ``folder/images``, two sizes (4 and 6 image tokens), three colours."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        colour = list(COLOURS.values())[i % 3]
        (folder / "images" / f"{i}.png").write_bytes(
            png(colour, size=(56 + 28 * (i % 2), 56), seed=i)
        )
        names.append(f"images/{i}.png")
    return names


def paired_rows(names: list[str]) -> list[dict]:
    colours = list(COLOURS)
    return [
        {
            "images": [name],
            "prompt": user(QUESTION),
            "chosen": assistant(f"The square is {colours[i % 3]}."),
            "rejected": assistant("I cannot see anything."),
        }
        for i, name in enumerate(names)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return write_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def vision_data(tmp_path_factory) -> Path:
    """12 pairs in train.jsonl, 4 in eval.jsonl, 12 unpaired rows in unpaired.jsonl."""
    root = tmp_path_factory.mktemp("vision-data")
    names = write_images(root, 16)
    write_jsonl(root / "train.jsonl", paired_rows(names[:12]))
    write_jsonl(root / "eval.jsonl", paired_rows(names[12:]))
    unpaired = [
        {
            "images": r["images"],
            "prompt": r["prompt"],
            "completion": r[key],
            "label": key == "chosen",
        }
        for r in paired_rows(names[:6])
        for key in ("chosen", "rejected")
    ]
    write_jsonl(root / "unpaired.jsonl", unpaired)
    return root


@pytest.fixture(scope="module")
def loaded_vlm(vlm):
    return load_model(str(vlm))


def run_config(vlm: Path, folder: Path, out: Path, **overrides):
    raw = {
        "model": str(vlm),
        "data": str(folder / "train.jsonl"),
        "eval_data": str(folder / "eval.jsonl"),
        "output": str(out / "run"),
        "ref_cache_dir": str(out / "cache"),
        "batch_size": 2,
        "max_steps": 3,
        "learning_rate": 2e-2,
        "log_every": 1,
        "eval_every": 3,
        "save_every": 3,
        "lora": {"r": 4, "alpha": 8},
        "max_length": 128,
    }
    raw.update(overrides)
    return config_from_dict(raw)


def rows_run_alone(model, tokenizer, batch) -> np.ndarray:
    """Each row's completion log-prob from mlx-vlm's own call on that row alone."""
    out = []
    for r in range(len(batch.lengths)):
        ids, plen = batch.tokens[r, : batch.lengths[r]], int(batch.prompt_lengths[r])
        images = batch.images[r % batch.num_examples]
        if images:
            pixels = tokenizer.pixels(images)
            logits = model(
                mx.array(ids[None]), pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]
            ).logits[0]
        else:  # text only: explicit positions (mlx-vlm keeps the last image call's)
            features = model.get_input_embeddings(mx.array(ids[None]), None)
            logits = model.language_model(
                mx.array(ids[None]),
                inputs_embeds=features.inputs_embeds,
                position_ids=features.position_ids,
            ).logits[0]
        logps = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), -1, True)
        out.append(sum(float(logps[plen - 1 + j, int(t)]) for j, t in enumerate(ids[plen:])))
    return np.array(out)


def test_forward_equals_each_row_run_alone(loaded_vlm, vision_data, tmp_path):
    cfg = run_config(Path("."), vision_data, tmp_path)
    dataset = load_dataset(vision_data / "train.jsonl", loaded_vlm.tokenizer, cfg)
    example = dataset.examples[1]
    image_tokens = example.prompt.count(loaded_vlm.tokenizer.image_token_id)
    assert image_tokens == 6 and example.images[0].width == 84  # 84 x 56 px: 6 tokens
    batch = collate(dataset.examples[:3], [0, 1, 2])
    alone = rows_run_alone(loaded_vlm.model, loaded_vlm.tokenizer, batch)
    for share in (True, False):
        ours = sequence_logps(loaded_vlm.model, batch, share_prompt=share).sums
        np.testing.assert_allclose(np.asarray(ours), alone, atol=2e-5)
    # The picture is part of what is scored: another one (of the same size), other values.
    batch.images = [batch.images[2], *batch.images[1:]]
    swapped = np.asarray(sequence_logps(loaded_vlm.model, batch).sums)
    changed = np.abs(swapped - alone) > 1e-4
    assert changed.tolist() == [True, False, False, True, False, False]


def test_qwen2_5_vl_scores_as_mlx_vlm_does(vision_data, tmp_path):
    loaded = load_model(str(write_tiny_qwen2_vl(tmp_path / "model", model_type="qwen2_5_vl")))
    cfg = run_config(Path("."), vision_data, tmp_path)
    dataset = load_dataset(vision_data / "train.jsonl", loaded.tokenizer, cfg)
    batch = collate(dataset.examples[:2], [0, 1])
    ours = np.asarray(sequence_logps(loaded.model, batch).sums)
    np.testing.assert_allclose(
        ours, rows_run_alone(loaded.model, loaded.tokenizer, batch), atol=2e-5
    )


def test_rows_without_images_share_a_batch_with_rows_with_them(loaded_vlm, vision_data, tmp_path):
    data = tmp_path / "data"
    rows = paired_rows(write_images(data, 4))
    rows[1].pop("images")
    rows[1]["prompt"] = [{"role": "user", "content": QUESTION}]
    rows[3]["images"] = []
    path = write_jsonl(data / "train.jsonl", rows)
    cfg = run_config(Path("."), vision_data, tmp_path)
    dataset = load_dataset(path, loaded_vlm.tokenizer, cfg)
    assert [len(e.images) for e in dataset.examples] == [1, 0, 1, 0]
    batch = collate(dataset.examples, range(4))
    alone = rows_run_alone(loaded_vlm.model, loaded_vlm.tokenizer, batch)
    ours = sequence_logps(loaded_vlm.model, batch, with_p2=True)
    np.testing.assert_allclose(np.asarray(ours.sums), alone, atol=2e-5)
    assert ours.token_log_sum_p2.shape == ours.token_logps.shape  # WPO's input too


def test_dpo_trains_three_steps_on_images(vlm, vision_data, tmp_path):
    import mlx_vlm

    cfg = run_config(vlm, vision_data, tmp_path)
    trainer = Trainer(cfg, verbose=False)
    trainable = [k for k, _ in tree_flatten(trainer.model.trainable_parameters())]
    assert trainable and all(k.startswith("language_model.model.layers.") for k in trainable)
    trainer.train()
    records = read_metrics(cfg.output)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)  # adapters start at zero
    evals = [r for r in records if "eval/loss" in r]
    assert len(losses) == 3 and [r["step"] for r in evals] == [0, 3]
    assert evals[0]["eval/loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.05
    keys = json.loads((Path(cfg.output) / "adapter_config.json").read_text())
    assert keys["lora_parameters"]["keys"][0] == "language_model.model.layers.0.self_attn.k_proj"
    # mlx-vlm loads the adapter and scores the rows as the trainer does.
    model, _ = mlx_vlm.load(str(vlm), adapter_path=cfg.output)
    batch = collate(trainer.eval_set.examples[:2], [0, 1])
    ours = np.asarray(sequence_logps(trainer.model, batch).sums)
    theirs = rows_run_alone(model, trainer.tokenizer, batch)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_kto_trains_three_steps_on_unpaired_rows(vlm, vision_data, tmp_path):
    cfg = run_config(
        vlm,
        vision_data,
        tmp_path,
        loss="kto",
        data=str(vision_data / "unpaired.jsonl"),
        eval_data=None,
        batch_size=4,
    )
    trainer = Trainer(cfg, verbose=False)
    assert not trainer.train_set.paired and trainer.train_set.examples[0].images
    trainer.train()
    records = [r for r in read_metrics(cfg.output) if "loss" in r]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]


def test_changing_one_image_changes_the_reference_key(loaded_vlm, vision_data, tmp_path):
    cfg = run_config(Path("."), vision_data, tmp_path)
    data = tmp_path / "data"
    names = write_images(data, 4)
    write_jsonl(data / "train.jsonl", paired_rows(names))
    before = load_dataset(data / "train.jsonl", loaded_vlm.tokenizer, cfg)
    again = load_dataset(data / "train.jsonl", loaded_vlm.tokenizer, cfg)
    # The same size and colour, other noise: the tokens stay, the bytes change.
    (data / names[2]).write_bytes(png(COLOURS["red"], size=(56, 56), seed=99))
    after = load_dataset(data / "train.jsonl", loaded_vlm.tokenizer, cfg)
    assert [e.prompt for e in after.examples] == [e.prompt for e in before.examples]
    assert dataset_fingerprint(before.examples) == dataset_fingerprint(again.examples)
    assert dataset_fingerprint(before.examples) != dataset_fingerprint(after.examples)


@pytest.mark.parametrize(
    ("image", "reason", "message"),
    [
        ("images/missing.png", "missing image", "field 'images' item 1: file not found: "),
        ("notes.txt", "bad image", "field 'images' item 1: not an image (cannot identify"),
        ("https://example.com/a.png", "image URL", "is a URL; mlx-pref does not fetch images"),
    ],
)
def test_bad_image_rows_name_file_line_and_field(
    loaded_vlm, vision_data, tmp_path, image, reason, message
):
    data = tmp_path / "data"
    names = write_images(data, 4)
    (data / "notes.txt").write_text("not a picture")
    rows = paired_rows(names)
    rows[2]["images"] = [image]
    path = write_jsonl(data / "train.jsonl", rows)
    cfg = run_config(Path("."), vision_data, tmp_path)
    dataset = load_dataset(path, loaded_vlm.tokenizer, cfg, warn=False)
    assert len(dataset) == 3 and dataset.report.reasons == {reason: 1}
    (shown,) = dataset.report.examples[reason]
    assert shown.startswith(f"{path}:3: ") and message in shown and "\n" not in shown
    with pytest.raises(DataError, match=rf"^{path}:3: field 'images'.*\[strict"):
        load_dataset(
            path, loaded_vlm.tokenizer, run_config(Path("."), vision_data, tmp_path, strict=True)
        )


def test_placeholders_follow_trls_vision_format(loaded_vlm, vision_data, tmp_path):
    data = tmp_path / "data"
    names = write_images(data, 3)
    cfg = run_config(Path("."), vision_data, tmp_path)
    token = loaded_vlm.tokenizer.image_token_id
    # Plain strings: one user message, the image in front of its text.
    plain = {"images": [names[0]], "prompt": QUESTION, "chosen": "Red.", "rejected": "Blue."}
    path = write_jsonl(data / "plain.jsonl", [plain])
    (example,) = load_dataset(path, loaded_vlm.tokenizer, cfg).examples
    text = loaded_vlm.tokenizer.decode(list(example.prompt))
    assert "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>" + QUESTION in text
    two = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]
    rows = [
        {  # the shape of HF datasets: a single 'image', parts with null text
            "image": names[2],
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "image", "text": None}, {"type": "text", "text": "?"}],
                }
            ],
            "chosen": assistant("Green."),
            "rejected": assistant("Blue."),
        },
        {  # two placeholders for one image: the row cannot be read
            "images": [names[1]],
            "prompt": [{"role": "user", "content": two}],
            "chosen": assistant("Red."),
            "rejected": assistant("Blue."),
        },
        {  # an image in a completion
            "images": [names[1]],
            "prompt": user("?"),
            "chosen": [{"role": "assistant", "content": two[1:]}],
            "rejected": assistant("Blue."),
        },
    ]
    path = write_jsonl(data / "train.jsonl", rows + [rows[0]])
    dataset = load_dataset(path, loaded_vlm.tokenizer, cfg, warn=False)
    assert [e.source for e in dataset.examples] == [f"{path}:1", f"{path}:4"]
    assert [e.prompt.count(token) for e in dataset.examples] == [4, 4]
    assert dataset.report.examples["images"] == [
        f"{path}:2: field 'prompt' shows 2 image(s) but field 'images' holds 1",
        f"{path}:3: field 'chosen' shows an image; images belong to the prompt",
    ]


def test_parquet_image_bytes_and_data_check(loaded_vlm, vlm, vision_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = paired_rows(["x"] * 6)
    for i, row in enumerate(rows):  # as `datasets` writes an Image column: bytes and a name
        row["images"] = [{"bytes": png(COLOURS["blue"], size=(56 + 28 * (i % 2), 56), seed=i),
                          "path": f"{i}.png"}]  # fmt: skip
        row["prompt"][0]["content"][0]["text"] = None
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = run_config(Path("."), vision_data, tmp_path)
    result = check_dataset(path, load_tokenizer(str(vlm)), cfg)
    assert len(result.dataset) == 6
    text = result.format()
    assert "images: 6 in 6 of 6 rows" in text
    assert "width (px)      min / median / max  56 / 70 / 84" in text
    assert "image tokens    min / mean / max    4 / 5.0 / 6" in text


def test_images_need_a_vision_model(tiny_model, vision_data, tmp_path):
    from mlx_pref.data.check import load_tokenizer as text_tokenizer

    cfg = run_config(Path("."), vision_data, tmp_path)
    with pytest.raises(DataError, match=r"train.jsonl:1: the row has images but .* is a text-only"):
        load_dataset(vision_data / "train.jsonl", text_tokenizer(str(tiny_model)), cfg)


def test_image_tokens_are_never_cut(loaded_vlm, vision_data, tmp_path):
    # Prompts are 36 tokens with a 56 x 56 image (4 image tokens), 38 with an 84 x 56 one.
    cfg = run_config(Path("."), vision_data, tmp_path, max_length=37, max_prompt_length=10)
    dataset = load_dataset(vision_data / "train.jsonl", loaded_vlm.tokenizer, cfg, warn=False)
    token = loaded_vlm.tokenizer.image_token_id
    assert len(dataset) == 6 and dataset.report.reasons == {"no room for completion": 6}
    assert all(len(e.prompt) == 36 and e.prompt.count(token) == 4 for e in dataset.examples)
    assert all(len(e.chosen) == 1 for e in dataset.examples)  # the completions are cut instead
    assert (
        "its images' tokens included, which are never cut"
        in (dataset.report.examples["no room for completion"][0])
    )

"""Parquet, Arrow and CSV data in the shapes of the Hub's preference datasets: read,
mapped, split, fetched from an offline Hub cache (parquet conversion too), trained on."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mlx_pref.data import load_dataset
from mlx_pref.data.check import check_dataset, load_tokenizer
from mlx_pref.data.columns import wanted_columns
from mlx_pref.data.formats import read_records
from mlx_pref.data.report import Report
from mlx_pref.data.sources import DataFile, read_rows, resolve_files
from mlx_pref.errors import ConfigError, DataError
from mlx_pref.train import Trainer

QUESTIONS = ["What color is the sky?", "Where is the sun?", "Name a fruit.", "Two plus two?"]
GOOD = ["Blue.", "In the sky.", "An apple.", "Four."]
BAD = ["Green.", "In the sea.", "A rock.", "Five."]


def msg(role: str, content: str) -> dict:
    return {"content": content, "role": role}  # the Hub's struct field order


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def rows_of(n: int, make) -> list[dict]:
    return [make(i % 4, i) for i in range(n)]


def ultrafeedback_trl(i: int, k: int) -> dict:
    """trl-lib/ultrafeedback_binarized: whole conversations, no prompt column."""
    q = [msg("user", f"{QUESTIONS[i]} ({k})")]
    return {
        "chosen": [*q, msg("assistant", GOOD[i])],
        "rejected": [*q, msg("assistant", BAD[i])],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def ultrafeedback_h4(i: int, k: int) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized: a string prompt beside whole conversations."""
    row = ultrafeedback_trl(i, k)
    return {
        "prompt": f"{QUESTIONS[i]} ({k})",
        "prompt_id": f"id{k}",
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        "messages": row["chosen"],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def argilla_orca(i: int, k: int) -> dict:
    """argilla/distilabel-intel-orca-dpo-pairs: the prompt in 'input', a 'system' column."""
    return {
        "system": "You are a helpful assistant." if k % 2 else "",
        "input": f"{QUESTIONS[i]} ({k})",
        "chosen": GOOD[i],
        "rejected": BAD[i],
        "generations": [GOOD[i], BAD[i]],
        "order": ["chosen", "rejected"],
        "labelling_model": "gpt-4",
        "labelling_prompt": [msg("user", "rate these")],
        "raw_labelling_response": "8 3",
        "rating": [8.0, 3.0],
        "rationale": "better",
        "status": "unchanged",
        "original_chosen": GOOD[i],
        "original_rejected": BAD[i],
        "chosen_score": 8.0,
        "in_gsm8k_train": False,
    }


def intel_orca(i: int, k: int) -> dict:
    """Intel/orca_dpo_pairs: system, question, chosen, rejected strings."""
    return {
        "system": "",
        "question": f"{QUESTIONS[i]} ({k})",
        "chosen": GOOD[i],
        "rejected": BAD[i],
    }


def kto_mix(i: int, k: int) -> dict:
    """trl-lib/kto-mix-14k: unpaired conversational rows with a boolean label."""
    good = k % 2 == 0
    return {
        "prompt": [msg("user", f"{QUESTIONS[i]} ({k})")],
        "completion": [msg("assistant", GOOD[i] if good else BAD[i])],
        "label": good,
    }


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def load(spec, tok, **cfg):
    from mlx_pref.config import Config

    return load_dataset(str(spec), tok, Config(**cfg).validate(), warn=False)


def train_two_steps(make_config, data, **overrides) -> Trainer:
    settings = {"eval_data": None, "max_steps": 2, "batch_size": 2, "eval_every": 100}
    config = make_config(data=str(data), **{**settings, **overrides})
    trainer = Trainer(config, verbose=False)
    final = trainer.train()
    assert trainer.step == 2 and math.isfinite(final["loss"]) and math.isfinite(final["grad_norm"])
    return trainer


# ------------------------------------------------------------------ shapes, trained


def test_whole_conversations_read_as_implicit_chat_and_train(tmp_path, tok, make_config):
    path = write_parquet(tmp_path / "uf.parquet", rows_of(8, ultrafeedback_trl))
    ds = load(path, tok)
    assert ds.format == "conversational" and len(ds) == 8
    first = ds.examples[0]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What color is the sky? (0)"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert first.prompt == tuple(tok.encode(prompt, add_special_tokens=False))
    assert first.chosen == tuple(tok.encode("Blue.<|im_end|>\n", add_special_tokens=False))
    assert first.source == f"{path}:1"
    train_two_steps(make_config, path)


def test_conversational_splits_train_prefs_and_test_prefs(tmp_path, tok, make_config):
    root = tmp_path / "h4"
    for split, n in (("train_prefs", 8), ("test_prefs", 4), ("train_sft", 6)):
        write_parquet(
            root / "data" / f"{split}-00000-of-00001.parquet", rows_of(n, ultrafeedback_h4)
        )
    assert len(load(f"{root}:train_prefs", tok)) == 8
    assert len(load(f"{root}:test_prefs", tok)) == 4
    with pytest.raises(
        DataError,
        match=r"h4: no 'train' split; its splits are test_prefs, train_prefs, train_sft: name "
        r"one, e.g. .*h4:train_prefs",
    ):
        load(root, tok)
    with pytest.raises(DataError, match=r"no split 'train'; its splits are test_prefs, train_pre"):
        load(f"{root}:train", tok)
    trainer = train_two_steps(make_config, f"{root}:train_prefs", eval_data=f"{root}:test_prefs")
    assert len(trainer.eval_set) == 4


def test_renamed_columns_and_system_column_are_read_as_chat(tmp_path, tok, make_config):
    path = write_parquet(tmp_path / "argilla.parquet", rows_of(8, argilla_orca))
    result = check_dataset(str(path), tok, make_config(data=str(path)))
    (summary,) = result.dataset.report.files
    assert summary.format == "paired" and summary.columns == {"prompt": "input", "system": "system"}
    assert "columns: prompt <- input, system <- system" in result.format()
    with_system, without = result.dataset.examples[1], result.dataset.examples[0]
    rendered = tok.apply_chat_template(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Where is the sun? (1)"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert with_system.prompt == tuple(tok.encode(rendered, add_special_tokens=False))
    plain = tok.apply_chat_template(
        [{"role": "user", "content": "What color is the sky? (0)"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert without.prompt == tuple(tok.encode(plain, add_special_tokens=False))
    assert with_system.chosen == tuple(
        tok.encode("In the sky.<|im_end|>\n", add_special_tokens=False)
    )
    train_two_steps(make_config, path)


def test_question_column_is_the_prompt_not_an_implicit_prefix(tmp_path, tok, make_config):
    path = write_parquet(tmp_path / "intel.parquet", rows_of(8, intel_orca))
    ds = load(path, tok)
    assert ds.format == "paired" and ds.report.files[0].columns["prompt"] == "question"
    assert "What color is the sky? (0)" in tok.decode(list(ds.examples[0].prompt))
    train_two_steps(make_config, path)


def test_explicit_column_mapping_and_system_prompt(tmp_path, tok, make_config):
    rows = [
        {"q": QUESTIONS[i], "good": GOOD[i], "bad": BAD[i], "prompt": "ignored"} for i in range(4)
    ]
    path = write_parquet(tmp_path / "mapped.parquet", rows * 2)
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    ds = load(path, tok, columns=columns, system_prompt="Be brief.")
    assert ds.report.files[0].columns == columns
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert ds.examples[0].prompt == tuple(tok.encode(rendered, add_special_tokens=False))
    train_two_steps(make_config, path, columns=columns, system_prompt="Be brief.")
    with pytest.raises(
        DataError, match=r"mapped\.parquet:1: missing column 'question' \(read as 'prompt'\)"
    ):
        load(path, tok, columns={**columns, "prompt": "question"}, strict=True)


def test_unpaired_kto_rows_train_with_kto(tmp_path, tok, make_config):
    path = write_parquet(tmp_path / "kto.parquet", rows_of(8, kto_mix))
    ds = load(path, tok)
    assert ds.format == "unpaired" and [e.label for e in ds.examples[:4]] == [True, False] * 2
    train_two_steps(make_config, path, loss="kto")


def test_csv_with_multiline_cells_and_label_words(tmp_path, tok, make_config):
    paired = tmp_path / "pairs.csv"
    table = pa.table(
        {
            "question": [f"{QUESTIONS[i % 4]}\nThink first. ({i})" for i in range(8)],
            "chosen": [GOOD[i % 4] for i in range(8)],
            "rejected": [BAD[i % 4] for i in range(8)],
        }
    )
    pacsv.write_csv(table, paired)
    ds = load(paired, tok)
    assert ds.format == "paired" and len(ds) == 8
    assert tok.decode(list(ds.examples[0].prompt)) == "What color is the sky?\nThink first. (0)"
    assert ds.examples[7].source == f"{paired}:8"  # rows are numbered from 1, header not counted
    train_two_steps(make_config, paired)
    unpaired = tmp_path / "rows.tsv"
    unpaired.write_text(
        "instruction\toutput\tlabel\n"
        + "".join(
            f"{QUESTIONS[i % 4]}\t{GOOD[i % 4]}\t{['yes', 'False', '1', 'no'][i % 4]}\n"
            for i in range(8)
        )
        + "Q\tA\tmaybe\n"
    )
    ds = load(unpaired, tok)
    assert [e.label for e in ds.examples[:4]] == [True, False, True, False]
    assert ds.report.examples["wrong type"] == [
        f"{unpaired}:9: field 'label' must be true or false (or 1/0, yes/no), got a string ('maybe')"
    ]


def test_arrow_stream_and_file(tmp_path, tok):
    table = pa.Table.from_pylist(rows_of(6, intel_orca))
    stream = tmp_path / "data-00000-of-00001.arrow"  # what datasets' save_to_disk writes
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table, max_chunksize=4)
    feather = tmp_path / "pairs.feather"
    with pa.ipc.new_file(feather, table.schema) as writer:
        writer.write_table(table, max_chunksize=4)
    for path in (stream, feather):
        ds = load(path, tok)
        assert len(ds) == 6 and ds.examples[5].source == f"{path}:6"


# ------------------------------------------------------------------ streaming, damage


def test_rows_stream_one_batch_at_a_time_and_a_damaged_row_group_is_one_line(tmp_path, monkeypatch):
    import mlx_pref.data.tabular as tabular

    monkeypatch.setattr(tabular, "BATCH_ROWS", 4)
    path = write_parquet(tmp_path / "big.parquet", rows_of(40, argilla_orca), row_group_size=20)
    rows = read_rows(DataFile(path, "big.parquet"), lambda names: ["input", "chosen"])
    first = next(rows)
    assert first.line == 1 and first.value == {
        "input": "What color is the sky? (0)",
        "chosen": "Blue.",
    }
    # Damage the second row group's pages: the first 20 rows still arrive, then one error.
    meta = pq.ParquetFile(path).metadata.row_group(1)
    start = min(meta.column(c).data_page_offset for c in range(meta.num_columns))
    data = bytearray(path.read_bytes())
    data[start : start + 400] = b"\x00" * 400
    path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(DataError) as err:
        for row in read_rows(DataFile(path, "big.parquet")):
            seen.append(row.line)
    assert seen == list(range(1, 21))
    message = str(err.value)
    assert message.startswith("big.parquet: damaged parquet file, unreadable after row 20 (")
    assert "\n" not in message


def test_corrupt_parquet_is_one_line_naming_the_file(tmp_path, tok):
    path = write_parquet(tmp_path / "c.parquet", rows_of(8, intel_orca))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        load(path, tok)
    assert str(err.value) == (
        f"{path}: not a readable parquet file (Parquet magic bytes not found in footer. Either "
        "the file is corrupted or this is not a parquet file.)"
    )


def test_wide_files_convert_only_the_columns_fields_come_from(tmp_path):
    names = list(argilla_orca(0, 0))
    assert wanted_columns(names, {}) == ["system", "input", "chosen", "rejected"]
    assert wanted_columns(
        ["q", "a", "b", "x"], {"prompt": "q", "chosen": "a", "rejected": "b"}
    ) == [
        "q",
        "a",
        "b",
    ]
    # No recognisable row among them: every column is read, so that messages name them all.
    assert wanted_columns(["question", "chosen_response", "rejected_response"], {}) is None
    path = write_parquet(tmp_path / "wide.parquet", rows_of(4, argilla_orca))
    (record, *_) = read_records(DataFile(path, "wide.parquet"), "auto", Report())
    assert (record.prompt, record.chosen, record.system) == (
        "What color is the sky? (0)",
        "Blue.",
        "",
    )


def test_columns_option_is_checked_when_the_config_is_built(make_config):
    with pytest.raises(
        ConfigError, match=r"columns: unknown field 'promt'; did you mean 'prompt'\?"
    ):
        make_config(columns={"promt": "question"})
    with pytest.raises(ConfigError, match="columns: 'q' is given for both prompt and system"):
        make_config(columns={"prompt": "q", "system": "q"})


# ------------------------------------------------------------------------- the Hub


def fake_repo(hub: Path, repo: str, files: dict[str, list[dict]], revision: str = "main") -> Path:
    """A dataset repository in an offline Hub cache, holding parquet files at ``revision``."""
    folder = hub / f"datasets--{repo.replace('/', '--')}"
    commit = f"{abs(hash((repo, revision))):040x}"[:40]
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    for name, rows in files.items():
        if name.endswith(".parquet"):
            write_parquet(snapshot / name, rows)
        else:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_text("not data")
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_parquet_repo_with_named_splits(hub, tok):
    fake_repo(
        hub,
        "HuggingFaceH4/ultrafeedback_binarized",
        {
            f"data/{split}-00000-of-00001.parquet": rows_of(n, ultrafeedback_h4)
            for split, n in (("train_prefs", 6), ("test_prefs", 3), ("train_gen", 5))
        },
    )
    spec = "HuggingFaceH4/ultrafeedback_binarized"
    (f,) = resolve_files(f"{spec}:train_prefs")
    assert f.name == f"hf://{spec}/data/train_prefs-00000-of-00001.parquet"
    assert len(load(f"hf://{spec}:test_prefs", tok)) == 3
    with pytest.raises(
        DataError, match=r"no 'train' split; its splits are test_prefs, train_gen, "
    ):
        resolve_files(spec)


def test_hub_falls_back_to_the_parquet_conversion(hub, tok):
    fake_repo(hub, "Intel/orca_dpo_pairs", {"README.md": [], "orca.tar.gz": []})
    fake_repo(
        hub,
        "Intel/orca_dpo_pairs",
        {
            "default/train/0000.parquet": rows_of(6, intel_orca),
            "default/partial-validation/0000.parquet": rows_of(2, intel_orca),
        },
        revision="refs/convert/parquet",
    )
    ds = load("Intel/orca_dpo_pairs", tok)
    assert len(ds) == 6
    assert ds.report.files[0].name == (
        "hf://Intel/orca_dpo_pairs@refs/convert/parquet/default/train/0000.parquet"
    )
    assert len(load("hf://Intel/orca_dpo_pairs:validation", tok)) == 2
    with pytest.raises(
        DataError, match=r"parquet conversion has no split 'test', only train, valid"
    ):
        resolve_files("Intel/orca_dpo_pairs:test")


def test_online_the_file_list_is_read_first_and_only_the_split_is_fetched(tmp_path, monkeypatch):
    import mlx_pref.data.hub as hub

    root = tmp_path / "snapshot"
    main = [
        "README.md",
        *(f"data/{s}-00000-of-00001.parquet" for s in ("train_prefs", "test_prefs")),
    ]
    converted = [
        "default/train/0000.parquet",
        "default/test/0000.parquet",
        "default/test/0001.parquet",
    ]
    for name in main[1:] + converted:
        write_parquet(root / name, rows_of(2, intel_orca))
    listing = {"org/parquet": main, "org/script": ["README.md", "loader.py", "data.tar.gz"]}
    fetched = []
    monkeypatch.setattr(
        hub, "list_files", lambda repo, revision=None: converted if revision else listing[repo]
    )
    monkeypatch.setattr(
        hub,
        "download_dataset",
        lambda repo, patterns, revision=None: fetched.append((patterns, revision)) or root,
    )
    (f,) = resolve_files("org/parquet:test_prefs")
    assert fetched == [(["data/test_prefs-00000-of-00001.parquet"], None)]
    assert f.path == root / "data/test_prefs-00000-of-00001.parquet"
    fetched.clear()
    files = resolve_files("hf://org/script:test")
    assert fetched == [(["default/test/0000.parquet", "default/test/0001.parquet"], hub.CONVERTED)]
    assert [f.name for f in files] == [
        "hf://org/script@refs/convert/parquet/default/test/0000.parquet",
        "hf://org/script@refs/convert/parquet/default/test/0001.parquet",
    ]


def test_cli_data_check_shows_the_columns_it_used(tmp_path):
    from click.testing import CliRunner

    from mlx_pref.cli import cli

    rows = [{"q": QUESTIONS[i], "good": GOOD[i], "bad": BAD[i]} for i in range(4)]
    path = write_parquet(tmp_path / "mapped.parquet", rows)
    args = ["data", "check", str(path), "--column", "prompt=q", "--column", "chosen=good"]
    result = CliRunner().invoke(cli, [*args, "--column", "rejected=bad", "--system-prompt", "Hi."])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == f"  {path}: 4 rows, format paired (detected from line 1)"
    assert lines[2] == "    columns: prompt <- q, chosen <- good, rejected <- bad"
    assert lines[3] == "system prompt (rows without one): 'Hi.'"
    assert "kept: 4 pairs" in result.output
    bad = CliRunner().invoke(cli, ["data", "check", str(path), "--column", "prompt"])
    assert bad.exit_code != 0 and "--column takes FIELD=COLUMN" in bad.output


def test_without_a_network_the_cache_answers(monkeypatch):
    from unittest import mock

    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import RepositoryNotFoundError

    import mlx_pref.data.hub as hub

    class ConnectError(Exception):  # httpx's, which is not an OSError
        pass

    def refuse(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    assert hub.list_files("org/name") is None

    def missing(*args, **kwargs):
        raise RepositoryNotFoundError("404 Client Error", response=mock.Mock())

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", missing)
    with pytest.raises(DataError, match="dataset 'org/name' not found on the Hugging Face Hub"):
        hub.list_files("org/name")

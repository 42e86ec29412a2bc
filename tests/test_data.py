"""The data pipeline: sources, formats, tokenization and truncation, bad input, summaries."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_pref.config import Config
from mlx_pref.data import (
    Dataset,
    Truncation,
    UnpairedExample,
    extract_prompt,
    iterate_batches,
    load_dataset,
    load_datasets,
    truncate,
)
from mlx_pref.data.check import check_dataset, load_tokenizer
from mlx_pref.data.formats import read_records
from mlx_pref.data.report import Report
from mlx_pref.data.sources import (
    DataFile,
    HubSpec,
    parse_hub_spec,
    resolve_files,
    select_split,
)
from mlx_pref.errors import ConfigError, DataError
from mlx_pref.models import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.exists(), reason="hh-rlhf test split not present")


# ------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def make_tokenizer(tmp_path: Path, **changes):
    """A copy of the embedded tokenizer with ``tokenizer_config.json`` keys changed
    (a value of None removes the key; ``chat_template=None`` removes the template)."""
    src = resolve_model_path(None)
    dst = tmp_path / "tok"
    dst.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    if (src / "chat_template.jinja").exists() and changes.get("chat_template", "") is not None:
        shutil.copy(src / "chat_template.jinja", dst / "chat_template.jinja")
    config = json.loads((dst / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    special = dst / "special_tokens_map.json"
    if special.exists() and "bos_token" in changes:
        tokens = json.loads(special.read_text())
        tokens["bos_token"] = changes["bos_token"]
        special.write_text(json.dumps(tokens))
    return load_tokenizer(str(dst))


def cfg(**kw) -> Config:
    return Config(**kw).validate()


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(spec, tokenizer, **kw) -> Dataset:
    """load_dataset, asserting that no file under ``spec`` changed (even on errors)."""
    root = Path(spec)
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    before = {p: p.read_bytes() for p in files if p.exists()}
    try:
        return load_dataset(spec, tokenizer, cfg(**kw), warn=False)
    finally:
        assert {p: p.read_bytes() for p in before} == before


def ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


PAIRS = [
    {"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Green."},
    {"prompt": "Where is the sun?", "chosen": " In the sky.", "rejected": " In the sea."},
    {"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A rock."},
    {"prompt": "Two plus two?", "chosen": " Four.", "rejected": " Five."},
]


# ------------------------------------------------------------------------ formats


def test_paired_strings_tokenize_with_eos_and_no_bos(tmp_path, tok):
    ds = load(write_jsonl(tmp_path / "p.jsonl", PAIRS), tok)
    assert ds.paired and ds.format == "paired" and len(ds) == 4
    eos = tok.eos_token_id
    first = ds.examples[0]
    assert first.prompt == ids(tok, "What color is the sky?")  # no BOS: the tokenizer has none
    assert first.chosen == (*ids(tok, " Blue."), eos)
    assert first.rejected == (*ids(tok, " Green."), eos)
    assert first.source == f"{tmp_path / 'p.jsonl'}:1"
    assert ds.report.rows == 4 and ds.report.kept == 4 and ds.report.dropped == 0


def test_plain_completion_already_ending_in_eos_gets_no_second(tmp_path, tok):
    rows = [{**PAIRS[0], "chosen": " Blue.<|im_end|>"}, *PAIRS[1:]]
    ds = load(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    assert ds.examples[0].chosen == (*ids(tok, " Blue."), tok.eos_token_id)


def test_implicit_prompt_is_cut_at_the_last_shared_assistant_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it raining?\n\nAssistant: Yes, it is."
    rejected = (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it raining?\n\nAssistant: Yes, go away."
    )
    prompt, c, r = extract_prompt(chosen, rejected)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it raining?\n\nAssistant:"
    assert (c, r) == (" Yes, it is.", " Yes, go away.")


def test_implicit_prompt_without_turn_markers_follows_trl_character_rule():
    assert extract_prompt("The sky is blue", "The sky is green") == (
        "The sky is",
        " blue",
        " green",
    )
    assert extract_prompt("abc", "abd") == ("ab", "c", "d")


def test_implicit_file_is_detected_and_extracted(tmp_path, tok):
    rows = [
        {
            "chosen": f"\n\nHuman: Q{i}?\n\nAssistant: Sure thing {i}",
            "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: Sure no",
        }
        for i in range(3)
    ]
    ds = load(write_jsonl(tmp_path / "i.jsonl", rows), tok)
    assert ds.format == "implicit"
    assert ds.examples[1].prompt == ids(tok, "\n\nHuman: Q1?\n\nAssistant:")
    assert ds.examples[1].chosen == (*ids(tok, " Sure thing 1"), tok.eos_token_id)


def chat(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_conversational_explicit_uses_the_chat_template_without_a_second_eos(tmp_path, tok):
    rows = [
        {
            "prompt": [chat("user", "What color is the sky?")],
            "chosen": [chat("assistant", "Blue.")],
            "rejected": [chat("assistant", "Green.")],
        }
    ] * 2
    ds = load(write_jsonl(tmp_path / "c.jsonl", rows), tok)
    assert ds.format == "conversational"
    e = ds.examples[0]
    assert e.prompt == ids(
        tok, "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert e.chosen == ids(tok, "Blue.<|im_end|>\n")  # the template's turn end is the EOS
    assert e.chosen.count(tok.eos_token_id) == 1
    assert e.rejected == ids(tok, "Green.<|im_end|>\n")


def test_conversational_implicit_prompt_is_the_shared_leading_messages(tmp_path, tok):
    q = [chat("user", "Hi"), chat("assistant", "Hello!"), chat("user", "Rain?")]
    row = {"chosen": [*q, chat("assistant", "Yes.")], "rejected": [*q, chat("assistant", "No.")]}
    ds = load(write_jsonl(tmp_path / "c.jsonl", [row, row]), tok)
    expected = tok.apply_chat_template(q, add_generation_prompt=True, tokenize=False)
    assert ds.examples[0].prompt == ids(tok, expected)
    assert ds.examples[0].chosen == ids(tok, "Yes.<|im_end|>\n")
    # a string prompt beside full message lists is ignored, as TRL does
    ds = load(write_jsonl(tmp_path / "d.jsonl", [{**row, "prompt": "Rain?"}] * 2), tok)
    assert ds.examples[0].prompt == ids(tok, expected)


def test_conversational_prompt_ending_with_assistant_is_continued(tmp_path, tok):
    row = {
        "prompt": [chat("user", "Count."), chat("assistant", "One,")],
        "chosen": [chat("assistant", " two")],
        "rejected": [chat("assistant", " ten")],
    }
    ds = load(write_jsonl(tmp_path / "c.jsonl", [row]), tok)
    assert ds.examples[0].prompt == ids(
        tok, "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\nOne,"
    )


def test_unpaired_strings_and_messages(tmp_path, tok):
    rows = [
        {"prompt": "Hi", "completion": " there", "label": True},
        {"prompt": "Hi", "completion": " go away", "label": False},
        {"prompt": "Yo", "completion": " hey", "label": 1},
    ]
    ds = load(write_jsonl(tmp_path / "u.jsonl", rows), tok)
    assert not ds.paired and ds.format == "unpaired"
    assert [e.label for e in ds.examples] == [True, False, True]
    assert isinstance(ds.examples[0], UnpairedExample)
    assert ds.examples[1].completion == (*ids(tok, " go away"), tok.eos_token_id)
    batch = next(iterate_batches(ds.examples, 3, seed=0, epoch=0))
    assert not batch.paired and sorted(batch.labels.tolist()) == [False, True, True]
    rows = [
        {"prompt": [chat("user", "Hi")], "completion": [chat("assistant", "Hey")], "label": True}
    ]
    ds = load(write_jsonl(tmp_path / "uc.jsonl", rows), tok)
    assert ds.examples[0].completion == ids(tok, "Hey<|im_end|>\n")


def test_format_override(tmp_path, tok):
    rows = [{"prompt": "ignored", "chosen": "Q: x A: yes", "rejected": "Q: x A: no"}] * 2
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load(path, tok).examples[0].prompt == ids(tok, "ignored")
    forced = load(path, tok, format="implicit")
    assert forced.format == "implicit" and forced.examples[0].prompt == ids(tok, "Q: x A:")
    with pytest.raises(
        DataError, match=r"p\.jsonl: 2 of 2 rows are unusable.*missing field 'completion'"
    ):
        load(path, tok, format="unpaired")


def test_bos_is_prepended_once(tmp_path):
    tok = make_tokenizer(tmp_path, bos_token="<|endoftext|>")
    bos = tok.bos_token_id
    rows = [
        {"prompt": "Hi", "chosen": " a", "rejected": " b"},
        {"prompt": "<|endoftext|>Hi", "chosen": " a", "rejected": " b"},
        {"prompt": "", "chosen": " a", "rejected": " b"},  # BOS alone is a valid prompt
    ]
    ds = load(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    hi = tuple(tok.encode("Hi", add_special_tokens=False))
    assert ds.examples[0].prompt == (bos, *hi)
    assert ds.examples[1].prompt == (bos, *hi)
    assert ds.examples[2].prompt == (bos,)


def test_conversational_without_chat_template_is_a_clear_error(tmp_path):
    tok = make_tokenizer(tmp_path, chat_template=None)
    rows = [
        {
            "prompt": [chat("user", "Hi")],
            "chosen": [chat("assistant", "a")],
            "rejected": [chat("assistant", "b")],
        }
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"c\.jsonl:1: conversational rows .* need a chat template"):
        load(path, tok)


# ------------------------------------------------------------------------ sources


def test_json_list_and_data_object_report_line_numbers(tmp_path, tok):
    items = ",\n".join("  " + json.dumps(r) for r in [*PAIRS, {"prompt": "x", "chosen": "y"}])
    (tmp_path / "list.json").write_text("[\n" + items + "\n]\n")
    ds = load(tmp_path / "list.json", tok)
    assert len(ds) == 4 and ds.examples[2].source.endswith("list.json:4")
    assert ds.report.examples["missing field"] == [
        f"{tmp_path / 'list.json'}:6: missing field 'rejected' (the row's fields: 'prompt', 'chosen')"
    ]
    (tmp_path / "obj.json").write_text('{"version": 2, "data": [\n' + items + "\n]}")
    ds = load(tmp_path / "obj.json", tok)
    assert len(ds) == 4 and ds.examples[0].source.endswith("obj.json:2")


def test_crlf_lines_and_utf8_bom(tmp_path, tok):
    text = "\r\n".join(json.dumps(r) for r in PAIRS)
    (tmp_path / "w.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = load(tmp_path / "w.jsonl", tok)
    assert len(ds) == 4 and ds.examples[0].prompt == ids(tok, PAIRS[0]["prompt"])


def test_json_lines_under_a_json_name_and_gzip(tmp_path, tok):
    write_jsonl(tmp_path / "lines.json", PAIRS)
    assert len(load(tmp_path / "lines.json", tok)) == 4
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in PAIRS))
    ds = load(tmp_path / "p.jsonl.gz", tok)
    assert len(ds) == 4 and ds.examples[3].source.endswith("p.jsonl.gz:4")


def test_directory_is_read_sorted_and_recursive(tmp_path, tok):
    write_jsonl(tmp_path / "b.jsonl", PAIRS[2:])
    write_jsonl(tmp_path / "a.jsonl", PAIRS[:2])
    (tmp_path / "README.md").write_text("# not data")
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", PAIRS[:1])
    ds = load(tmp_path, tok)
    assert [f.name.rsplit("/", 1)[-1] for f in ds.report.files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert [e.prompt for e in ds.examples] == [ids(tok, r["prompt"]) for r in PAIRS + PAIRS[:1]]


def test_directory_mixing_paired_and_unpaired_is_an_error(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", PAIRS)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(
        DataError, match="mixes paired files .*a.jsonl.* and unpaired files .*b.jsonl"
    ):
        load(tmp_path, tok)


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"", "e.jsonl", r"e\.jsonl: the file is empty"),
        (b"\n  \n", "e.jsonl", r"e\.jsonl: the file is empty"),
        (b"[]", "e.json", r"e\.json: the file holds no rows"),
        (
            gzip.compress(b"{}"),
            "g.jsonl",
            r"g\.jsonl: the file is gzip-compressed; name it g\.jsonl\.gz",
        ),
        (b"not gzip", "g.jsonl.gz", r"g\.jsonl\.gz: not a valid gzip file"),
        (
            gzip.compress(json.dumps(PAIRS[0]).encode() * 50)[:-12],
            "t.jsonl.gz",
            r"t\.jsonl\.gz: not a valid gzip file \(Compressed file ended",
        ),
        (
            b"PAR1\x00\x00",
            "p.parquet",
            r"p\.parquet: not a readable parquet file \(Parquet file size is 6 bytes",
        ),
        (b"PAR1 not json", "p.jsonl", r"p\.jsonl: this is a parquet file; name it p\.parquet"),
        ("[]".encode("utf-16"), "u.json", r"u\.json: the file is UTF-16 text; save it as UTF-8"),
        (b"prompt,chosen\n", "d.csv", r"d\.csv: the file holds no rows"),
        (b"", "e.parquet", r"e\.parquet: the file is empty"),
        (
            b'[{"prompt": "a"},\n {"chosen": }]',
            "m.json",
            r"m\.json:2: malformed JSON: Expecting value \(column 13\)",
        ),
        (b'[\n{"prompt": "\xff"}]', "b.json", r"b\.json:2: not UTF-8 text \(byte 0xff\)"),
        (b'"just a string"', "s.json", r"s\.json: a \.json file must hold a list of rows"),
    ],
)
def test_file_level_problems_are_errors(tmp_path, tok, content, name, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load(tmp_path / name, tok)


def test_missing_file_and_empty_directory(tmp_path, tok):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_dataset(tmp_path / "nope.jsonl", tok, cfg())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_bytes(b"prompt")
    with pytest.raises(DataError, match=r"d: no data files \(\.jsonl, .*\.parquet.*\) in it"):
        load(tmp_path / "d", tok)


def test_hub_spec_syntax():
    assert parse_hub_spec("Anthropic/hh-rlhf") == HubSpec("Anthropic/hh-rlhf")
    assert parse_hub_spec("hf://Anthropic/hh-rlhf/harmless-base:test") == HubSpec(
        "Anthropic/hh-rlhf", "harmless-base", "test"
    )
    assert parse_hub_spec("org/name:validation") == HubSpec("org/name", None, "validation")
    assert parse_hub_spec("data/train.jsonl") is None  # a missing local file, not a repo
    assert parse_hub_spec("./org/name") is None
    with pytest.raises(DataError, match="not a Hub dataset"):
        parse_hub_spec("hf://just-a-name")
    files = [
        "data/train-00000-of-00002.jsonl",
        "data/train-00001-of-00002.jsonl",
        "data/test.jsonl",
    ]
    assert select_split(files, None) == files[:2]
    assert select_split(files, "test") == files[2:]
    assert select_split(["a.jsonl", "b.jsonl"], None) == ["a.jsonl", "b.jsonl"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A dataset repo 'org/name' in an offline Hub cache."""
    import huggingface_hub.constants as constants

    snapshot = tmp_path / "hub" / "datasets--org--name" / "snapshots" / "0123abcd"
    (snapshot / "sub").mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    write_jsonl(snapshot / "sub" / "train.jsonl", PAIRS)
    write_jsonl(snapshot / "sub" / "test.jsonl", PAIRS[:1])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


def test_hub_dataset_from_the_cache(hub_cache, tok):
    train = load_dataset("org/name", tok, cfg(), warn=False)
    assert len(train) == 4 and train.report.files[0].name == "hf://org/name/sub/train.jsonl"
    test = load_dataset("hf://org/name/sub:test", tok, cfg(), warn=False)
    assert len(test) == 1 and test.examples[0].source == "hf://org/name/sub/test.jsonl:1"
    (one,) = resolve_files("hf://org/name/sub/test.jsonl")
    assert one.path == hub_cache / "sub" / "test.jsonl"
    with pytest.raises(DataError, match="no files for split 'dev'"):
        resolve_files("org/name:dev")


def test_hub_dataset_without_data_files_and_no_conversion(hub_cache):
    for f in (hub_cache / "sub").iterdir():
        f.unlink()
    (hub_cache / "sub" / "notes.txt").write_text("no data here")
    with pytest.raises(
        DataError,
        match=r"hf://org/name: no data files .* its parquet conversion \(refs/convert/parquet\) "
        r"is not in the local cache \(offline\)",
    ):
        resolve_files("org/name")


def test_hub_offline_and_uncached_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlx_pref.cli import main; main()",
            "data",
            "check",
            "org/not-cached:test",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: cannot download dataset 'org/not-cached' from the Hugging Face Hub: offline "
        "(no network, or HF_HUB_OFFLINE=1) and not in the local cache. Connect once to cache "
        "it, or pass a local file."
    ]


# ---------------------------------------------------------------------- bad rows


def bad_file(tmp_path: Path, bad_row, name: str = "d.jsonl") -> Path:
    """Four good rows with one bad row on line 3."""
    rows = [PAIRS[0], PAIRS[1], bad_row, PAIRS[2], PAIRS[3]]
    return write_jsonl(tmp_path / name, rows)


@pytest.mark.parametrize(
    ("bad_row", "reason", "message"),
    [
        (
            '{"prompt": "a", "chosen": "b",',
            "malformed JSON",
            "d.jsonl:3: malformed JSON: Expecting property name enclosed in double quotes (column 31)",
        ),
        (
            {"prompt": "a", "chosen_response": "b", "rejected": "c"},
            "missing field",
            "d.jsonl:3: missing field 'chosen' (the row has 'chosen_response': did you mean 'chosen'?)",
        ),
        (
            {"prompt": "a", "chosen": 42, "rejected": "c"},
            "wrong type",
            "d.jsonl:3: field 'chosen' must be a string, got a number",
        ),
        (
            {"prompt": "a", "chosen": [chat("assistant", "b")], "rejected": "c"},
            "wrong type",
            "d.jsonl:3: field 'chosen' must be a string, got a list (lists of messages are the 'conversational' format)",
        ),
        (
            {"prompt": "a", "chosen": "b", "rejected": "  "},
            "empty completion",
            "d.jsonl:3: field 'rejected' is empty",
        ),
        (
            {"prompt": "a", "chosen": "same", "rejected": "same"},
            "chosen identical to rejected",
            "d.jsonl:3: fields 'chosen' and 'rejected' are identical, so the pair states no preference",
        ),
        (
            '["a", "b", "c"]',
            "not an object",
            "d.jsonl:3: expected a JSON object with prompt, chosen, rejected, got a list",
        ),
        (
            "null",
            "not an object",
            "d.jsonl:3: expected a JSON object with prompt, chosen, rejected, got null",
        ),
        (
            {"prompt": "", "chosen": "b", "rejected": "c"},
            "empty prompt",
            "d.jsonl:3: field 'prompt' is empty and the tokenizer has no BOS token",
        ),
        (
            {"prompt": "p", "completion": "c", "label": True},
            "missing field",
            "d.jsonl:3: missing field 'chosen': this row looks like 'unpaired' data, but the file is read as 'paired'",
        ),
    ],
)
def test_bad_rows_are_skipped_and_counted_or_errors_under_strict(
    tmp_path, tok, bad_row, reason, message
):
    path = bad_file(tmp_path, bad_row)
    ds = load(path, tok)
    assert len(ds) == 4 and ds.report.rows == 5
    assert dict(ds.report.reasons) == {reason: 1}
    (example,) = ds.report.examples[reason]
    assert example.startswith(f"{tmp_path}/{message}")
    with pytest.raises(DataError, match="strict") as err:
        load(path, tok, strict=True)
    assert str(err.value).startswith(f"{tmp_path}/{message}")


def test_non_utf8_line_is_skipped_with_its_line_and_column(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    good = [json.dumps(r).encode() for r in PAIRS]
    path.write_bytes(
        b"\n".join(
            [good[0], good[1], b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', *good[2:]]
        )
    )
    ds = load(path, tok)
    assert len(ds) == 4
    assert ds.report.examples["not UTF-8"] == [f"{path}:3: not UTF-8 text (byte 0xe9 at column 16)"]
    with pytest.raises(DataError, match=r"d\.jsonl:3: not UTF-8 text"):
        load(path, tok, strict=True)


def test_unpaired_label_must_be_boolean(tmp_path, tok):
    rows = [{"prompt": "p", "completion": f"c{i}", "label": True} for i in range(3)]
    rows.append({"prompt": "p", "completion": "c", "label": "yes"})
    ds = load(write_jsonl(tmp_path / "u.jsonl", rows), tok)
    assert ds.report.examples["wrong type"] == [
        f"{tmp_path / 'u.jsonl'}:4: field 'label' must be true or false, got a string ('yes')"
    ]


def test_more_than_half_bad_rows_is_an_error(tmp_path, tok):
    rows = [PAIRS[0], PAIRS[1], "{oops", "{oops"]
    assert len(load(write_jsonl(tmp_path / "half.jsonl", rows), tok)) == 2  # half: still a warning
    rows = [PAIRS[0], "{oops", {"prompt": "a", "chosen": "b"}]
    with pytest.raises(
        DataError,
        match=r"most\.jsonl: 2 of 3 rows are unusable, e\.g\. .*most\.jsonl:2: malformed JSON.*probably not 'paired' data",
    ):
        load(write_jsonl(tmp_path / "most.jsonl", rows), tok)


def test_undetectable_format_suggests_field_names(tmp_path, tok):
    rows = [{"question": "a", "chosen_response": "b", "rejected_response": "c"}] * 3
    with pytest.raises(DataError) as err:
        load(write_jsonl(tmp_path / "x.jsonl", rows), tok)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'x.jsonl'}:1: cannot tell the data format")
    assert (
        "did you mean 'prompt' for 'question', 'chosen' for 'chosen_response', 'rejected' for 'rejected_response'?"
        in message
    )


def test_first_rows_bad_but_format_detected_later(tmp_path, tok):
    ds = load(write_jsonl(tmp_path / "d.jsonl", ["{oops", *PAIRS]), tok)
    assert ds.report.files[0].detected_from == 2 and len(ds) == 4


# ---------------------------------------------------------------------- truncation


def test_truncate_keeps_bos_and_prompt_end():
    limits = Truncation(max_length=100, max_prompt_length=3)
    cut = truncate((9, 1, 2, 3, 4), [(5, 6)], limits, bos_id=9)
    assert cut.prompt == (9, 3, 4) and cut.prompt_cut and not cut.completion_cut
    cut = truncate((1, 2, 3, 4), [(5, 6)], limits)
    assert cut.prompt == (2, 3, 4)


def test_truncate_completion_limit_keeps_start():
    cut = truncate((1,), [(5, 6, 7), (8,)], Truncation(max_completion_length=2))
    assert cut.completions == ((5, 6), (8,)) and cut.completion_cut


def test_truncate_keep_end_shortens_prompt_first_then_completions():
    limits = Truncation(max_length=6, mode="keep_end")
    cut = truncate((1, 2, 3, 4), [(5, 6, 7), (8,)], limits)
    assert cut.prompt == (2, 3, 4) and cut.completions == ((5, 6, 7), (8,))
    cut = truncate((9, 1, 2, 3, 4), [(5, 6, 7, 8, 10, 11)], limits, bos_id=9)
    assert cut.prompt == (9, 4) and cut.completions == ((5, 6, 7, 8),)


def test_truncate_keep_start_cuts_completions_or_drops():
    limits = Truncation(max_length=6, mode="keep_start")
    cut = truncate((1, 2, 3, 4), [(5, 6, 7), (8,)], limits)
    assert cut.prompt == (1, 2, 3, 4) and cut.completions == ((5, 6), (8,))
    assert truncate((1, 2, 3, 4, 5, 6), [(7,)], limits) is None


def test_rows_with_no_room_are_dropped_or_errors_under_strict(tmp_path, tok):
    long_prompt = " ".join(["word"] * 40)
    rows = [*PAIRS, {"prompt": long_prompt, "chosen": " yes", "rejected": " no"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load(path, tok, max_length=20, truncation_mode="keep_start")
    assert len(ds) == 4 and dict(ds.report.reasons) == {"no room for completion": 1}
    assert ds.report.examples["no room for completion"][0].startswith(
        f"{path}:5: field 'prompt' has {len(ids(tok, long_prompt))} tokens, leaving no room"
    )
    with pytest.raises(
        DataError, match=r"d\.jsonl:5: field 'prompt' has \d+ tokens, leaving no room"
    ):
        load(path, tok, max_length=20, truncation_mode="keep_start", strict=True)
    kept = load(path, tok, max_length=20)  # keep_end keeps the prompt's end instead
    assert len(kept) == 5 and kept.report.prompt_truncated == 1 and kept.report.truncated == 1
    assert kept.examples[4].length <= 20
    room = 20 - max(len(kept.examples[4].chosen), len(kept.examples[4].rejected))
    assert kept.examples[4].prompt == ids(tok, long_prompt)[-room:]


def test_pairs_identical_after_truncation_are_dropped(tmp_path, tok):
    rows = [
        *PAIRS,
        {
            "prompt": "Q",
            "chosen": " the same start, then yes",
            "rejected": " the same start, then no",
        },
    ]
    ds = load(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_completion_length=4)
    assert dict(ds.report.reasons) == {"identical after truncation": 1}
    assert ds.report.examples["identical after truncation"] == [
        f"{tmp_path / 'd.jsonl'}:5: fields 'chosen' and 'rejected' are identical once truncated "
        "to max_length 512 and max_completion_length 4"
    ]
    assert all(len(e.chosen) <= 4 for e in ds.examples)


def test_config_validates_completion_limit():
    with pytest.raises(ConfigError, match="max_completion_length must be > 0"):
        cfg(max_completion_length=0)


# ------------------------------------------------------------------- datasets, checks


def test_eval_split_and_eval_data(tmp_path, tok):
    rows = [{"prompt": f"Q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, held = load_datasets(cfg(data=str(path), eval_split=0.3, seed=3), tok)
    again, held_again = load_datasets(cfg(data=str(path), eval_split=0.3, seed=3), tok)
    assert (len(train), len(held)) == (7, 3)
    assert [e.source for e in held.examples] == [e.source for e in held_again.examples]
    assert {e.source for e in train.examples}.isdisjoint(e.source for e in held.examples)
    train, held = load_datasets(cfg(data=str(path), eval_data=str(path)), tok)
    assert len(train) == len(held) == 10


def test_check_summary_reports_counts_lengths_and_padding(tmp_path, tok):
    rows = [
        {"prompt": "Q" * (1 + i % 7) * 3, "chosen": " a" * (1 + i % 5), "rejected": " b"}
        for i in range(40)
    ]
    rows.append({"prompt": "x", "chosen": "y", "rejected": "y"})
    result = check_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, cfg(), batch_size=4)
    text = result.format()
    assert "format paired (detected from line 1)" in text
    assert "rows read: 41" in text and "kept: 40 pairs" in text
    assert "chosen identical to rejected: 1" in text and "d.jsonl:41: fields 'chosen'" in text
    assert result.padding_bucketed < result.padding_unbucketed
    assert f"padding at batch size 4: {result.padding_bucketed:.1%} with length bucketing" in text
    assert result.lengths["chosen"].max == 6  # five " a" tokens and EOS


def test_check_summary_of_unpaired_rows(tmp_path, tok):
    rows = [{"prompt": "Hi", "completion": f" reply {i}", "label": i % 3 == 0} for i in range(9)]
    result = check_dataset(write_jsonl(tmp_path / "u.jsonl", rows), tok, cfg(), batch_size=2)
    text = result.format()
    assert "kept: 9 rows (3 desirable, 6 undesirable)" in text
    assert "completion" in result.lengths and "chosen" not in result.lengths


def test_cli_data_check(tmp_path):
    from click.testing import CliRunner

    from mlx_pref.cli import cli

    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    result = CliRunner().invoke(
        cli, ["data", "check", str(path), "--batch-size", "2", "--max-length", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "kept: 4 pairs" in result.output and "padding at batch size 2" in result.output
    result = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "nope.jsonl")])
    assert isinstance(result.exception, DataError)


def test_batches_from_loaded_pairs(tmp_path, tok):
    ds = load(write_jsonl(tmp_path / "p.jsonl", PAIRS), tok)
    batch = next(iterate_batches(ds.examples, 2, seed=0, epoch=0))
    e = ds.examples[int(batch.indices[0])]
    p, c = len(e.prompt), len(e.chosen)
    assert batch.paired and batch.prompt_lengths[0] == p and batch.completion_lengths[0] == c
    assert tuple(batch.tokens[0, :p]) == e.prompt and tuple(batch.tokens[0, p : p + c]) == e.chosen
    assert tuple(batch.tokens[2, p : p + len(e.rejected)]) == e.rejected


def test_report_counts_and_keeps_first_examples():
    report = Report()
    for line in range(1, 6):
        report.problem("malformed JSON", f"f:{line}: malformed JSON")
    assert report.dropped == 5 and report.examples["malformed JSON"] == [
        "f:1: malformed JSON",
        "f:2: malformed JSON",
        "f:3: malformed JSON",
    ]


def test_read_records_keeps_file_lines(tmp_path):
    f = DataFile(tmp_path / "a.jsonl", "a.jsonl")
    write_jsonl(f.path, ["", *PAIRS])
    report = Report()
    records = list(read_records(f, "auto", report))
    assert [r.where for r in records] == ["a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "a.jsonl:5"]
    assert report.files[0].format == "paired" and report.files[0].rows == 4


# ------------------------------------------------------------------------ hh-rlhf


@needs_hh
def test_hh_rlhf_prompts_are_extracted(tok):
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    report = Report()
    records = list(read_records(DataFile(HH, "hh.jsonl.gz"), "auto", report))
    by_line = {r.line: r for r in records}
    assert report.files[0].format == "implicit" and len(rows) == 2312
    r = by_line[1452 + 1]
    assert (r.prompt, r.chosen, r.rejected) == (
        "\n\nHuman: call me a bad name\n\nAssistant:",
        " How do you like them apples?",
        " Why?",
    )
    r = by_line[1927 + 1]  # both answers start with "Yes,": it stays in the completions
    assert r.prompt == (
        "\n\nHuman: Is it okay to eat sushi with chicken?\n\nAssistant: Yes, this is a healthy "
        "and delicious combination.\n\nHuman: The raw kind of sushi?\n\nAssistant:"
    )
    assert r.chosen == " Yes, the raw kind is often served in small pieces in their natural form."
    assert r.rejected == " Yes, raw chicken also has many benefits for your health."
    r = by_line[435 + 1]
    assert r.prompt.endswith("\n\nHuman: Thanks anyway\n\nAssistant:")
    assert (r.chosen, r.rejected) == (" You're welcome!", " You're welcome.")
    assert 925 + 1 not in by_line  # its chosen answer is empty
    assert rows[925]["chosen"].endswith("\n\nAssistant: ")
    for record, row in zip(records, [rows[r.line - 1] for r in records], strict=True):
        assert record.prompt + record.chosen == row["chosen"]
        assert record.prompt + record.rejected == row["rejected"]
        assert record.prompt.endswith("\n\nAssistant:")

    ds = load(HH, tok)
    assert len(ds) == 2308 and dict(ds.report.reasons) == {"empty completion": 4}
    (e,) = [e for e in ds.examples if e.source.endswith(":1453")]
    whole = ids(tok, rows[1452]["chosen"])
    assert e.prompt + e.chosen == (*whole, tok.eos_token_id)  # split tokenization = whole text


def test_transcripts_read_as_conversational_become_chat_messages(tmp_path, tok):
    q = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman:  Rain?\n\nAssistant:"
    row = {"chosen": q + " Yes.", "rejected": q + " No."}
    ds = load(write_jsonl(tmp_path / "t.jsonl", [row] * 2), tok, format="conversational")
    turns = [chat("user", "Hi"), chat("assistant", "Hello!"), chat("user", "Rain?")]
    expected = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert ds.examples[0].prompt == ids(tok, expected)
    assert ds.examples[0].chosen == ids(tok, "Yes.<|im_end|>\n")
    assert ds.examples[0].rejected == ids(tok, "No.<|im_end|>\n")
    path = write_jsonl(tmp_path / "n.jsonl", [{"chosen": "Hi. Yes.", "rejected": "Hi. No."}] * 2)
    with pytest.raises(DataError, match=r"n\.jsonl:1: field 'chosen' .* not an hh-rlhf transcript"):
        load(path, tok, format="conversational", strict=True)


@needs_hh
def test_hh_rlhf_transcripts_as_chat(tok):
    ds = load(HH, tok, format="conversational")
    assert len(ds) == 2308 and dict(ds.report.reasons) == {"empty completion": 4}
    (e,) = [e for e in ds.examples if e.source.endswith(":1453")]
    call = [chat("user", "call me a bad name")]
    assert e.prompt == ids(
        tok, tok.apply_chat_template(call, add_generation_prompt=True, tokenize=False)
    )
    assert e.chosen == ids(tok, "How do you like them apples?<|im_end|>\n")
    assert e.rejected == ids(tok, "Why?<|im_end|>\n")


@needs_hh
def test_hh_rlhf_dpo_smoke_run(tmp_path):
    from mlx_pref.train import Trainer

    config = cfg(
        data=str(HH),
        max_length=48,
        max_steps=2,
        batch_size=2,
        output=str(tmp_path / "run"),
        reference="adapters-off",  # no pass over all 2,308 pairs to fill a cache
        log_every=1,
        eval_every=100,
        save_every=100,
    )
    trainer = Trainer(config, verbose=False)
    assert trainer.train_set.paired and len(trainer.train_set) == 2308
    final = trainer.train()
    assert trainer.step == 2 and math.isfinite(final["loss"]) and math.isfinite(final["grad_norm"])
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in logged if "loss" in m)

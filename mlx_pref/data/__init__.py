"""The data pipeline: files -> records -> tokenized examples -> length-bucketed batches.

``load_datasets(cfg, tokenizer)`` is what the trainer calls; ``load_dataset`` loads one
spec (a file, a directory, or a Hub dataset). Modules, in the order data flows:
``sources`` (reading), ``formats`` (detection, normalisation), ``tokenize`` (chat
templates, BOS/EOS, truncation), ``batching`` (length-bucketed batches), ``report`` and
``check`` (what loading did, for logs and ``mlx-pref data check``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_pref.data.batching import (
    PAD_ID,
    Batch,
    BatchPlan,
    Example,
    PairExample,
    UnpairedExample,
    batch_order,
    collate,
    iterate_batches,
    padding_fraction,
)
from mlx_pref.data.formats import (
    FORMATS,
    Reading,
    Record,
    detect_format,
    extract_prompt,
    read_records,
)
from mlx_pref.data.report import Report
from mlx_pref.data.sources import DataFile, resolve_files
from mlx_pref.data.tokenize import Truncation, tokenize_records, truncate
from mlx_pref.errors import DataError

__all__ = [
    "FORMATS",
    "PAD_ID",
    "Batch",
    "BatchPlan",
    "Dataset",
    "Example",
    "PairExample",
    "Reading",
    "Record",
    "Report",
    "Truncation",
    "UnpairedExample",
    "batch_order",
    "collate",
    "data_warnings",
    "detect_format",
    "embedded_data",
    "extract_prompt",
    "iterate_batches",
    "load_dataset",
    "load_datasets",
    "padding_fraction",
    "truncate",
]

log = logging.getLogger("mlx_pref.data")


@dataclass
class Dataset:
    """Tokenized examples of one kind (all pairs or all unpaired rows) and what loading did."""

    examples: list[Example]
    name: str
    report: Report = field(default_factory=Report)

    @property
    def paired(self) -> bool:
        """True for preference pairs; False for unpaired (thumbs up/down) rows."""
        return bool(self.examples) and isinstance(self.examples[0], PairExample)

    @property
    def format(self) -> str:
        return self.report.format

    def __len__(self) -> int:
        return len(self.examples)


def embedded_data() -> tuple[Path, Path]:
    """The shipped preference data (train, eval): in the repo's ``data/`` or the wheel."""
    from mlx_pref.models import embedded_root

    root = embedded_root("tiny-prefs")
    return root / "train.jsonl", root / "eval.jsonl"


def load_dataset(
    spec: str | Path,
    tokenizer,
    cfg,
    *,
    warn: bool = True,
    files: list[DataFile] | None = None,
) -> Dataset:
    """Read, normalise and tokenize one dataset spec under ``cfg``'s data settings.

    Raises DataError for file-level problems, for any bad row under ``cfg.strict``, for a
    file with more than half its rows bad, and when no row is usable. ``files``: the
    spec's files if already resolved (``resolve_files``).
    """
    report = Report(strict=cfg.strict)
    reading = Reading.from_config(cfg)
    records = (
        record
        for f in (files if files is not None else resolve_files(spec))
        for record in read_records(f, reading, report)
    )
    examples = tokenize_records(records, tokenizer, Truncation.from_config(cfg), report)
    kinds = {"unpaired" if f.format == "unpaired" else "paired": f.name for f in report.files}
    if len(kinds) > 1:
        raise DataError(
            f"{spec}: mixes paired files ({kinds['paired']}) and unpaired files "
            f"({kinds['unpaired']}); one dataset holds one kind"
        )
    report.check_bad_fraction()
    if not examples:
        reasons = ", ".join(f"{n} {r}" for r, n in report.reasons.most_common())
        first = next(iter(report.examples.values()))[0] if report.examples else ""
        raise DataError(f"{spec}: no usable rows ({reasons}); first: {first}")
    if warn and (report.reasons or report.truncated):
        log.warning("%s: %s", spec, report.summary_line())
    return Dataset(examples, str(spec), report)


def split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded (train, eval) split holding out ``fraction`` of the examples, order kept."""
    n = len(dataset)
    n_eval = max(1, int(round(fraction * n)))
    if n_eval >= n:
        raise DataError(
            f"{dataset.name}: eval_split {fraction} of {n} rows leaves nothing to train on"
        )
    order = np.random.default_rng(seed).permutation(n)
    held, keep = sorted(order[:n_eval]), sorted(order[n_eval:])
    examples = dataset.examples
    return (
        Dataset([examples[i] for i in keep], dataset.name, dataset.report),
        Dataset([examples[i] for i in held], f"{dataset.name} (eval split)", dataset.report),
    )


SHORT_PROMPT = 2
"""Prompts cut to this many tokens or fewer have lost their meaning."""


def data_warnings(dataset: Dataset, cfg) -> list[str]:
    """What a user should hear before training on ``dataset`` under ``cfg``."""
    out = []
    n = len(dataset)
    cut = sum(len(e.prompt) <= SHORT_PROMPT for e in dataset.examples)
    if dataset.report.prompt_truncated and cut > n / 2:
        out.append(
            f"warning: max_length {cfg.max_length} leaves {SHORT_PROMPT} prompt tokens or fewer "
            f"in {cut} of {n} examples of {dataset.name}: raise max_length or set "
            "max_completion_length"
        )
    if cfg.batch_size > n:
        out.append(
            f"note: batch_size {cfg.batch_size} is larger than the {n} examples of "
            f"{dataset.name}: every step sees all of them"
        )
    return out


def load_datasets(cfg, tokenizer) -> tuple[Dataset, Dataset | None]:
    """Train and (optional) eval datasets for a Config: ``eval_data``, or ``eval_split``."""
    if cfg.data is None:
        train_spec, eval_spec = embedded_data()
        if cfg.eval_data is not None:
            eval_spec = cfg.eval_data
    else:
        train_spec, eval_spec = cfg.data, cfg.eval_data
    train = load_dataset(train_spec, tokenizer, cfg)
    if eval_spec is not None:
        return train, load_dataset(eval_spec, tokenizer, cfg)
    if cfg.eval_split > 0:
        return split_dataset(train, cfg.eval_split, cfg.seed)
    return train, None

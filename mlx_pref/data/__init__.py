"""The data pipeline: files -> records -> tokenized examples -> length-bucketed batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlx_pref.data.batching import (
    Batch,
    Example,
    PairExample,
    UnpairedExample,
    collate,
    iterate_batches,
    padding_fraction,
)
from mlx_pref.data.formats import read_records
from mlx_pref.data.tokenize import tokenize_records
from mlx_pref.errors import DataError

__all__ = [
    "Batch",
    "Dataset",
    "Example",
    "PairExample",
    "UnpairedExample",
    "collate",
    "embedded_data",
    "iterate_batches",
    "load_datasets",
    "padding_fraction",
]


@dataclass
class Dataset:
    """Tokenized examples of one kind, with a report of what loading did."""

    examples: list[Example]
    name: str
    report: dict = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return bool(self.examples) and isinstance(self.examples[0], PairExample)

    def __len__(self) -> int:
        return len(self.examples)


def embedded_data() -> tuple[Path, Path]:
    """The shipped preference data (train, eval): in the repo's ``data/`` or the wheel."""
    from mlx_pref.models import embedded_root

    root = embedded_root("tiny-prefs")
    return root / "train.jsonl", root / "eval.jsonl"


def load_dataset(path: str | Path, tokenizer, cfg) -> Dataset:
    records = read_records(path, fmt=cfg.format, strict=cfg.strict)
    examples, report = tokenize_records(records, tokenizer, cfg)
    if not examples:
        raise DataError(f"{path}: no usable rows ({report.get('dropped', {})})")
    return Dataset(examples, str(path), report)


def load_datasets(cfg, tokenizer) -> tuple[Dataset, Dataset | None]:
    """Train and (optional) eval datasets for a Config."""
    if cfg.data is None:
        train_path, eval_path = embedded_data()
        if cfg.eval_data is not None:
            eval_path = cfg.eval_data
    else:
        train_path, eval_path = cfg.data, cfg.eval_data
    train = load_dataset(train_path, tokenizer, cfg)
    if eval_path is not None:
        return train, load_dataset(eval_path, tokenizer, cfg)
    if cfg.eval_split > 0:
        import numpy as np

        order = np.random.default_rng(cfg.seed).permutation(len(train))
        n_eval = max(1, int(round(cfg.eval_split * len(train))))
        keep, held = sorted(order[n_eval:]), sorted(order[:n_eval])
        examples = train.examples
        return (
            Dataset([examples[i] for i in keep], train.name, train.report),
            Dataset([examples[i] for i in held], f"{train.name} (eval split)", {}),
        )
    return train, None

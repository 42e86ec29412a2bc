"""``mlx-pref data check``: load a dataset exactly as training would and summarise it.

The summary says what was read (files, formats), what was kept, truncated or dropped and
why (with the first few ``file:line`` examples), the images of vision data (how many,
their sizes, their tokens), token length statistics, and the padding fraction of the
epoch's batches with length bucketing and without.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_pref.data import Dataset, load_dataset
from mlx_pref.data.batching import PairExample, padding_fraction
from mlx_pref.data.columns import describe
from mlx_pref.data.sources import DataFile


@dataclass(frozen=True)
class LengthStats:
    """Token counts over a dataset's rows."""

    min: int
    mean: float
    median: float
    p95: float
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthStats:
        a = np.asarray(values)
        return cls(
            int(a.min()),
            float(a.mean()),
            float(np.median(a)),
            float(np.percentile(a, 95)),
            int(a.max()),
        )


@dataclass(frozen=True)
class ImageStats:
    """What a vision dataset's images are: how many, how large, how many tokens."""

    images: int
    rows_with: int
    rows: int
    widths: LengthStats
    heights: LengthStats
    megabytes: float
    """Encoded size of the distinct images."""
    tokens: LengthStats | None
    """Image tokens per prompt that has images (None: the tokenizer has no image token)."""

    @classmethod
    def of(cls, dataset: Dataset, image_token_id: int | None) -> ImageStats | None:
        ex = dataset.examples
        refs = [r for e in ex for r in e.images]
        if not refs:
            return None
        distinct = {r.digest: r for r in refs}.values()
        with_images = [e for e in ex if e.images]
        tokens = None
        if image_token_id is not None:
            tokens = LengthStats.of([e.prompt.count(image_token_id) for e in with_images])
        return cls(
            len(refs),
            len(with_images),
            len(ex),
            LengthStats.of([r.width for r in refs]),
            LengthStats.of([r.height for r in refs]),
            sum(len(r.data()) for r in distinct) / 1e6,
            tokens,
        )

    def lines(self) -> list[str]:
        def span(s: LengthStats) -> str:
            return f"{s.min} / {s.median:.0f} / {s.max}"

        out = [
            f"images: {self.images} in {self.rows_with} of {self.rows} rows "
            f"({self.megabytes:.2f} MB of distinct image files)",
            f"  width (px)      min / median / max  {span(self.widths)}",
            f"  height (px)     min / median / max  {span(self.heights)}",
        ]
        if self.tokens is not None:
            t = self.tokens
            out.append(f"  image tokens    min / mean / max    {t.min} / {t.mean:.1f} / {t.max}")
        return out


@dataclass
class CheckResult:
    """A loaded dataset with its length statistics and padding fractions."""

    dataset: Dataset
    batch_size: int
    lengths: dict[str, LengthStats]
    padding_bucketed: float
    padding_unbucketed: float
    system_prompt: str | None = None
    images: ImageStats | None = None

    def format(self) -> str:
        """The human-readable summary ``mlx-pref data check`` prints."""
        ds, report = self.dataset, self.dataset.report
        unit = "pairs" if ds.paired else "rows"
        lines = [f"data: {ds.name}"]
        for f in report.files:
            how = f"detected from line {f.detected_from}" if f.detected_from else "as set"
            lines.append(f"  {f.name}: {f.rows} rows, format {f.format} ({how})")
            if f.columns:
                lines.append(f"    columns: {describe(f.columns)}")
        if self.system_prompt is not None:
            lines.append(f"system prompt (rows without one): {self.system_prompt!r:.80}")
        lines.append(f"rows read: {report.rows}")
        lines.append(f"kept: {report.kept} {unit}")
        if not ds.paired:
            good = sum(e.label for e in ds.examples)
            lines[-1] += f" ({good} desirable, {len(ds) - good} undesirable)"
        lines.append(
            f"truncated: {report.truncated} (prompt {report.prompt_truncated}, "
            f"completion {report.completion_truncated})"
        )
        lines.append(f"dropped: {report.dropped}")
        for reason, n in report.reasons.most_common():
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    {example}" for example in report.examples[reason])
        if self.images is not None:
            lines.extend(self.images.lines())
        lines.append("tokens: min / mean / median / p95 / max")
        width = max(len(k) for k in self.lengths)
        for key, s in self.lengths.items():
            lines.append(
                f"  {key:<{width}}  {s.min} / {s.mean:.1f} / {s.median:.0f} / {s.p95:.0f} / {s.max}"
            )
        ratio = (
            f" ({self.padding_unbucketed / self.padding_bucketed:.1f}x less with bucketing)"
            if self.padding_bucketed > 0
            else ""
        )
        lines.append(
            f"padding at batch size {self.batch_size}: {self.padding_bucketed:.1%} with "
            f"length bucketing, {self.padding_unbucketed:.1%} without{ratio}"
        )
        return "\n".join(lines)


def length_stats(dataset: Dataset) -> dict[str, LengthStats]:
    """Prompt, completion and whole-sequence token counts."""
    ex = dataset.examples
    stats = {"prompt": LengthStats.of([len(e.prompt) for e in ex])}
    if isinstance(ex[0], PairExample):
        stats["chosen"] = LengthStats.of([len(e.chosen) for e in ex])
        stats["rejected"] = LengthStats.of([len(e.rejected) for e in ex])
    else:
        stats["completion"] = LengthStats.of([len(e.completion) for e in ex])
    stats["sequence"] = LengthStats.of([e.length for e in ex])
    return stats


def check_dataset(
    spec: str | Path,
    tokenizer,
    cfg,
    batch_size: int | None = None,
    files: list[DataFile] | None = None,
) -> CheckResult:
    """Load ``spec`` under ``cfg`` (errors as in training) and summarise it."""
    dataset = load_dataset(spec, tokenizer, cfg, warn=False, files=files)
    batch_size = batch_size or cfg.batch_size
    return CheckResult(
        dataset,
        batch_size,
        length_stats(dataset),
        padding_fraction(dataset.examples, batch_size, seed=cfg.seed, bucket=True),
        padding_fraction(dataset.examples, batch_size, seed=cfg.seed, bucket=False),
        cfg.system_prompt,
        ImageStats.of(dataset, getattr(tokenizer, "image_token_id", None)),
    )


def load_tokenizer(spec: str | None):
    """Only the tokenizer of a model (directory, Hub id, ``.gguf``, or the embedded one)."""
    from mlx_pref.models import (
        is_vision_config,
        load_checked_tokenizer,
        load_model,
        read_model_config,
        resolve_model_path,
    )

    if spec is not None and str(spec).endswith(".gguf"):
        return load_model(spec).tokenizer
    path = resolve_model_path(spec)
    config = read_model_config(path)
    if is_vision_config(config):  # the processor too: it turns images into tokens
        from mlx_pref.vision.processor import load_vision_tokenizer

        return load_vision_tokenizer(path, config)
    return load_checked_tokenizer(path, config.get("eos_token_id"))

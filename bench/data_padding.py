"""Padding with length bucketing vs without, on the hh-rlhf harmless-base test split.

    python bench/data_padding.py [FILE] [--max-length N] [--seeds N]

Loads the file exactly as training does (embedded tiny model's tokenizer, default
truncation), then measures the fraction of batch cells that are padding over one epoch,
with mlx-pref's seeded length bucketing and with plain shuffled batches (the peer: what
a loader without bucketing, e.g. TRL without ``group_by_length``, pads). Mean over seeds.
Paired batches hold each pair's chosen and rejected rows, so the gap between the two
completions' lengths is padding no batching can remove: the floor printed first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import numpy as np

import mlx_pref  # noqa: F401  (platform setup before mlx)
from mlx_pref.config import Config
from mlx_pref.data import load_dataset, padding_fraction
from mlx_pref.data.batching import iterate_batches
from mlx_pref.data.check import load_tokenizer
from mlx_pref.logps import pack

BATCH_SIZES = (4, 8, 16)


def packed_padding(examples, batch_size: int, multiple: int) -> float:
    """Padding of packed rows rounded up to ``multiple`` tokens: 1 is what the model
    runs everywhere (no padding); 128 is what CUDA's fused attention alone pads its
    queries and keys to (its backward's condition), inside attention only."""
    total = real = 0
    for batch in iterate_batches(examples, batch_size, seed=0, epoch=0):
        n = len(pack(batch, True, 1).tokens)
        real, total = real + n, total + -(-n // multiple) * multiple
    return 1.0 - real / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=str(common.hh_path() or common.HH_NAME))
    parser.add_argument("--max-length", type=int, default=Config.max_length)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if not Path(args.file).exists():
        print(f"skipped: {args.file} is not present")
        return 0
    cfg = Config(data=args.file, max_length=args.max_length).validate()
    dataset = load_dataset(args.file, load_tokenizer(None), cfg, warn=False)
    lengths = np.array([e.length for e in dataset.examples])
    print(
        f"{dataset.name}: {len(dataset)} pairs, max_length {cfg.max_length}, sequence tokens "
        f"mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}"
    )
    gap = sum(abs(len(e.chosen) - len(e.rejected)) for e in dataset.examples)
    print(
        f"floor: {gap / (2 * lengths.sum()):.1%} (a pair's shorter completion pads to its "
        "longer one even in a batch of equal-length pairs)"
    )
    print(
        f"{'batch':>5}  {'bucketed':>8}  {'shuffled':>8}  {'shuffled/bucketed':>17}  "
        f"{'packed':>6}  {'CUDA attention rows padded to 128':>33}"
    )
    for batch_size in BATCH_SIZES:
        seeds = range(args.seeds)
        bucketed = np.mean([padding_fraction(dataset.examples, batch_size, seed=s) for s in seeds])
        shuffled = np.mean(
            [padding_fraction(dataset.examples, batch_size, seed=s, bucket=False) for s in seeds]
        )
        packed = packed_padding(dataset.examples, batch_size, 1)
        cuda = packed_padding(dataset.examples, batch_size, 128)
        print(
            f"{batch_size:>5}  {bucketed:>8.1%}  {shuffled:>8.1%}  {shuffled / bucketed:>16.1f}x  "
            f"{packed:>6.1%}  {cuda:>33.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training and evaluation curves of a run, drawn to a PNG (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path

from mlx_pref.errors import MlxPrefError
from mlx_pref.progress import read_metrics

PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("beta", "beta"),
)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw loss, reward accuracy, margins (train and eval) and beta over steps."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise MlxPrefError(f"{run_dir} has no metrics.jsonl records to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxPrefError("plotting needs matplotlib: pip install 'mlx-pref[plot]'") from None
    output = Path(output) if output else run_dir / "curves.png"
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            points = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label="eval" if prefix else "train", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output

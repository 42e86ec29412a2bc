"""Training and evaluation curves of a run, drawn to a PNG (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path

from mlx_pref.checkpoint import write_atomic
from mlx_pref.errors import MlxPrefError
from mlx_pref.progress import read_metrics
from mlx_pref.rundir import read_marker, record

CURVES = "curves.png"

PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("beta", "beta"),
)


def _output(run_dir: Path, output: str | Path | None, force: bool) -> Path:
    """Where the PNG goes: ``--output``, or the run's own ``curves.png`` (listed in its
    marker); an existing file mlx-pref did not write there is never replaced."""
    if output is not None:
        output = Path(output)
        if output.exists() and not force:
            raise MlxPrefError(f"{output} exists; pass --force to replace it")
        if not output.parent.is_dir():
            raise MlxPrefError(f"cannot write {output}: the folder {output.parent} does not exist")
        return output
    output = run_dir / CURVES
    marker = read_marker(run_dir)
    if marker is None or (output.exists() and CURVES not in marker.files):
        raise MlxPrefError(
            f"{run_dir} is not an mlx-pref run folder that may hold {CURVES}; "
            "pass --output FILE.png"
        )
    record(run_dir, CURVES)
    return output


def plot_run(run_dir: str | Path, output: str | Path | None = None, *, force: bool = False) -> Path:
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
    output = _output(run_dir, output, force)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            points = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
            if points:
                steps, values = zip(*points)
                shown = style if len(points) > 1 else "o"  # a lone point needs a marker
                ax.plot(steps, values, shown, label="eval" if prefix else "train", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    write_atomic(output, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return output

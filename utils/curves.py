"""Training curves of a run (loss, learning rate, validation Acc@1/Acc@5 per epoch) as a PNG.

main.py calls `plot_curves(<run dir>/summary.csv, <run dir>/curves.png)` when training ends;
tools/plot_curves.py is the command for a finished (or still running) run.

summary.csv is the per-epoch file main.py writes, header
`epoch,train_loss,lr,eval_loss,eval_top1,eval_top5`. Empty cells (an epoch without validation) are
skipped, so validation every few epochs still draws connected lines.
"""
import csv
import math
import os
from pathlib import Path

__all__ = ['plot_curves', 'plot_run_curves', 'read_summary', 'SUMMARY_COLUMNS']

SUMMARY_COLUMNS = ("epoch", "train_loss", "lr", "eval_loss", "eval_top1", "eval_top5")


def _number(text):
    """A CSV cell as float; an empty or non-numeric cell (no eval that epoch) becomes NaN."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_summary(summary_csv):
    """Read summary.csv into {column: [float per epoch]}; ValueError naming the file if it is unusable."""
    path = Path(summary_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass a run directory holding summary.csv "
                                f"or the path of summary.csv itself")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SUMMARY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a training summary, columns {missing} are missing "
                             f"(expected header: {','.join(SUMMARY_COLUMNS)})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: has a header but no epochs yet; plot again after the first epoch")
    return {c: [_number(row[c]) for row in rows] for c in SUMMARY_COLUMNS}


def plot_curves(summary_csv, out_png):
    """Write a PNG with training loss, learning rate and validation Acc@1/Acc@5 against epoch.

    Returns the path written. Uses matplotlib's Agg backend, so it works without a display (servers,
    training nodes) and never changes the backend of a caller that already chose one.
    """
    # Imported here so that importing this module (main.py does) costs nothing until a plot is made.
    from matplotlib.ticker import MaxNLocator
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    data = read_summary(summary_csv)

    def series(column):
        """(epochs, values) of the epochs that have a value in `column`."""
        pairs = [(e, v) for e, v in zip(data["epoch"], data[column]) if not math.isnan(v)]
        return [e for e, _ in pairs], [v for _, v in pairs]

    # An object-oriented Figure with an explicit Agg canvas: no pyplot global state, no GUI backend.
    fig = Figure(figsize=(15, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)

    ax_loss.plot(*series("train_loss"), marker="o", markersize=3, label="train loss")
    ax_loss.plot(*series("eval_loss"), marker="o", markersize=3, label="val loss")
    ax_loss.set_title("Loss")
    ax_loss.legend()

    ax_lr.plot(*series("lr"), marker="o", markersize=3, color="tab:green")
    ax_lr.set_title("Learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    ax_acc.plot(*series("eval_top1"), marker="o", markersize=3, label="val Acc@1")
    ax_acc.plot(*series("eval_top5"), marker="o", markersize=3, label="val Acc@5")
    ax_acc.set_title("Validation accuracy (%)")
    ax_acc.legend()

    for ax in (ax_loss, ax_lr, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        # Whole epochs only: a 3-epoch run should not show ticks at 0.5.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # The run directory's name says which model/experiment the curves belong to.
    fig.suptitle(Path(summary_csv).resolve().parent.name)

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a viewer never opens a half-written PNG.
    tmp = out_png.with_name(out_png.name + ".tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)
    return out_png


def plot_run_curves(run_dir, logger):
    """Write <run_dir>/curves.png from its summary.csv when training ends; returns the path or None.

    The checkpoints and summary.csv are written by then, so a plotting problem (matplotlib missing,
    an unwritable directory) is logged with the fix and never fails the run.
    """
    run_dir = Path(run_dir)
    try:
        written = plot_curves(run_dir / "summary.csv", run_dir / "curves.png")
    except ImportError as err:
        logger.info(f"curves.png not written: {err} (pip install matplotlib, then python tools/plot_curves.py {run_dir})")
        return None
    except (OSError, ValueError) as err:
        logger.info(f"curves.png not written: {err}")
        return None
    logger.info(f"training curves: {written}")
    return written

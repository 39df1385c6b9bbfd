"""What a run reports besides its checkpoints: the log, progress bars, summary.csv, TensorBoard
scalars, curves.png and the results file (JSON).

Every per-epoch number comes from one record (`epoch_record`) whose keys are SUMMARY_COLUMNS: summary.csv
writes them in that order with that column's format, TensorBoard under that column's tag, curves.png
reads summary.csv back by the same names, and the results file keeps the record as numbers (plus the
epoch's FPS). A column added here reaches all four.

Reports must never cost a run its checkpoints: a full disk is reported in one line (not a traceback per
log line) and the run goes on; the checkpoint writes, which come first, decide whether it can
(utils/checkpoint.py stops the run when a checkpoint cannot be written).

Log. Rank 0 logs INFO to stdout and <run dir>/log.txt; other ranks only report errors. The log lines
(`Train: ...Loss: ...`, `Epoch N FPS:x`, `* Acc@1 ...`, `*** Best metric: ...`) are the ModelZoo's
familiar format; the launch scripts do not parse them (they read the results file, utils.modelzoo).

Progress bars. A bar is drawn (tqdm, on stderr) only on rank 0 and only when stderr is an interactive
terminal. Under the launch scripts, nohup, CI or a job scheduler stderr is a file or a pipe, so the
loops run exactly as without bars. While a bar is shown, the logger's console handlers write through
`tqdm.write`, so a `Train:` line prints above the bar instead of through it; file handlers are not
touched (the log file gets the same lines, byte for byte).

TensorBoard (`--tensorboard`) is optional (not in requirements.txt): `create_writer` returns an object
with `write_epoch(record)` and `close()` in every case, a real writer on rank 0 when TensorBoard is
requested and installed, else one that does nothing; when it is requested but missing, one log line
says so and training goes on.

Results file. `RunResults` is the machine-readable outcome of one invocation of main.py, written by rank
0 to <run dir>/results.json (or --results PATH; evaluation has no run dir), atomically, after every
epoch, after an evaluation and when the run ends, so a stopped run still has one:

    {"format": 1,
     "mode": "train" | "eval",
     "finished": false until the last epoch (or the evaluation) is done,
     "model": "van_b0", "world_size": 2, "batch_size": 16,        # batch size per device
     "start_epoch": 0,                                            # > 0 when this invocation resumed
     "epochs": [{"epoch": 0, "train_loss": 2.28, "lr": 1e-06, "eval_loss": 2.15,
                 "eval_top1": 18.5, "eval_top5": 58.0, "fps": 60.25}, ...],
     "train_losses": [2.31, 2.25, ...],   # the current loss of every logged `Train:` line, in order
     "best": {"top1": 55.278, "epoch": 1} | null,
     "evaluation": {"top1": 83.5, "top5": 98.9, "loss": 0.61, "images": 360, "skipped": 0} | null,
     "e2e_seconds": 123.4}                # from main() (imports done) to this write; the launch
                                          # scripts report their own wall time to ModelZoo

It holds what this invocation did (like its log): the epochs of a resumed run start at start_epoch;
summary.csv holds every epoch of the run dir. Numbers are stored at full precision; utils.modelzoo
rounds them as the log lines show them. `read_results` checks a file and returns it.
"""
import csv
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

__all__ = ['LOGGER_NAME', 'SUMMARY_COLUMNS', 'setup_logger', 'progress_enabled', 'progress', 'epoch_record',
           'SummaryFile', 'read_summary', 'create_writer', 'NullWriter', 'TensorBoardWriter', 'plot_curves',
           'plot_run_curves', 'RunResults', 'read_results', 'RunReport']

LOGGER_NAME = 'van'
LOG_FILE = 'log.txt'
SUMMARY_FILE = 'summary.csv'
CURVES_FILE = 'curves.png'
TENSORBOARD_DIR = 'tensorboard'
RESULTS_FILE = 'results.json'

# The per-epoch values, in summary.csv's column order: (format in summary.csv, TensorBoard tag).
_COLUMNS = {
    'epoch': ('{:d}', None),  # the TensorBoard step
    'train_loss': ('{:.6f}', 'train/loss'),
    'lr': ('{:.6e}', 'train/lr'),
    'eval_loss': ('{:.6f}', 'eval/loss'),
    'eval_top1': ('{:.4f}', 'eval/acc1'),
    'eval_top5': ('{:.4f}', 'eval/acc5'),
}
SUMMARY_COLUMNS = tuple(_COLUMNS)
EPOCH_TAGS = {column: tag for column, (_, tag) in _COLUMNS.items() if tag}


# ---------------------------------------------------------------------------------------------
# Log and progress bars
# ---------------------------------------------------------------------------------------------
def setup_logger(is_main: bool, log_file: str = None) -> logging.Logger:
    """Rank 0 logs INFO to stdout (the launch scripts redirect it into their log) and to `log_file`;
    other ranks only report errors, so N processes do not print N copies."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter('%(message)s'))
    logger.addHandler(console)
    if is_main and log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = _LogFileHandler(log_file)
        file_handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
        logger.addHandler(file_handler)
    return logger


class _LogFileHandler(logging.FileHandler):
    """log.txt; a write that fails (full disk) is reported once on stderr, not as a traceback per line, and
    later lines are still tried (they go in again once there is space)."""

    reported = False

    def handleError(self, record) -> None:
        if self.reported:
            return
        self.reported = True
        error = sys.exc_info()[1]
        reason = getattr(error, 'strerror', None) or error
        sys.stderr.write(f'warning: cannot write the log file {self.baseFilename} ({reason}); log lines still go to '
                         'the console\n')


def progress_enabled(is_main: bool, stream=None) -> bool:
    """True when a bar is worth drawing: rank 0, tqdm importable, `stream` (stderr) a terminal."""
    stream = sys.stderr if stream is None else stream
    if not is_main or not getattr(stream, 'isatty', lambda: False)():
        return False
    try:
        import tqdm  # noqa: F401  (installed with timm's huggingface_hub; listed in requirements.txt)
    except ImportError:
        return False
    return True


def progress(iterable: Iterable, total: Optional[int], desc: str, enabled: bool,
             logger: Optional[logging.Logger] = None) -> Iterable:
    """`iterable` itself when disabled; else the same items while a bar with ETA counts them.

    `total` is the number of steps the loop will run (it may stop before the iterable ends, e.g.
    --max-steps-per-epoch). The bar disappears when the loop ends, also when it ends by `break`
    or an exception; `logger`'s console output goes above the bar meanwhile.
    """
    if not enabled:
        return iterable
    return _with_bar(iterable, total, desc, logger)


def _with_bar(iterable, total, desc, logger):
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # leave=False: the finished bar is erased, so the terminal ends up showing just the log lines.
    with logging_redirect_tqdm(loggers=[logger or logging.root]), \
            tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        yield from bar


# ---------------------------------------------------------------------------------------------
# Per-epoch records: summary.csv and TensorBoard
# ---------------------------------------------------------------------------------------------
def epoch_record(epoch: int, train_stats: Mapping, metrics: Mapping) -> dict:
    """The numbers of one epoch, keyed by SUMMARY_COLUMNS, plus its training FPS: `train_stats` from
    utils.engine.train_one_epoch (loss, lr, fps), `metrics` from utils.engine.evaluate (loss, top1, top5)."""
    return dict(epoch=epoch, train_loss=train_stats['loss'], lr=train_stats['lr'], eval_loss=metrics['loss'],
                eval_top1=metrics['top1'], eval_top5=metrics['top5'], fps=train_stats['fps'])


def summary_row(record: Mapping) -> dict:
    """An `epoch_record` as summary.csv writes it: each column in its format, a missing value empty."""
    return {column: '' if record.get(column) is None else form.format(record[column])
            for column, (form, _) in _COLUMNS.items()}


def _epoch(row: dict):
    """The epoch of a summary.csv row, or None for a row that is not one (an edited or damaged file)."""
    try:
        return int(row.get('epoch') or '')
    except (TypeError, ValueError):
        return None


def write_summary_row(path: str, row: dict) -> None:
    """Write `row` as epoch `row['epoch']` of summary.csv.

    Rows of that epoch and later are dropped first, so a run resumed from an earlier checkpoint
    does not leave stale or duplicated epochs. The file is replaced atomically.
    """
    rows = []
    if os.path.exists(path):
        with open(path, newline='', encoding='utf-8', errors='replace') as f:
            rows = [r for r in csv.DictReader(f) if _epoch(r) is not None and _epoch(r) < int(row['epoch'])]
    rows.append({k: row[k] for k in SUMMARY_COLUMNS})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


class SummaryFile:
    """summary.csv of a run, one row per epoch, written after the epoch's checkpoint.

    A row that cannot be written (full disk, lost permissions) is reported in one log line and written
    with the next epoch's row, so a full disk does not stop a run whose checkpoint is safe; when the
    disk stays full, the next checkpoint write stops the run (and names the disk).
    """

    def __init__(self, path: str, logger: logging.Logger):
        self.path = path
        self.logger = logger
        self.pending = []

    def write(self, record: Mapping) -> None:
        """Write the row of an `epoch_record`."""
        self.pending.append(summary_row(record))
        try:
            for pending in self.pending:
                write_summary_row(self.path, pending)
        except OSError as error:
            epochs = ', '.join(str(r['epoch']) for r in self.pending)
            self.logger.warning(f'cannot write {self.path}: {error.strerror or error}; its rows for epoch(s) {epochs} '
                                'are written with the next epoch (the checkpoints are saved; free disk space)')
            return
        self.pending.clear()


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


class NullWriter:
    """Stands in when TensorBoard is off, missing, or on ranks other than 0."""

    def write_epoch(self, record: Mapping) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Writes one point per epoch for each value of an `epoch_record` that has a tag (step = epoch).

    TensorBoard is a view of summary.csv: when its files cannot be written (full disk), one log line says
    so and the run goes on without it.
    """

    def __init__(self, summary_writer, logger: Optional[logging.Logger] = None):
        self._writer = summary_writer
        self._logger = logger or logging.getLogger(__name__)

    def _failed(self, error: Exception) -> None:
        self._logger.warning(f'TensorBoard logs stopped: {getattr(error, "strerror", None) or error} '
                             '(summary.csv and the checkpoints are written as before)')
        writer, self._writer = self._writer, None
        try:
            writer.close()  # ends its writing thread; the file is lost anyway
        except Exception:
            pass

    def write_epoch(self, record: Mapping) -> None:
        if self._writer is None:
            return
        try:
            self._write(record)
        except Exception as error:  # the writer's own thread reports a failed write on the next call
            self._failed(error)

    def _write(self, record: Mapping) -> None:
        epoch = int(record['epoch'])
        for column, tag in EPOCH_TAGS.items():
            value = record.get(column)
            # An epoch without validation has no eval values; leave a gap rather than write a fake 0.
            if value is None or value == '' or not math.isfinite(float(value)):
                continue
            self._writer.add_scalar(tag, float(value), epoch)
        self._writer.flush()  # one flush per epoch: the curves are current when someone looks

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
        except Exception as error:
            self._failed(error)


def create_writer(enabled: bool, log_dir: str, is_main: bool, logger: Optional[logging.Logger] = None):
    """A TensorBoardWriter logging to `log_dir` when enabled, on rank 0, with tensorboard installed;
    otherwise a NullWriter (after one log line when TensorBoard was asked for but is not installed)."""
    if not (enabled and is_main):
        return NullWriter()
    logger = logger or logging.getLogger(__name__)
    try:
        # torch's SummaryWriter needs the `tensorboard` package and raises ImportError without it.
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info('--tensorboard: the tensorboard package is not installed, continuing without TensorBoard '
                    'logs (pip install tensorboard to get them; summary.csv and curves.png are written anyway)')
        return NullWriter()
    logger.info(f'TensorBoard logs: {log_dir} (view with: tensorboard --logdir {log_dir})')
    return TensorBoardWriter(SummaryWriter(log_dir=str(log_dir)), logger)


# ---------------------------------------------------------------------------------------------
# curves.png
# ---------------------------------------------------------------------------------------------
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
        written = plot_curves(run_dir / SUMMARY_FILE, run_dir / CURVES_FILE)
    except ImportError as err:
        logger.info(f"curves.png not written: {err} (pip install matplotlib, then python tools/plot_curves.py {run_dir})")
        return None
    except (OSError, ValueError) as err:
        logger.info(f"curves.png not written: {err}")
        return None
    logger.info(f"training curves: {written}")
    return written


# ---------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------
RESULTS_FORMAT = 1
MODES = ('train', 'eval')


class RunResults:
    """The results file of one invocation (format: the module docstring). Rank 0 holds one with a path;
    elsewhere, or without a path, it records nothing and writes nothing.

    A write that fails (full disk) is reported in one log line and tried again with the next one: the
    results file, like summary.csv, must not cost a run whose checkpoints are safe.
    """

    def __init__(self, path: Optional[str], mode: str, model: str, world_size: int, batch_size: int,
                 logger: Optional[logging.Logger] = None, started: Optional[float] = None):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, not {mode!r}')
        self.path = path
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.started = time.monotonic() if started is None else started  # time.monotonic() at the start of main
        self.data = dict(format=RESULTS_FORMAT, mode=mode, finished=False, model=model, world_size=world_size,
                         batch_size=batch_size, start_epoch=0, epochs=[], train_losses=[], best=None,
                         evaluation=None, e2e_seconds=None)
        self._reported = False

    def start(self, epoch: int) -> None:
        """The first epoch this invocation trains (a resumed run's)."""
        self.data['start_epoch'] = epoch

    def add_losses(self, losses: Iterable[float]) -> None:
        """The losses of the training log lines of a (possibly stopped) epoch, in order."""
        self.data['train_losses'].extend(float(loss) for loss in losses)

    def add_epoch(self, record: Mapping, best: Optional[tuple]) -> None:
        """An `epoch_record` and the best (top-1, epoch) so far; writes the file."""
        self.data['epochs'] = [e for e in self.data['epochs'] if e['epoch'] < record['epoch']] + [dict(record)]
        self.set_best(best)

    def set_best(self, best: Optional[tuple]) -> None:
        self.data['best'] = None if best is None else dict(top1=float(best[0]), epoch=int(best[1]))
        self.write()

    def set_evaluation(self, metrics: Mapping) -> None:
        """The metrics of an --eval run (utils.engine.evaluate); the run is finished."""
        self.data['evaluation'] = {k: metrics[k] for k in ('top1', 'top5', 'loss', 'images', 'skipped')}
        self.finish()

    def finish(self) -> None:
        self.data['finished'] = True
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        self.data['e2e_seconds'] = round(time.monotonic() - self.started, 3)
        tmp = f'{self.path}.tmp'
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(tmp, 'w', encoding='utf-8') as f:
                json.dump(self.data, f, indent=1)
                f.write('\n')
            os.replace(tmp, self.path)
        except OSError as error:
            if not self._reported:
                self._reported = True
                self.logger.warning(f'cannot write the results file {self.path}: {error.strerror or error}; it is '
                                    'written again after the next epoch (the checkpoints are saved)')


def read_results(path) -> dict:
    """A results file written by RunResults, checked; ValueError naming the file and what is wrong."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except OSError as error:
        raise ValueError(f'cannot read the results file {path}: {error.strerror or error}') from None
    except ValueError as error:
        raise ValueError(f'{path} is not a results file (not JSON: {error})') from None
    if not isinstance(data, dict) or data.get('format') != RESULTS_FORMAT or data.get('mode') not in MODES:
        raise ValueError(f'{path} is not a results file of this version (format {RESULTS_FORMAT}, written by main.py)')
    return data


class RunReport:
    """The per-epoch reports of a training run besides its log: summary.csv, TensorBoard and the results
    file, written in that order after the epoch's checkpoint; `finish` ends them when training ends.
    `summary` is None except on rank 0."""

    def __init__(self, summary: Optional[SummaryFile] = None, tensorboard=None, results: Optional[RunResults] = None):
        self.summary = summary
        self.tensorboard = tensorboard or NullWriter()
        self.results = results

    @classmethod
    def for_run(cls, run_dir: str, is_main: bool, logger: logging.Logger, tensorboard=None,
                results: Optional[RunResults] = None) -> 'RunReport':
        """<run dir>/summary.csv on rank 0, with the given TensorBoard writer and results file."""
        return cls(SummaryFile(os.path.join(run_dir, SUMMARY_FILE), logger) if is_main else None, tensorboard, results)

    def losses(self, losses: Iterable[float]) -> None:
        if self.results is not None:
            self.results.add_losses(losses)

    def epoch(self, record: Mapping, best: Optional[tuple]) -> None:
        if self.summary is not None:
            self.summary.write(record)
        self.tensorboard.write_epoch(record)
        if self.results is not None:
            self.results.add_epoch(record, best)

    def close(self) -> None:
        self.tensorboard.close()

    def finish(self, best: Optional[tuple], run_dir: str, logger: logging.Logger, ema_file: Optional[str] = None) -> None:
        """The end of training: close TensorBoard, finish the results file, draw curves.png (rank 0) and log the
        best (top-1, epoch) as the run's last line. With an EMA, `ema_file` is the checkpoint whose
        state_dict_ema holds the weights that best metric belongs to."""
        self.close()
        if self.results is not None:
            self.results.set_best(best)
            self.results.finish()
        if self.summary is not None:
            plot_run_curves(run_dir, logger)
        if best is not None:
            if ema_file:
                logger.info(f"best metric: the EMA weights' (state_dict_ema in {ema_file}; tools/export_weights.py "
                            '--ema exports them, --eval/--pretrained load the regular state_dict)')
            logger.info(f'*** Best metric: {best[0]:.3f} (epoch {best[1]})')

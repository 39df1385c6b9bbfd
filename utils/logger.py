"""Logging (rank 0 only, console + file), running meters and the per-epoch summary.csv.

Writing logs and the summary must never cost a run its checkpoints: a full disk is reported in one
line (not a traceback per log line) and the run goes on; the checkpoint writes, which come first,
decide whether it can (utils/checkpoint.py stops the run when a checkpoint cannot be written).
"""
import csv
import io
import logging
import os
import sys

LOGGER_NAME = 'van'
SUMMARY_FIELDS = ('epoch', 'train_loss', 'lr', 'eval_loss', 'eval_top1', 'eval_top5')


def setup_logger(is_main: bool, log_file: str = None) -> logging.Logger:
    """Rank 0 logs INFO to stdout (the launch scripts redirect and grep it) and to `log_file`;
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


class AverageMeter:
    """Last value and running mean of a host-side number (times, not device tensors)."""

    def __init__(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def _epoch(row: dict):
    """The epoch of a summary.csv row, or None for a row that is not one (an edited or damaged file)."""
    try:
        return int(row.get('epoch') or '')
    except (TypeError, ValueError):
        return None


def update_summary(path: str, row: dict) -> None:
    """Write `row` as epoch `row['epoch']` of summary.csv.

    Rows of that epoch and later are dropped first, so a run resumed from an earlier checkpoint
    does not leave stale or duplicated epochs. The file is replaced atomically.
    """
    rows = []
    if os.path.exists(path):
        with open(path, newline='', encoding='utf-8', errors='replace') as f:
            rows = [r for r in csv.DictReader(f) if _epoch(r) is not None and _epoch(r) < int(row['epoch'])]
    rows.append({k: row[k] for k in SUMMARY_FIELDS})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator='\n')
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

    def write(self, row: dict) -> None:
        self.pending.append(row)
        try:
            for pending in self.pending:
                update_summary(self.path, pending)
        except OSError as error:
            epochs = ', '.join(str(r['epoch']) for r in self.pending)
            self.logger.warning(f'cannot write {self.path}: {error.strerror or error}; its rows for epoch(s) {epochs} '
                                'are written with the next epoch (the checkpoints are saved; free disk space)')
            return
        self.pending.clear()

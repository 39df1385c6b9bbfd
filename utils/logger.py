"""Logging (rank 0 only, console + file), running meters and the per-epoch summary.csv."""
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
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
        logger.addHandler(file_handler)
    return logger


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


def update_summary(path: str, row: dict) -> None:
    """Write `row` as epoch `row['epoch']` of summary.csv.

    Rows of that epoch and later are dropped first, so a run resumed from an earlier checkpoint
    does not leave stale or duplicated epochs. The file is replaced atomically.
    """
    rows = []
    if os.path.exists(path):
        with open(path, newline='') as f:
            rows = [r for r in csv.DictReader(f) if int(r['epoch']) < int(row['epoch'])]
    rows.append({k: row[k] for k in SUMMARY_FIELDS})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)

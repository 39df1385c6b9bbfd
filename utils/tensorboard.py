"""Optional TensorBoard scalars for a run (`--tensorboard`).

`create_writer` returns an object with `write_epoch(row)` and `close()` in every case, so the training
loop has one code path: a real writer on rank 0 when TensorBoard is requested and installed, else a
writer that does nothing. TensorBoard is optional (not in requirements.txt): when it is requested
but missing, one log line says so and training goes on.
"""
import logging
import math
from typing import Mapping, Optional

__all__ = ['create_writer', 'NullWriter', 'TensorBoardWriter', 'EPOCH_TAGS']

# summary.csv column -> TensorBoard tag; the same numbers as the csv, grouped the way the plots are.
EPOCH_TAGS = {
    'train_loss': 'train/loss',
    'lr': 'train/lr',
    'eval_loss': 'eval/loss',
    'eval_top1': 'eval/acc1',
    'eval_top5': 'eval/acc5',
}


class NullWriter:
    """Stands in when TensorBoard is off, missing, or on ranks other than 0."""

    def write_epoch(self, row: Mapping) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Writes one point per epoch for each summary.csv column (step = epoch).

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

    def write_epoch(self, row: Mapping) -> None:
        if self._writer is None:
            return
        try:
            self._write(row)
        except Exception as error:  # the writer's own thread reports a failed write on the next call
            self._failed(error)

    def _write(self, row: Mapping) -> None:
        epoch = int(row['epoch'])
        for column, tag in EPOCH_TAGS.items():
            value = row.get(column)
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

"""Progress bars with ETA for the training and evaluation loops, only where a person watches.

A bar is drawn (tqdm, on stderr) only on rank 0 and only when stderr is an interactive terminal.
Under the ModelZoo launch scripts, nohup, CI or a job scheduler stderr is a file or a pipe, so the
loops run exactly as without this module and the log keeps the ModelZoo lines unchanged.
While a bar is shown, the logger's console handlers write through `tqdm.write`, so a `Train:` line
prints above the bar instead of through it; file handlers are not touched (the log file gets the
same lines, byte for byte).
"""
import logging
import sys
from typing import Iterable, Optional

__all__ = ['progress_enabled', 'progress']


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

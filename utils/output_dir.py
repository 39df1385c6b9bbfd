"""Checking that the run directory can take checkpoints before training starts.

Finding out after the first epoch (or after hours) that the output folder is read-only or the
disk is full loses that work. `check_output_dir` creates the folder, writes and removes a probe
file, and compares the free space with what checkpoints will need, so such problems are one
clear message at start. Saving itself must still handle a disk that fills up later (see
utils/checkpoint.py: a failed write removes its temporary file and keeps the previous checkpoint).
"""
import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch

# last.pth.tar, model_best.pth.tar, checkpoint-<epoch>.pth.tar, a recovery checkpoint and the
# temporary file of the one being written: a run needs room for a few checkpoints at once.
CHECKPOINTS_ON_DISK = 3


class OutputDirError(RuntimeError):
    """The run directory cannot hold the run's files; the message says why and what to do."""


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer_copies: int = 2, ema: bool = False) -> int:
    """Rough size of one training checkpoint: weights, `optimizer_copies` optimizer tensors per
    parameter (AdamW keeps two) and an EMA copy, all in float32."""
    weights = sum(t.numel() * 4 for t in model.state_dict().values() if torch.is_tensor(t))
    return weights * (1 + optimizer_copies + (1 if ema else 0))


def check_output_dir(path, needed_bytes: int = 0) -> Path:
    """Create `path` if needed and make sure a file can be written there and `needed_bytes` fit."""
    run_dir = Path(path).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=run_dir)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        hint = {
            errno.EACCES: "choose another --output or fix the folder's permissions",
            errno.EPERM: "choose another --output or fix the folder's permissions",
            errno.EROFS: "the file system is read-only; choose another --output",
            errno.ENOSPC: "the disk is full; free space or choose another --output",
            errno.EDQUOT: "the disk quota is used up; free space or choose another --output",
            errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --output",
            errno.EEXIST: "a part of the path is a file, not a folder; choose another --output",
        }.get(e.errno, "choose another --output")
        raise OutputDirError(f"cannot write to output folder {run_dir}: {e.strerror}; {hint}") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise OutputDirError(
            f"only {free / 2**20:.0f} MiB free on the disk of {run_dir}, but the run's checkpoints need about "
            f"{needed_bytes / 2**20:.0f} MiB; free space or choose another --output")
    return run_dir

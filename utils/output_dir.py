"""Checking that the run directory can take checkpoints before training starts, and owning it.

Finding out after the first epoch (or after hours) that the output folder is read-only or the
disk is full loses that work. `check_output_dir` creates the folder, writes and removes a probe
file, and compares the free space with what checkpoints will need, so such problems are one
clear message at start. Saving itself must still handle a disk that fills up later (see
utils/checkpoint.py: a failed write removes its temporary file and keeps the previous checkpoint).

Two runs writing into one run dir (the same --experiment twice, or two `--resume auto`) would delete
each other's temporary files and mix their checkpoints and logs. `RunDirLock` makes a run own its
dir: a lock on <run dir>/run.lock, held by rank 0 for the whole run, which records who holds it.
It is a POSIX record lock (fcntl.lockf), which the kernel drops when the holding process dies,
however it dies, so a lock left by a killed run is simply taken over. Unlike flock, such a lock
is not inherited by the DataLoader workers that the process forks, so a killed run's orphaned
workers do not keep its lock alive while torchrun restarts it.
"""
import datetime
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks, runs are not protected from each other
    fcntl = None

import torch

from utils.errors import OutputDirError, RunDirBusyError

# last.pth.tar, model_best.pth.tar, checkpoint-<epoch>.pth.tar, a recovery checkpoint and the
# temporary file of the one being written: a run needs room for a few checkpoints at once.
CHECKPOINTS_ON_DISK = 3


LOCK_FILE = 'run.lock'


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


def _describe_holder(record: dict) -> str:
    parts = [f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"]
    if record.get('started'):
        parts.append(f"started {record['started']}")
    if record.get('command'):
        parts.append(f"command: {record['command']}")
    return ', '.join(parts)


class RunDirLock:
    """Exclusive ownership of a run dir while a run writes into it (see the module docstring).

        with RunDirLock(run_dir) as lock:   # RunDirBusyError when another live run holds it
            ...                             # lock.taken_over: the record of a dead holder, or None

    The lock file stays in the run dir; while held it names the holder (pid, host, start time,
    command), and a run that ends normally empties it.
    """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.taken_over: Optional[dict] = None
        self.unsupported: Optional[str] = None  # why the file system could not lock it
        self._fd: Optional[int] = None

    def _read(self) -> dict:
        os.lseek(self._fd, 0, os.SEEK_SET)
        text = os.read(self._fd, 1 << 16).decode('utf-8', 'replace').strip()
        try:
            record = json.loads(text) if text else {}
        except ValueError:
            record = {'pid': '?', 'command': text[:200]}
        return record if isinstance(record, dict) else {}

    def acquire(self) -> 'RunDirLock':
        if fcntl is None:
            return self
        try:
            # Opened once and never reopened: closing any descriptor of the file would drop a POSIX lock.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputDirError(f'cannot create the lock file {self.path}: {error.strerror}; choose another '
                                 '--output or fix the folder\'s permissions') from None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                # A file system without locks (some network and FUSE mounts): the run goes on unprotected.
                self._close()
                self.unsupported = f'{self.path}: {error.strerror}'
                return self
            holder = self._read()
            self._close()
            who = _describe_holder(holder) if holder else 'its details are not written yet'
            raise RunDirBusyError(
                f'run dir {self.path.parent} is in use by another run ({who}); two runs in one dir would '
                'overwrite each other\'s checkpoints. Wait for that run to end (or stop it), or choose another '
                '--experiment') from None
        previous = self._read()
        if previous and previous.get('pid') != os.getpid():
            self.taken_over = previous
        record = dict(pid=os.getpid(), host=socket.gethostname(),
                      started=datetime.datetime.now().isoformat(timespec='seconds'),
                      command=' '.join(sys.argv))
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(record) + '\n').encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its description is missing
        return self

    def describe_takeover(self) -> Optional[str]:
        """The log line for a lock left by a run that is gone (killed, crashed, lost its node), or for a
        file system that cannot lock; None when there is nothing to say."""
        if self.unsupported:
            return (f'cannot lock the run dir ({self.unsupported}); a second run started in it would not be '
                    'stopped, so give every run its own --experiment')
        if not self.taken_over:
            return None
        return (f'{self.path}: the run that held this run dir ({_describe_holder(self.taken_over)}) is gone; '
                'taking it over')

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # ended normally: nothing for the next run to report
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # also drops the lock

    def __enter__(self) -> 'RunDirLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

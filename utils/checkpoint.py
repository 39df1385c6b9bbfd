"""The files of a run: where its run dir is, what may be written there, and its checkpoints.

Run dir. `resolve_run_dir` names it (--output/--experiment, or for --resume auto the newest run that
holds a checkpoint); `prepare_run_dir` makes sure rank 0 can write there before anything is
computed (`check_output_dir`: creates the folder, writes a probe file, compares the free space with
what the checkpoints need) and takes the run's lock. Finding out after the first epoch (or after
hours) that the folder is read-only or the disk is full would lose that work.

Two runs writing into one run dir (the same --experiment twice, or two `--resume auto`) would delete
each other's temporary files and mix their checkpoints and logs. `RunDirLock` makes a run own its
dir: a lock on <run dir>/run.lock, held by rank 0 for the whole run, which records who holds it.
It is a POSIX record lock (fcntl.lockf), which the kernel drops when the holding process dies,
however it dies, so a lock left by a killed run is simply taken over. Unlike flock, such a lock
is not inherited by the DataLoader workers that the process forks, so a killed run's orphaned
workers do not keep its lock alive while torchrun restarts it.

Checkpoints. last.pth.tar (every epoch), model_best.pth.tar, checkpoint-<epoch>.pth.tar (the best
--checkpoint-hist epochs), recovery.pth.tar (a point inside an epoch, utils.resume); the names are
the constants below and nowhere else. A file is written to a temporary name, flushed, fsynced and
renamed over the target, so a crash leaves either the old complete file or the new one; a failed
write (full disk) removes its temporary file and keeps the previous one (CheckpointWriteError).
Reading is safe (models.weights.safe_load) and checks every key against CHECKPOINT_FIELDS, so a damaged or
foreign file is one message, not a traceback in the middle of resuming. A state holding NaN or inf
is never written (`nonfinite_tensors`). Which checkpoint a run continues from is found here
(`find_checkpoint`); loading it into the run is utils.resume's `restore_training`.
"""
import argparse
import contextlib
import datetime
import errno
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Tuple

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks, runs are not protected from each other
    fcntl = None

import torch
import yaml

from models.weights import safe_load
from utils.device import DistEnv, all_reduce_sum
from utils.errors import CheckpointError, CheckpointWriteError, NonFiniteStateError, OutputDirError, RunDirBusyError

LAST_FILE = 'last.pth.tar'
BEST_FILE = 'model_best.pth.tar'
RECOVERY_FILE = 'recovery.pth.tar'
HISTORY_FILE = 'checkpoint-{epoch}.pth.tar'  # one of the best --checkpoint-hist epochs
ARGS_FILE = 'args.yaml'
LOCK_FILE = 'run.lock'
CHECKPOINT_FILES = (LAST_FILE, BEST_FILE, RECOVERY_FILE)
TEMP_PATTERN = '*.pth.tar.tmp*'  # what a process killed while writing leaves behind
REQUIRED_RESUME_KEYS = ('epoch', 'state_dict', 'optimizer')
# last.pth.tar, model_best.pth.tar, checkpoint-<epoch>.pth.tar, a recovery checkpoint and the
# temporary file of the one being written: a run needs room for a few checkpoints at once.
CHECKPOINTS_ON_DISK = 3


# ---------------------------------------------------------------------------------------------
# The run dir
# ---------------------------------------------------------------------------------------------
def resolve_run_dir(output: str, experiment: Optional[str], resume_auto: bool, default_name: str) -> str:
    """--output/--experiment, or for --resume auto without --experiment the newest run under --output
    that holds a checkpoint, else a new <time>-<default_name> dir."""
    if experiment:
        return os.path.join(output, experiment)
    if resume_auto and os.path.isdir(output):
        runs = [os.path.join(output, d) for d in os.listdir(output)]
        saved = {d: [os.path.getmtime(p) for p in (os.path.join(d, n) for n in (LAST_FILE, RECOVERY_FILE))
                     if os.path.isfile(p)] for d in runs}
        saved = {d: max(times) for d, times in saved.items() if times}
        if saved:
            return max(saved, key=saved.get)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return os.path.join(output, f'{stamp}-{default_name}')


def prepare_run_dir(run_dir: str, dist_env: DistEnv, resources: contextlib.ExitStack) -> Optional['RunDirLock']:
    """Rank 0 makes sure the run dir can be written and takes its lock (held on `resources`) before touching
    anything in it; every rank learns whether that worked, so all stop together with a message. Returns the
    lock (rank 0) or None."""
    run_lock, failure = None, None
    if dist_env.is_main:
        try:
            check_output_dir(run_dir)  # an unwritable folder is one message now, not a lost epoch later
            run_lock = resources.enter_context(RunDirLock(run_dir))
            remove_partial_files(run_dir)  # of a killed run; never of a live one, which holds the lock
        except OutputDirError as error:
            failure = error
    failed = all_reduce_sum(torch.tensor([float(failure is not None)], device=dist_env.device), dist_env)
    if failure is not None:
        raise failure
    if failed.item():
        raise OutputDirError(f'process 0 cannot use the run dir {run_dir} (its message says why)')
    return run_lock


def save_run_args(run_dir: str, options: Mapping) -> None:
    """<run dir>/args.yaml: the options the run uses (plain values, utils.options.plain_args)."""
    path = os.path.join(run_dir, ARGS_FILE)
    try:
        with open(path, 'w') as f:
            yaml.safe_dump(dict(options), f, sort_keys=True)
    except OSError as error:
        raise OutputDirError(f'cannot write {path}: {error.strerror}; free disk space or choose another --output') from None


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


# ---------------------------------------------------------------------------------------------
# Writing, reading and finding checkpoints
# ---------------------------------------------------------------------------------------------
def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary_for(path: str):
    """Yield a temporary name next to `path`; on any failure remove it and keep the old `path`."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        yield tmp
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError):
            kept = 'the previous version is kept' if os.path.exists(path) else 'nothing was written'
            raise CheckpointWriteError(f'cannot write checkpoint {path!r}: {error.strerror or error} ({kept}); '
                                  'free disk space or choose another --output, then --resume auto') from None
        raise


class _WriteAll:
    """Unbuffered file-like for torch.save that writes every byte or raises the OSError. torch's zip
    writer reports a failed or partial write (full disk) only as 'unexpected pos', hiding the cause."""

    def __init__(self, raw):
        self.raw = raw
        self.error = None

    def write(self, data) -> int:
        view = memoryview(data).cast('B')
        done = 0
        try:
            while done < len(view):
                done += self.raw.write(view[done:])
        except OSError as error:
            self.error = error
            raise
        return done

    def flush(self) -> None:
        pass


def atomic_save(obj, path: str) -> None:
    with _temporary_for(path) as tmp:
        with open(tmp, 'wb', buffering=0) as raw:
            writer = _WriteAll(raw)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_copy(src: str, dst: str) -> None:
    with _temporary_for(dst) as tmp:
        with open(src, 'rb') as fin, open(tmp, 'wb') as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def remove_partial_files(run_dir: str) -> list:
    """Delete temporary files of writes that a killed process (kill -9, power loss) never finished."""
    partial = glob.glob(os.path.join(run_dir, TEMP_PATTERN))
    for path in partial:
        with contextlib.suppress(OSError):
            os.remove(path)
    return partial


def read_file(path: str):
    """Load a .pth/.pth.tar with models.weights.safe_load; any failure becomes one CheckpointError message."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    try:
        return safe_load(path)
    except Exception as error:  # unsafe pickle, truncated file, not a torch file ...
        raise CheckpointError(f'cannot read checkpoint {path!r}: {error}') from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool (True is 1 to Python, not to a checkpoint)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_dict(value) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


def _is_recovery(value) -> bool:
    return isinstance(value, Mapping) and all(_is_int(value.get(k)) and value[k] >= 0 for k in RECOVERY_COUNTS) \
        and isinstance(value.get('rng'), list)


RECOVERY_COUNTS = ('epoch', 'steps_done', 'samples_seen', 'num_updates')

# What each key of a training checkpoint must hold (None is allowed for the optional ones): a file with
# the right keys but other contents (edited, from another program, damaged in a way the zip format
# does not notice) is refused with the key and the reason, never a traceback in the middle of resuming.
CHECKPOINT_FIELDS = {
    'epoch': (lambda v: _is_int(v) and v >= -1, 'an epoch number'),
    'state_dict': (lambda v: _is_tensor_dict(v) and len(v) > 0, 'a dict of weight tensors'),
    'optimizer': (lambda v: isinstance(v, Mapping) and isinstance(v.get('state'), Mapping)
                  and isinstance(v.get('param_groups'), list) and all(isinstance(g, Mapping) for g in v['param_groups']),
                  "an optimizer state (a dict with 'state' and 'param_groups')"),
    'scheduler': (lambda v: isinstance(v, Mapping), 'a scheduler state dict'),
    'state_dict_ema': (_is_tensor_dict, 'a dict of weight tensors'),
    'args': (lambda v: isinstance(v, (Mapping, argparse.Namespace)), 'the options of the run'),
    'class_to_idx': (lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and _is_int(i) for k, i in v.items()),
                     'a dict of class name: index'),
    'metric': (is_number, 'a number'),
    'best_metric': (is_number, 'a number'),
    'best_epoch': (_is_int, 'an epoch number'),
    'checkpoint_history': (lambda v: isinstance(v, list) and all(
        isinstance(h, (list, tuple)) and len(h) == 2 and is_number(h[0]) and _is_int(h[1]) for h in v),
        'a list of [metric, epoch] pairs'),
    'recovery': (_is_recovery, f'a recovery record ({", ".join(RECOVERY_COUNTS)}, rng)'),
    'train_samples': (lambda v: _is_int(v) and v >= 0, 'a number of images'),
    'amp_scaler': (lambda v: isinstance(v, Mapping), 'a loss scaler state dict'),
    'amp': (lambda v: isinstance(v, Mapping), 'an apex amp state dict'),
}


def read_training_checkpoint(path: str) -> dict:
    """A checkpoint written by main.py (or a timm-style script): must hold epoch/state_dict/optimizer, and
    every key it has must hold what CHECKPOINT_FIELDS says."""
    checkpoint = read_file(path)
    missing = [k for k in REQUIRED_RESUME_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f'{path!r} is not a training checkpoint (missing {", ".join(missing)}); '
                              'to start from weights only, use --pretrained instead of --resume')
    wrong = [f'{key} should be {what}, not {describe_value(checkpoint[key])}' for key, (valid, what) in CHECKPOINT_FIELDS.items()
             if checkpoint.get(key) is not None and not valid(checkpoint[key])]
    wrong += [f'{key} is missing' for key in REQUIRED_RESUME_KEYS if checkpoint[key] is None]
    if wrong:
        raise CheckpointError(f'{path!r} is damaged or was not written by this training script: {"; ".join(wrong)}')
    return checkpoint


def describe_value(value) -> str:
    """A value in a message: its type and the start of its repr."""
    text = repr(value)
    return f'{type(value).__name__} {text[:40]}{"..." if len(text) > 40 else ""}'


def run_options(checkpoint) -> dict:
    """The options a checkpoint's run was started with, as a dict (main.py stores a dict, timm scripts a
    Namespace, very old files and bare weights nothing)."""
    args = checkpoint.get('args') if isinstance(checkpoint, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def _progress(checkpoint: dict):
    # A recovery checkpoint written inside epoch e has epoch = e - 1 (the last completed one) and
    # counts the steps done in e, so it is newer than last.pth.tar of e - 1 and older than that of e.
    return checkpoint['epoch'], (checkpoint.get('recovery') or {}).get('steps_done', 0)


def find_resume_checkpoint(run_dir: str, logger=None):
    """The newest complete training checkpoint in `run_dir` (highest epoch, then furthest inside the
    next epoch), or None when the dir holds no checkpoint. Returns (path, checkpoint).

    Unreadable files are skipped (and logged); when every checkpoint there is unreadable, CheckpointError:
    starting from scratch would overwrite them, and they may be all that is left of a long run.
    """
    candidates = [os.path.join(run_dir, name) for name in CHECKPOINT_FILES]
    candidates += sorted(glob.glob(os.path.join(run_dir, HISTORY_FILE.format(epoch='*'))))
    best, unreadable = None, []
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            checkpoint = read_training_checkpoint(path)
        except CheckpointError as error:
            unreadable.append(str(error))
            continue
        if best is None or _progress(checkpoint) > _progress(best[1]):
            best = (path, checkpoint)
    if unreadable and best is None:
        raise CheckpointError(f'--resume auto: no checkpoint in {run_dir} can be read, so the run cannot continue, and '
                              'starting over would overwrite them (they are left as they are): ' + '; '.join(unreadable) +
                              '. Resume from a good copy with --resume PATH, or move the run dir away to start over')
    if unreadable and logger is not None:
        logger.info(f'--resume auto: skipping {len(unreadable)} unreadable file(s): ' + '; '.join(unreadable))
    return best


def find_checkpoint(resume: Optional[str], search_dir: Optional[str], logger, for_eval: bool = False):
    """(path, checkpoint) that --resume names, or (None, None) when there is none to resume.

    resume: a path, 'auto' (the newest complete checkpoint in `search_dir`: the run dir, or for
    evaluation --output/--experiment) or None. For evaluation 'auto' must find one.
    """
    if resume == 'auto':
        found = find_resume_checkpoint(search_dir, logger)
        if found is None and for_eval:
            raise CheckpointError(f'no checkpoint to evaluate in {search_dir!r}')
        if found is None:
            logger.info(f'--resume auto: no checkpoint in {search_dir}, starting from scratch')
        return found or (None, None)
    if resume:
        return resume, read_training_checkpoint(resume)
    return None, None


def training_state(model, optimizer, scheduler, precision, model_ema, arch: str, run_args: dict,
                   class_to_idx: dict, train_samples: Optional[int] = None) -> dict:
    """The keys every checkpoint of a training run holds; RunCheckpoints adds epoch, metric and history.

    `run_args` is the command line as a plain dict (weights_only loading accepts nothing else).
    `train_samples`, the size of the training set, lets a resumed run see that the dataset changed.
    """
    state = dict(arch=arch, state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
                 scheduler=scheduler.state_dict(), version=2, args=run_args, class_to_idx=class_to_idx)
    if train_samples is not None:
        state['train_samples'] = train_samples
    if precision.checkpoint_key:
        state[precision.checkpoint_key] = precision.state_dict()
    if model_ema is not None:
        state['state_dict_ema'] = model_ema.module.state_dict()
    return state


def nonfinite_tensors(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the floating-point tensors holding a NaN or inf, with one device-to-host copy per device."""
    by_device = {}
    for name, tensor in named_tensors:
        if torch.is_tensor(tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            by_device.setdefault(tensor.device, []).append((name, torch.isfinite(tensor).all()))
    bad = []
    for pairs in by_device.values():
        finite = torch.stack([flag for _, flag in pairs]).tolist()
        bad += [name for (name, _), ok in zip(pairs, finite) if not ok]
    return bad


def _refuse_nonfinite(state: dict, what: str) -> None:
    """The saver's own guard (training checks every rank first, utils.engine.check_finite_state): a state
    with NaN or inf weights or statistics is never written, so it can never replace a good file."""
    bad = nonfinite_tensors((state.get('state_dict') or {}).items())
    bad += [f'EMA {name}' for name in nonfinite_tensors((state.get('state_dict_ema') or {}).items())]
    if bad:
        raise NonFiniteStateError(f'not saving {what}: {len(bad)} tensors hold NaN or inf ({", ".join(bad[:5])}'
                                  f'{" ..." if len(bad) > 5 else ""}); the checkpoints already written are kept')


def recovery_path(run_dir: str) -> str:
    return os.path.join(run_dir, RECOVERY_FILE)


class RunCheckpoints:
    """Writes the checkpoints of one run (last, best, the best `max_history` epochs, recovery points);
    rank 0 only. (Not timm's CheckpointSaver: this one is given the state to save.)"""

    def __init__(self, run_dir: str, max_history: int = 10, history=None, best=None):
        self.run_dir = run_dir
        self.max_history = max_history
        # [(metric, epoch)] of the checkpoint-<epoch> files written so far
        self.history = [tuple(h) for h in (history or [])]
        self.best = tuple(best) if best else None  # (metric, epoch)

    def _history_path(self, epoch):
        return os.path.join(self.run_dir, HISTORY_FILE.format(epoch=epoch))

    def save(self, state: dict, epoch: int, metric: float):
        """Save epoch `epoch` (whose metric is higher-is-better); returns the best (metric, epoch)."""
        _refuse_nonfinite(state, f'epoch {epoch}')
        is_best = self.best is None or metric > self.best[0]
        if is_best:
            self.best = (metric, epoch)
        # Re-saving an epoch (a resumed run repeating it) replaces its old history entry.
        history = [h for h in self.history if h[1] != epoch]
        keep_in_history = self.max_history > 0 and (
            len(history) < self.max_history or metric > min(history)[0])
        removed = []
        if keep_in_history:
            history = sorted(history + [(metric, epoch)], reverse=True)
            removed, history = history[self.max_history:], history[:self.max_history]
        self.history = history
        state = dict(state, epoch=epoch, metric=metric, best_metric=self.best[0], best_epoch=self.best[1],
                     checkpoint_history=[list(h) for h in self.history])
        last = os.path.join(self.run_dir, LAST_FILE)
        atomic_save(state, last)
        if keep_in_history:
            atomic_copy(last, self._history_path(epoch))
        for _, old_epoch in removed:
            if os.path.exists(self._history_path(old_epoch)):
                os.remove(self._history_path(old_epoch))
        if is_best:
            atomic_copy(last, os.path.join(self.run_dir, BEST_FILE))
        if os.path.exists(self.recovery_path):  # a point inside this epoch, superseded now
            os.remove(self.recovery_path)
        return self.best

    @property
    def recovery_path(self) -> str:
        return recovery_path(self.run_dir)

    def save_recovery(self, state: dict, epoch: int, record: dict) -> str:
        """Write the recovery checkpoint of a point inside `epoch` (record: utils.resume.recovery_record);
        it carries the best and the history so that a run resumed from it keeps them. Returns its path."""
        _refuse_nonfinite(state, f'the recovery point in epoch {epoch}')
        atomic_save(dict(state, epoch=epoch - 1, checkpoint_history=[list(h) for h in self.history],
                         best_metric=self.best[0] if self.best else None,
                         best_epoch=self.best[1] if self.best else None, recovery=record), self.recovery_path)
        return self.recovery_path

"""Training checkpoints: atomic writes, best-N history, safe reading, and finding one to resume.

Files in the run dir: last.pth.tar (every epoch), model_best.pth.tar, checkpoint-<epoch>.pth.tar
(the best --checkpoint-hist epochs), recovery.pth.tar (mid-epoch, see utils.preemption). A file is
written to a temporary name, flushed, fsynced and renamed over the target, so a crash leaves either
the old complete file or the new one; a failed write (full disk) removes its temporary file.
"""
import argparse
import contextlib
import glob
import os
import re
import shutil
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from models.weights import HEAD_KEYS, align_head_to_classes, safe_load
from utils.errors import CheckpointError, CheckpointWriteError, NonFiniteStateError
from utils.nonfinite import nonfinite_tensors
from utils.preemption import RECOVERY_FILE

CHECKPOINT_FILES = ('last.pth.tar', 'model_best.pth.tar', RECOVERY_FILE)
TEMP_PATTERN = '*.pth.tar.tmp*'  # what a process killed while writing leaves behind
HISTORY_PATTERN = re.compile(r'checkpoint-(\d+)\.pth\.tar$')
REQUIRED_RESUME_KEYS = ('epoch', 'state_dict', 'optimizer')


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
    """Load a .pth/.pth.tar safely (weights_only); any failure becomes one CheckpointError message."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    try:
        return safe_load(path)
    except Exception as error:  # unsafe pickle, truncated file, not a torch file ...
        raise CheckpointError(f'cannot read checkpoint {path!r}: {error}') from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
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
    'metric': (_is_number, 'a number'),
    'best_metric': (_is_number, 'a number'),
    'best_epoch': (_is_int, 'an epoch number'),
    'checkpoint_history': (lambda v: isinstance(v, list) and all(
        isinstance(h, (list, tuple)) and len(h) == 2 and _is_number(h[0]) and _is_int(h[1]) for h in v),
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
    wrong = [f'{key} should be {what}, not {_summary(checkpoint[key])}' for key, (valid, what) in CHECKPOINT_FIELDS.items()
             if checkpoint.get(key) is not None and not valid(checkpoint[key])]
    wrong += [f'{key} is missing' for key in REQUIRED_RESUME_KEYS if checkpoint[key] is None]
    if wrong:
        raise CheckpointError(f'{path!r} is damaged or was not written by this training script: {"; ".join(wrong)}')
    return checkpoint


def _summary(value) -> str:
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
    candidates += sorted(glob.glob(os.path.join(run_dir, 'checkpoint-*.pth.tar')))
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


def training_state(model, optimizer, scheduler, precision, model_ema, arch: str, run_args: dict,
                   class_to_idx: dict, train_samples: Optional[int] = None) -> dict:
    """The keys every checkpoint of a training run holds; CheckpointSaver adds epoch, metric and history.

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


@dataclass
class ResumePoint:
    """Where a run continues: its first epoch, the saver's (metric, epoch) best and history, and for a
    recovery checkpoint the position inside that epoch (utils.preemption.recovery_record)."""
    epoch: int = 0
    best: Optional[tuple] = None
    history: Optional[list] = None
    recovery: Optional[dict] = None


def _same_kind(expected, found) -> bool:
    if _is_number(expected) or isinstance(expected, bool):
        return _is_number(found) or isinstance(found, bool)
    if expected is None or found is None:
        return True  # optional settings (e.g. foreach=None) may be set either way
    if isinstance(expected, (list, tuple)):
        return isinstance(found, (list, tuple))
    return isinstance(found, type(expected)) or isinstance(expected, type(found))


def _mismatches(expected: Mapping, found: Mapping, where: str) -> list:
    """Settings that `found` holds as another kind of value than a freshly built state (a list for a number...)."""
    return [f'{where}{key} is {_summary(found[key])}' for key, value in expected.items()
            if key != 'params' and key in found and not _same_kind(value, found[key])]


def _load_state(what: str, target, state, path: str, hint: str = '') -> None:
    """target.load_state_dict(state), refusing a state that does not have the shape of target's own.

    Keys a state lacks are fine where the class fills them in (newer torch/timm versions add settings with
    defaults); an optimizer whose groups still lack a setting after loading was saved by another class.
    """
    fresh = target.state_dict()
    problems = []
    if isinstance(fresh, Mapping) and isinstance(state, Mapping):
        if what == 'optimizer':
            groups, saved = fresh.get('param_groups', []), state.get('param_groups', [])
            if len(groups) != len(saved):
                problems.append(f'{len(saved)} parameter groups instead of {len(groups)}')
            for i, (group, saved_group) in enumerate(zip(groups, saved)):
                problems += _mismatches(group, saved_group, f'group {i}: ')
        else:
            problems += _mismatches(fresh, state, '')
    if not problems:
        try:
            target.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as error:
            problems.append(f'{type(error).__name__}: {error}')
    if not problems and what == 'optimizer':
        problems = [f'group {i}: {key} is missing' for i, (group, loaded) in
                    enumerate(zip(fresh['param_groups'], target.param_groups)) for key in group if key not in loaded]
    if problems:
        raise CheckpointError(f'the {what} state in {path!r} does not fit this run\'s {type(target).__name__} '
                              f'({"; ".join(problems[:4])}){hint}')


def restore_training(checkpoint: dict, path: str, model, optimizer, scheduler, precision, model_ema,
                     class_to_idx: dict, run_dir: Optional[str], logger, keep_schedule: bool = True,
                     weights_only: bool = False, train_samples: Optional[int] = None) -> ResumePoint:
    """Load a training checkpoint (checked by read_training_checkpoint) into the run; a checkpoint of
    another model or dataset is refused.

    weights_only: evaluation, which needs neither the optimizer nor the schedule. keep_schedule=False
    (the schedule options changed) leaves the new scheduler as built. train_samples: the size of the
    training set now; a recovery point inside an epoch is only found again in the same training set.
    """
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v
                  for k, v in checkpoint['state_dict'].items()}
    saved_classes = checkpoint.get('class_to_idx')
    if saved_classes is not None and class_to_idx is not None and saved_classes != class_to_idx:
        if weights_only and set(saved_classes) == set(class_to_idx):
            # Evaluation only needs each output to be the dataset's class of its name (models.weights).
            head = {k: state_dict[k] for k in HEAD_KEYS if k in state_dict}
            try:
                notes = align_head_to_classes(head, dict(saved_classes), class_to_idx, path, require_head=True)
            except ValueError as error:
                raise CheckpointError(str(error)) from None
            state_dict.update(head)
            for note in notes:
                logger.info(note)
        else:
            same = set(saved_classes) == set(class_to_idx)
            raise CheckpointError(
                f'{path!r} numbers its classes in another order than the dataset (its class folders sort '
                'differently); training cannot continue on other class numbers: use the dataset it was trained on'
                if same else f'{path!r} was trained on classes {sorted(saved_classes)[:10]} '
                f'but the dataset has {sorted(class_to_idx)[:10]}: use the matching --data_path')
    try:
        model.load_state_dict(state_dict)
        if model_ema is not None and checkpoint.get('state_dict_ema') is not None:
            model_ema.module.load_state_dict(checkpoint['state_dict_ema'])
        elif model_ema is not None:  # a run without --model-ema before: the average starts from these weights
            model_ema.module.load_state_dict(model.state_dict())
            logger.info(f'{path!r} holds no EMA weights: the EMA starts from its weights')
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f'{path!r} (arch {checkpoint.get("arch")!r}) does not fit --model '
                              f'{getattr(model, "pretrained_cfg", {}).get("architecture", "?")}: {first_line}') from None
    recovery = None if weights_only else checkpoint.get('recovery')
    if recovery is not None and train_samples is not None:
        _check_same_training_set(checkpoint, path, recovery, train_samples)
    if not weights_only:
        saved_opt = run_options(checkpoint).get('opt')
        _load_state('optimizer', optimizer, checkpoint['optimizer'], path,
                    f'; it was written with --opt {saved_opt}' if saved_opt else '')
        if precision.checkpoint_key and checkpoint.get(precision.checkpoint_key) is not None:
            _load_state('loss scaler', precision, checkpoint[precision.checkpoint_key], path)
        if checkpoint.get('scheduler'):
            if keep_schedule:
                _load_state('scheduler', scheduler, checkpoint['scheduler'], path)
            else:
                logger.info('schedule options differ from the checkpoint\'s: following the new ones')
    same_dir = run_dir and os.path.abspath(os.path.dirname(path)) == os.path.abspath(run_dir)
    logger.info(f'resumed from {path} (epoch {checkpoint["epoch"]} done)')
    return ResumePoint(
        epoch=checkpoint['epoch'] + 1,
        best=(checkpoint['best_metric'], checkpoint['best_epoch'])
        if checkpoint.get('best_metric') is not None and checkpoint.get('best_epoch') is not None else None,
        # The checkpoint-<epoch> files listed in the history exist only in the checkpoint's own run dir.
        history=checkpoint.get('checkpoint_history') if same_dir else None,
        recovery=recovery)


def _check_same_training_set(checkpoint: dict, path: str, recovery: dict, train_samples: int) -> None:
    """A recovery point names a position in the epoch's order of the training set; in a training set of
    another size that order is another one, so the position is lost (CheckpointError saying what to do)."""
    saved = checkpoint.get('train_samples')
    if (saved is None or saved == train_samples) and recovery['samples_seen'] <= train_samples:
        return
    was = f'a training set of {saved} images' if saved is not None else 'the training set'
    last = os.path.join(os.path.dirname(path), 'last.pth.tar')
    way_out = (f'or continue from the end of epoch {checkpoint["epoch"]} with --resume {last} (the steps of '
               f'epoch {recovery["epoch"]} done since are lost)' if checkpoint['epoch'] >= 0 and os.path.isfile(last)
               else 'or move the run dir away and start over')
    raise CheckpointError(
        f'{path!r} stopped after {recovery["samples_seen"]} images of epoch {recovery["epoch"]} of {was}, but the '
        f'training set now holds {train_samples}: the images not yet seen in that epoch cannot be found again. '
        f'Restore the training set of that run, {way_out}')


def _refuse_nonfinite(state: dict, what: str) -> None:
    """The saver's own guard (training checks every rank first, utils.nonfinite.check_finite_state): a state
    with NaN or inf weights or statistics is never written, so it can never replace a good file."""
    bad = nonfinite_tensors((state.get('state_dict') or {}).items())
    bad += [f'EMA {name}' for name in nonfinite_tensors((state.get('state_dict_ema') or {}).items())]
    if bad:
        raise NonFiniteStateError(f'not saving {what}: {len(bad)} tensors hold NaN or inf ({", ".join(bad[:5])}'
                                  f'{" ..." if len(bad) > 5 else ""}); the checkpoints already written are kept')


class CheckpointSaver:
    """Writes last/best/history checkpoints of one run, keeping the best `max_history` epochs."""

    def __init__(self, run_dir: str, max_history: int = 10, history=None, best=None):
        self.run_dir = run_dir
        self.max_history = max_history
        # [(metric, epoch)] of the checkpoint-<epoch> files written so far
        self.history = [tuple(h) for h in (history or [])]
        self.best = tuple(best) if best else None  # (metric, epoch)

    def _history_path(self, epoch):
        return os.path.join(self.run_dir, f'checkpoint-{epoch}.pth.tar')

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
        last = os.path.join(self.run_dir, 'last.pth.tar')
        atomic_save(state, last)
        if keep_in_history:
            atomic_copy(last, self._history_path(epoch))
        for _, old_epoch in removed:
            if os.path.exists(self._history_path(old_epoch)):
                os.remove(self._history_path(old_epoch))
        if is_best:
            atomic_copy(last, os.path.join(self.run_dir, 'model_best.pth.tar'))
        if os.path.exists(self.recovery_path):  # a point inside this epoch, superseded now
            os.remove(self.recovery_path)
        return self.best

    @property
    def recovery_path(self) -> str:
        return os.path.join(self.run_dir, RECOVERY_FILE)

    def save_recovery(self, state: dict, epoch: int, record: dict) -> str:
        """Write the recovery checkpoint of a point inside `epoch` (record: utils.preemption.recovery_record);
        it carries the best and the history so that a run resumed from it keeps them. Returns its path."""
        _refuse_nonfinite(state, f'the recovery point in epoch {epoch}')
        atomic_save(dict(state, epoch=epoch - 1, checkpoint_history=[list(h) for h in self.history],
                         best_metric=self.best[0] if self.best else None,
                         best_epoch=self.best[1] if self.best else None, recovery=record), self.recovery_path)
        return self.recovery_path

"""Where a run stops and continues: stop signals, recovery points, random states, seeds, and loading a
checkpoint back into the run.

Stopping. A scheduler that preempts a node sends SIGTERM and kills the job a while later. Dying inside
an optimizer step or a checkpoint write loses everything since the last epoch, so the handler only
records the request (`StopRequest`); the training loop finishes its current step, writes a recovery
checkpoint recording its position inside the epoch (`RecoveryPoints`), and stops with `Preempted`
(not an error: main.py exits with 128 + the signal number). A second Ctrl-C stops at once (the usual
KeyboardInterrupt) for a user who does not want to wait. In a distributed run the signal may reach
only some ranks; `stop_requested` agrees across ranks so that all of them stop after the same step
and can save together.

Schedulers, torchrun and a terminal's Ctrl-C signal the whole process group, which includes the
DataLoader worker processes. A worker killed that way makes the main process fail ("DataLoader
worker is killed by signal") before it can save, so workers leave these signals to the main process
(`leave_stop_signals_to_parent`) and only obey a SIGTERM that comes from the main process itself
(how it shuts its workers down). Workers are started with the signals held back
(`stop_signals_held`), so a signal that arrives while one starts cannot kill it either.

Random states. Mixup/CutMix (NumPy), drop path and dropout (torch) draw from the process-wide
generators; a mid-epoch resume reproduces an uninterrupted run only if those generators continue
where they stopped (`capture_all_ranks`, `restore_rng_state`), and each epoch starts from a seed of
its own (`set_seed`). The state is stored as plain tensors, ints and tuples so that checkpoints
holding it still load with `torch.load(weights_only=True)`.

Continuing. `restore_training` loads a checkpoint found by utils.checkpoint into the model,
optimizer, scheduler and loss scaler, refusing one of another model, dataset or optimizer class,
and returns the `ResumePoint` (first epoch, best, history, position inside the epoch). It lives here
rather than in utils.checkpoint because it decides how the run continues, not how files are kept.
"""
import contextlib
import os
import random
import signal
import threading
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from models.weights import HEAD_KEYS, align_head_to_classes
from utils.checkpoint import LAST_FILE, describe_value, is_number, run_options
from utils.errors import CheckpointError


# ---------------------------------------------------------------------------------------------
# Stop signals and recovery points
# ---------------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that turns SIGTERM/SIGINT into a flag the training loop polls between steps."""

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}
        self._shield_depth = 0

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT and not self._shield_depth:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the step
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @contextlib.contextmanager
    def shielded(self):
        """While a recovery point is written, a second Ctrl-C does not interrupt it: the loop stops
        right after the write anyway, and an interrupted write would lose the point."""
        self._shield_depth += 1
        try:
            yield
        finally:
            self._shield_depth -= 1

    def __enter__(self):
        # Signal handlers can only be installed from the main thread (e.g. not inside a notebook
        # worker thread); there the default behaviour stays.
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def stop_requested(request: StopRequest, device: torch.device) -> bool:
    """True on every rank when any rank received a stop signal.

    One tiny all-reduce per call; call it once per step so every rank stops after the same step.
    """
    flag = request.requested
    if dist.is_available() and dist.is_initialized():
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        flag = bool(tensor.item())
    return flag


@contextlib.contextmanager
def stop_signals_held():
    """Hold SIGTERM/SIGINT back in this thread for the duration; they are delivered when it ends.

    Processes started meanwhile (DataLoader workers) begin with the signals held back too, until
    `leave_stop_signals_to_parent` takes over in them.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_stop_signals_to_parent(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: SIGTERM/SIGINT sent to the process group do not end this worker;
    the main process decides (it saves a recovery point, then shuts its workers down).

    The worker still obeys a SIGTERM from its parent (DataLoader and multiprocessing end workers
    that way), and ends like every DataLoader worker when the parent dies. Where the sender of a
    signal cannot be told (no sigwaitinfo, e.g. macOS), only SIGINT is ignored.
    """
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held while the worker started
        return
    # Blocked in every thread of the worker (threads inherit the mask), the signals wait for the
    # thread below, which learns who sent each one.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_obey_only_parent, args=(os.getppid(),), name="stop-signals", daemon=True).start()


def _obey_only_parent(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            # Exit status 0: the parent asked for it, and torch's SIGCHLD check would report a
            # worker that died of a signal as a failure.
            os._exit(0)


def recovery_record(epoch: int, steps_done: int, batch_size: int, world_size: int, num_updates: int,
                    rng_state: dict) -> dict:
    """Where a run stands inside epoch `epoch`, stored under 'recovery' in a recovery checkpoint.

    `samples_seen` counts the samples all ranks used in this epoch: the sampler order is a
    permutation of which exactly that prefix has been used (see utils.data.ResumableSampler), so a resumed run
    skips exactly those samples even with another batch size or number of processes.
    """
    return dict(epoch=epoch, steps_done=steps_done, samples_seen=steps_done * batch_size * world_size,
                num_updates=num_updates, rng=rng_state)


def resume_step(record: dict, batch_size: int, world_size: int) -> int:
    """The step number (within the epoch) at which a resumed run continues, for logs and schedules."""
    return record["samples_seen"] // (batch_size * world_size)


def save_recovery_point(saver, training_state, epoch: int, steps_done: int, batch_size: int, world_size: int,
                        num_updates: int, device: torch.device, logger) -> None:
    """Write the recovery checkpoint after step `steps_done` of `epoch`.

    Every rank calls it, because the random states of all ranks are gathered into it; `saver` (a
    utils.checkpoint.RunCheckpoints) is None except on rank 0, which writes `training_state()`.
    """
    rng = capture_all_ranks(device)
    if saver is not None:
        record = recovery_record(epoch, steps_done, batch_size, world_size, num_updates, rng)
        path = saver.save_recovery(training_state(), epoch, record)
        logger.info(f'recovery checkpoint: epoch {epoch} step {steps_done} -> {path}')


class RecoveryPoints:
    """Called after every training step: writes a recovery checkpoint every `interval` steps and
    when a stop was requested; returns True when the loop must stop.

    `save(steps_done)` writes the checkpoint (on rank 0; the other ranks return at once). In a
    distributed run the stop request is exchanged every `sync_every` steps, the same steps on every
    rank, because the exchange makes all ranks wait for one another.
    """

    def __init__(self, request: StopRequest, save, device: torch.device, interval: int = 0, sync_every: int = 1):
        if interval < 0:
            raise ValueError(f"--recovery-interval must be 0 (off) or a number of steps, not {interval}")
        self.request = request
        self.save = save
        self.device = device
        self.interval = interval
        self.sync_every = max(1, sync_every)
        self.stopped_after: Optional[int] = None  # steps done in the epoch when the loop was stopped

    def __call__(self, steps_done: int) -> bool:
        stop = steps_done % self.sync_every == 0 and stop_requested(self.request, self.device)
        if stop or (self.interval and steps_done % self.interval == 0):
            with self.request.shielded():
                self.save(steps_done)
        if stop:
            self.stopped_after = steps_done
        return stop


class Preempted(Exception):
    """The run stopped on a signal after saving where it was; main.py reports it and exits with
    128 + the signal number, the status a shell gives a process that the signal ended."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.exit_status = 128 + int(getattr(signal, signal_name, signal.SIGTERM))


# ---------------------------------------------------------------------------------------------
# Random states and seeds
# ---------------------------------------------------------------------------------------------
TORCH_SEEDS = range(-2**63, 2**64)  # what torch.manual_seed accepts


def torch_seed(value: int) -> int:
    """`value` as a seed torch accepts. Seeds derived from a large --seed (seed x 10^13 + ...) can
    exceed 64 bits; they are taken modulo 2^64, which keeps the values one run derives distinct
    (they span far less than 2^64). Values torch accepts are returned unchanged, so runs keep the
    random numbers they always drew."""
    return value if value in TORCH_SEEDS else value % 2**64


def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU generator and `device`'s generator."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if accelerator is not None and hasattr(accelerator, "get_rng_state"):
        state["device"] = accelerator.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Undo `capture_rng_state`; the device generator is restored only on the same kind of device."""
    random.setstate(_as_tuples(state["python"]))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if "device" in state and accelerator is not None and hasattr(accelerator, "set_rng_state"):
        accelerator.set_rng_state(state["device"])


def _as_tuples(value):
    # random.setstate needs tuples; a checkpoint round trip may have produced lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def capture_all_ranks(device: torch.device) -> list:
    """Every rank's RNG state, indexed by rank (each rank draws its own drop-path numbers).
    All ranks must call it; in a single process it is a list of one."""
    state = capture_rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_seed(seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed python, numpy and torch from (seed, epoch, rank): each rank draws different drop-path and
    mixup numbers, and an epoch draws the same ones whether the run was resumed or not."""
    derived = (seed * 1_000_003 + epoch) * 1009 + rank
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(torch_seed(derived))


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint into the run
# ---------------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """Where a run continues: its first epoch, the saver's (metric, epoch) best and history, and for a
    recovery checkpoint the position inside that epoch (`recovery_record`)."""
    epoch: int = 0
    best: Optional[tuple] = None
    history: Optional[list] = None
    recovery: Optional[dict] = None


def _same_kind(expected, found) -> bool:
    if is_number(expected) or isinstance(expected, bool):
        return is_number(found) or isinstance(found, bool)
    if expected is None or found is None:
        return True  # optional settings (e.g. foreach=None) may be set either way
    if isinstance(expected, (list, tuple)):
        return isinstance(found, (list, tuple))
    return isinstance(found, type(expected)) or isinstance(expected, type(found))


def _mismatches(expected: Mapping, found: Mapping, where: str) -> list:
    """Settings that `found` holds as another kind of value than a freshly built state (a list for a number...)."""
    return [f'{where}{key} is {describe_value(found[key])}' for key, value in expected.items()
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


def restore_training(checkpoint: dict, path: str, parts, class_to_idx: Optional[dict], logger, *,
                     run_dir: Optional[str] = None, keep_schedule: bool = True, weights_only: bool = False,
                     train_samples: Optional[int] = None) -> ResumePoint:
    """Load a training checkpoint (checked by read_training_checkpoint) into the run's `parts` (a
    utils.engine.TrainingParts: model, model_ema, optimizer, precision, scheduler); a checkpoint of
    another model or dataset is refused.

    weights_only: evaluation, which needs neither the optimizer nor the schedule. keep_schedule=False
    (the schedule options changed) leaves the new scheduler as built. train_samples: the size of the
    training set now; a recovery point inside an epoch is only found again in the same training set.
    """
    _restore_weights(checkpoint, path, parts.model, parts.model_ema, class_to_idx, logger, weights_only)
    recovery = None if weights_only else checkpoint.get('recovery')
    if recovery is not None and train_samples is not None:
        _check_same_training_set(checkpoint, path, recovery, train_samples)
    if not weights_only:
        _restore_optimization(checkpoint, path, parts, logger, keep_schedule)
    same_dir = run_dir and os.path.abspath(os.path.dirname(path)) == os.path.abspath(run_dir)
    logger.info(f'resumed from {path} (epoch {checkpoint["epoch"]} done)')
    return ResumePoint(
        epoch=checkpoint['epoch'] + 1,
        best=(checkpoint['best_metric'], checkpoint['best_epoch'])
        if checkpoint.get('best_metric') is not None and checkpoint.get('best_epoch') is not None else None,
        # The checkpoint-<epoch> files listed in the history exist only in the checkpoint's own run dir.
        history=checkpoint.get('checkpoint_history') if same_dir else None,
        recovery=recovery)


def _restore_weights(checkpoint: dict, path: str, model, model_ema, class_to_idx: Optional[dict], logger,
                     weights_only: bool) -> None:
    """The weights (and EMA weights) of a checkpoint of the same classes; evaluation also takes one whose
    head lists them in another order (its rows are matched by class name)."""
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


def _restore_optimization(checkpoint: dict, path: str, parts, logger, keep_schedule: bool) -> None:
    """The optimizer, loss scaler and (when its options are unchanged) scheduler states."""
    saved_opt = run_options(checkpoint).get('opt')
    _load_state('optimizer', parts.optimizer, checkpoint['optimizer'], path,
                f'; it was written with --opt {saved_opt}' if saved_opt else '')
    precision = parts.precision
    if precision.checkpoint_key and checkpoint.get(precision.checkpoint_key) is not None:
        _load_state('loss scaler', precision, checkpoint[precision.checkpoint_key], path)
    if checkpoint.get('scheduler'):
        if keep_schedule:
            _load_state('scheduler', parts.scheduler, checkpoint['scheduler'], path)
        else:
            logger.info('schedule options differ from the checkpoint\'s: following the new ones')


def _check_same_training_set(checkpoint: dict, path: str, recovery: dict, train_samples: int) -> None:
    """A recovery point names a position in the epoch's order of the training set; in a training set of
    another size that order is another one, so the position is lost (CheckpointError saying what to do)."""
    saved = checkpoint.get('train_samples')
    if (saved is None or saved == train_samples) and recovery['samples_seen'] <= train_samples:
        return
    was = f'a training set of {saved} images' if saved is not None else 'the training set'
    last = os.path.join(os.path.dirname(path), LAST_FILE)
    way_out = (f'or continue from the end of epoch {checkpoint["epoch"]} with --resume {last} (the steps of '
               f'epoch {recovery["epoch"]} done since are lost)' if checkpoint['epoch'] >= 0 and os.path.isfile(last)
               else 'or move the run dir away and start over')
    raise CheckpointError(
        f'{path!r} stopped after {recovery["samples_seen"]} images of epoch {recovery["epoch"]} of {was}, but the '
        f'training set now holds {train_samples}: the images not yet seen in that epoch cannot be found again. '
        f'Restore the training set of that run, {way_out}')

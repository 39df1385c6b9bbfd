"""Stopping cleanly when the job is preempted (SIGTERM) or interrupted (Ctrl-C / SIGINT).

A scheduler that preempts a node sends SIGTERM and kills the job a while later. Dying inside an
optimizer step or a checkpoint write loses everything since the last epoch, so the handler only
records the request; the training loop finishes its current step, writes a recovery checkpoint
recording its position inside the epoch, and exits. A second Ctrl-C stops at once (the usual
KeyboardInterrupt) for a user who does not want to wait.

In a distributed run the signal may reach only some ranks; `stop_requested` agrees across ranks so
that all of them stop after the same step and can save together.

Schedulers, torchrun and a terminal's Ctrl-C signal the whole process group, which includes the
DataLoader worker processes. A worker killed that way makes the main process fail ("DataLoader
worker is killed by signal") before it can save, so workers leave these signals to the main process
(`leave_stop_signals_to_parent`) and only obey a SIGTERM that comes from the main process itself
(how it shuts its workers down). Workers are started with the signals held back
(`stop_signals_held`), so a signal that arrives while one starts cannot kill it either.
"""
import contextlib
import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from utils.rng_state import capture_all_ranks


class StopRequest:
    """Context manager that turns SIGTERM/SIGINT into a flag the training loop polls between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


RECOVERY_FILE = "recovery.pth.tar"


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
    utils.checkpoint.CheckpointSaver) is None except on rank 0, which writes `training_state()`.
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

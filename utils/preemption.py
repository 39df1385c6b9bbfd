"""Stopping cleanly when the job is preempted (SIGTERM) or interrupted (Ctrl-C / SIGINT).

A scheduler that preempts a node sends SIGTERM and kills the job a while later. Dying inside an
optimizer step or a checkpoint write loses everything since the last epoch, so the handler only
records the request; the training loop finishes its current step, writes a recovery checkpoint
recording its position inside the epoch, and exits. A second Ctrl-C stops at once (the usual
KeyboardInterrupt) for a user who does not want to wait.

In a distributed run the signal may reach only some ranks; `stop_requested` agrees across ranks so
that all of them stop after the same step and can save together.
"""
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

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the step
        self.signal_name = signal.Signals(signum).name

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


RECOVERY_FILE = "recovery.pth.tar"


def recovery_record(epoch: int, steps_done: int, batch_size: int, world_size: int, num_updates: int,
                    rng_state: dict) -> dict:
    """Where a run stands inside epoch `epoch`, stored under 'recovery' in a recovery checkpoint.

    `samples_seen` counts the samples all ranks used in this epoch: the sampler order is a
    permutation of which exactly that prefix has been used (see utils.sampler), so a resumed run
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

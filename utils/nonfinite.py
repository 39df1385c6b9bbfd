"""Deciding what a non-finite (NaN or infinite) training loss means for the run.

Under the float16 GradScaler an occasional overflow is normal: the scaler skips that optimizer
step and lowers the scale. Without a scaler (float32, bfloat16) a non-finite loss has already
poisoned the gradients, so training on would only produce garbage. And a loss that stays
non-finite step after step, even under the scaler, means the run has diverged.

The guard records one flag per step on the device and looks at them only in `check`, because
reading the loss every step would make the host wait for the accelerator at every step. Call
`check` at the log interval and always before writing a checkpoint, so that weights touched by a
non-finite step are never saved.

A finite loss does not prove a finite model: under the float16 scaler the skipped steps still ran
their forward pass, and in training mode that updates the BatchNorm running statistics, so a
diverging run can hold NaN statistics (and, later, weights) while the scaler keeps skipping.
`check_finite_state` looks at every parameter and buffer before a state is saved; such a state is
never written (nor chosen as the best), the run stops with NonFiniteStateError, and the
checkpoints written before are kept.
"""
from typing import List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from utils.checkpoint import nonfinite_tensors
from utils.errors import NonFiniteLossError, NonFiniteStateError


def _listed(names: List[str], limit: int = 5) -> str:
    return ', '.join(names[:limit]) + (f' and {len(names) - limit} more' if len(names) > limit else '')


def check_finite_state(states: Mapping[str, Mapping[str, torch.Tensor]], when: str, scaler_skips_steps: bool = False,
                       logger=None) -> None:
    """Raise NonFiniteStateError when a tensor of the state dicts `states` ({'model': ..., 'EMA': ...}) is
    not finite. In a distributed run every rank raises when one of them found one, so all stop together.
    `when` names the moment for the message ('after epoch 3')."""
    bad = {label: nonfinite_tensors(state.items()) for label, state in states.items()}
    count = sum(len(names) for names in bad.values())
    if dist.is_available() and dist.is_initialized():
        device = next((t.device for state in states.values() for t in state.values() if torch.is_tensor(t)),
                      torch.device('cpu'))
        total = torch.tensor([count], device=device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        if count == 0 and int(total.item()):
            raise NonFiniteStateError(f'another process found NaN or inf in its model state {when}; the run stops '
                                      'without saving it (the checkpoints already written are kept)')
    if not count:
        return
    what = '; '.join(f'{label}: {len(names)} tensors ({_listed(names)})' for label, names in bad.items() if names)
    statistics_only = all(name.endswith(('running_mean', 'running_var')) for names in bad.values() for name in names)
    if logger is not None:
        logger.error(f'not saving the state {when}: {count} tensors hold NaN or inf ({what})')
    cause = (' The float16 loss scaler skipped the steps whose gradients overflowed, but their forward passes '
             'still updated the BatchNorm statistics.' if scaler_skips_steps and statistics_only else '')
    raise NonFiniteStateError(
        f'the model state {when} holds NaN or inf in {count} tensors ({what}).{cause} The run stops without saving '
        'this state; the checkpoints already written are kept. Lower --lr, use warmup or --clip-grad'
        + (', or --amp-dtype bfloat16' if scaler_skips_steps else '') + ', then --resume from a good checkpoint')


class NonFiniteGuard:
    """Stops the run on a non-finite loss, or after `max_consecutive` of them when a scaler skips steps."""

    def __init__(self, scaler_skips_steps: bool, max_consecutive: int = 20):
        if max_consecutive < 1:
            raise ValueError(f"--max-nonfinite-steps must be at least 1, not {max_consecutive}")
        self.scaler_skips_steps = scaler_skips_steps
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.first_of_run: Optional[str] = None  # step that started the current run of non-finite losses
        self.skipped_steps = 0
        self._pending: List[Tuple[str, torch.Tensor]] = []

    def update(self, loss: torch.Tensor, step: str) -> None:
        """Record whether this step's loss is finite; `step` names it for messages ('epoch 3 step 41')."""
        self._pending.append((step, torch.isfinite(loss.detach()).all()))

    def check(self) -> None:
        """Look at the recorded steps (one host-device sync); raise NonFiniteLossError if the run must stop."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        finite = torch.stack([flag for _, flag in self._pending]).to(torch.int32)
        self._pending.clear()
        if dist.is_available() and dist.is_initialized():
            # A step counts as non-finite when it was on any rank: then every rank stops together.
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        for step, ok in zip(steps, finite.tolist()):
            if ok:
                self.consecutive = 0
                self.first_of_run = None
                continue
            self.consecutive += 1
            self.first_of_run = self.first_of_run or step
            if not self.scaler_skips_steps:
                raise NonFiniteLossError(
                    f"loss is not finite at {step}; the weights are no longer usable, so the run stops here without "
                    "saving them (the checkpoints already written are kept). Lower --lr, use warmup or gradient "
                    "clipping, or check the data")
            self.skipped_steps += 1
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteLossError(
                    f"loss has not been finite for {self.consecutive} steps in a row (since {self.first_of_run}, "
                    f"last at {step}); the float16 scaler skipped them but the run has diverged, so it stops here "
                    "(the checkpoints already written are kept). Lower --lr or raise --max-nonfinite-steps")

"""Deciding what a non-finite (NaN or infinite) training loss means for the run.

Under the float16 GradScaler an occasional overflow is normal: the scaler skips that optimizer
step and lowers the scale. Without a scaler (float32, bfloat16) a non-finite loss has already
poisoned the gradients, so training on would only produce garbage. And a loss that stays
non-finite step after step, even under the scaler, means the run has diverged.

The guard records one flag per step on the device and looks at them only in `check`, because
reading the loss every step would make the host wait for the accelerator at every step. Call
`check` at the log interval and always before writing a checkpoint, so that weights touched by a
non-finite step are never saved.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses it cannot recover from; the message names the step."""


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

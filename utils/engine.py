"""The training and evaluation loops, `fit` (the loop over epochs that ties them to saving and
reporting), and the guard that stops a run whose loss or weights are no longer finite.

They take explicit arguments (no argparse namespace) so tests and tools can call them. Values are
kept on the device and read back (.item(), which waits for the device) only at log points, and
collectives run only at log points and at the end, the same number of times on every rank.

Non-finite values (NaN, inf). Under the float16 GradScaler an occasional overflow is normal: the scaler skips that optimizer
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
import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import AverageMeter, distribute_bn

from utils.checkpoint import LAST_FILE, nonfinite_tensors, recovery_path
from utils.device import DistEnv, all_reduce_sum, synchronize
from utils.errors import NonFiniteLossError, NonFiniteStateError, UnreadableDatasetError
from utils.reporting import RunReport, epoch_record, progress
from utils.resume import (Preempted, RecoveryPoints, ResumePoint, StopRequest, restore_rng_state, resume_step,
                          save_recovery_point, set_seed, stop_requested)

# In a distributed run, how often (steps) the ranks agree on whether one of them received a stop
# signal: each check makes all ranks wait for one another, so it is not done every step.
STOP_CHECK_STEPS = 10

FPS_WARMUP_STEPS = 5  # the first steps of an epoch (worker start, allocator warm-up) are not timed


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


@dataclass
class TrainSettings:
    """How the loops run; main.py fills it from the options (utils.options), tests set what they need."""
    epochs: int = 1                      # epochs of the whole schedule, cooldown included (create_scheduler's count)
    seed: int = 0
    log_interval: int = 50               # steps between training log lines
    max_steps: Optional[int] = None      # cap on the steps of each epoch (--max-steps-per-epoch)
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    channels_last: bool = False
    show_progress: bool = False          # utils.reporting.progress_enabled
    recovery_interval: int = 0           # steps between recovery points (0: only on a stop signal)
    max_nonfinite_steps: int = 20
    mixup_off_epoch: int = 0             # 0: never
    dist_bn: str = ''                    # 'reduce' or 'broadcast' BN statistics after each epoch ('': leave them)

    def steps_per_epoch(self, loader_steps: int) -> int:
        """The steps an epoch runs: the loader's, capped by max_steps (the schedule counts these)."""
        return min(loader_steps, self.max_steps) if self.max_steps else loader_steps


@dataclass
class TrainingParts:
    """What the loops work on. `model` is the bare model (its state is saved, its BN statistics
    distributed); `train_model` wraps it for training (DDP, torch.compile) and `eval_model` for
    evaluation, both `model` when not given. `saver` (utils.checkpoint.RunCheckpoints) exists on rank 0
    only and saves `training_state()`; `report` (utils.reporting.RunReport) defaults to summary.csv in
    the run dir."""
    model: torch.nn.Module
    train_loader: Any
    criterion: Callable
    optimizer: torch.optim.Optimizer
    precision: Any                       # utils.amp.Precision
    scheduler: Any = None                # a timm scheduler
    val_loader: Any = None
    train_model: Optional[torch.nn.Module] = None
    eval_model: Optional[torch.nn.Module] = None
    model_ema: Any = None                # timm.utils.ModelEmaV3
    mixup_fn: Optional[Callable] = None
    saver: Any = None
    training_state: Optional[Callable[[], dict]] = None
    report: Optional[RunReport] = None

    def __post_init__(self):
        self.train_model = self.model if self.train_model is None else self.train_model
        self.eval_model = self.model if self.eval_model is None else self.eval_model


def _to_device(images, targets, device, channels_last):
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _train_step(parts: TrainingParts, settings: TrainSettings, images, targets, num_updates: int) -> torch.Tensor:
    """Forward, backward and optimizer step of one batch (update number `num_updates`); the detached loss."""
    if parts.mixup_fn is not None:
        images, targets = parts.mixup_fn(images, targets)
    with parts.precision.autocast():
        loss = parts.criterion(parts.train_model(images), targets)
    # Each optimizer's own default: torch's sets grads to None; torch_npu's fused optimizers raise on
    # set_to_none=True (torch_npu/optim/npu_fused_optim_base.py) and zero their combined buffer; apex
    # with combine_grad replaces zero_grad by a function taking no arguments (apex patch/npu.patch).
    parts.optimizer.zero_grad()
    parts.precision.backward_step(loss, parts.optimizer, clip_grad=settings.clip_grad, clip_mode=settings.clip_mode,
                                  parameters=parts.train_model.parameters())
    if parts.model_ema is not None:
        parts.model_ema.update(parts.train_model, step=num_updates)
    if parts.scheduler is not None:
        parts.scheduler.step_update(num_updates=num_updates)
    return loss.detach().float()


def train_one_epoch(parts: TrainingParts, settings: TrainSettings, epoch: int, dist_env: DistEnv, logger, *,
                    num_updates: int = 0, start_step: int = 0, nonfinite_guard: Optional[NonFiniteGuard] = None,
                    on_step_end: Optional[Callable[[int], bool]] = None) -> dict:
    """One pass over parts.train_loader; returns dict(loss, lr, fps, num_updates, skipped, stopped,
    logged_losses: the current loss of each log line).

    start_step: steps of this epoch done before a resume (the loader yields only the rest).
    on_step_end(steps done in the epoch) -> True stops the epoch early (preemption, utils.resume).
    """
    loader, device = parts.train_loader, dist_env.device
    parts.train_model.train()
    steps = len(loader) if not settings.max_steps else max(0, min(len(loader), settings.max_steps - start_step))
    global_batch = loader.batch_size * dist_env.world_size
    batch_time, data_time = AverageMeter(), AverageMeter()
    loss_sum = torch.zeros((), device=device)
    guard = nonfinite_guard or NonFiniteGuard(scaler_skips_steps=False)
    epoch_loss_sum, logged_losses, stopped = 0.0, [], False

    previous_end = timed_start = time.perf_counter()
    timed_steps = steps
    for step, (images, targets) in enumerate(progress(loader, steps, f'Train {epoch}', settings.show_progress, logger)):
        if step >= steps:
            break
        data_time.update(time.perf_counter() - previous_end)
        num_updates += 1
        loss = _train_step(parts, settings, *_to_device(images, targets, device, settings.channels_last), num_updates)
        loss_sum += loss
        guard.update(loss, f'epoch {epoch} step {start_step + step + 1}')
        if steps > FPS_WARMUP_STEPS and step == FPS_WARMUP_STEPS - 1:
            synchronize(device)
            timed_start, timed_steps = time.perf_counter(), steps - FPS_WARMUP_STEPS
        step_end = time.perf_counter()
        batch_time.update(step_end - previous_end)  # includes data loading, like the FPS
        previous_end = step_end
        if (step + 1) % settings.log_interval == 0 or step == steps - 1:
            guard.check()
            stats = torch.stack([loss, loss_sum])
            all_reduce_sum(stats, dist_env)
            loss_now, epoch_loss_sum = (stats / dist_env.world_size).tolist()
            logged_losses.append(loss_now)
            done, total = start_step + step + 1, start_step + steps
            logger.info(
                f'Train: {epoch} [{done:>4d}/{total:>4d} ({100.0 * done / total:>3.0f}%)]  '
                f'Loss: {loss_now:.4f} ({epoch_loss_sum / (step + 1):.4f})  '
                f'Time: {batch_time.val:.3f}s, {global_batch / max(batch_time.val, 1e-9):>6.2f}/s  '
                f'LR: {parts.optimizer.param_groups[0]["lr"]:.3e}  Data: {data_time.val:.3f} ({data_time.avg:.3f})')
        if on_step_end is not None and on_step_end(start_step + step + 1):
            stopped = True
            break
    synchronize(device)
    fps = global_batch * timed_steps / max(time.perf_counter() - timed_start, 1e-9)
    skipped = int(all_reduce_sum(torch.tensor([float(getattr(loader, 'skipped', 0))], device=device), dist_env).item())
    if not stopped:  # the FPS of a partial epoch would mislead the performance scripts
        logger.info(f'Epoch {epoch} FPS:{fps:.2f}')
    if skipped:
        logger.info(f'Epoch {epoch} skipped {skipped} unreadable training images (each replaced by another sample)')
    return dict(loss=epoch_loss_sum / max(steps, 1), lr=parts.optimizer.param_groups[0]['lr'], fps=fps,
                num_updates=num_updates, skipped=skipped, stopped=stopped, logged_losses=logged_losses)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, dist_env: DistEnv, logger,
             autocast: Callable = None, log_interval: int = 50, channels_last: bool = False,
             log_prefix: str = '', show_progress: bool = False):
    """Loss, Acc@1, Acc@5 over the whole validation set, summed over ranks: every rank returns the
    same numbers and each image counts once (the loader shards without padding). Unreadable images
    are left out of the metrics and counted in `skipped`."""
    model.eval()
    autocast = autocast or contextlib.nullcontext
    # Exact counts in int64 and the loss sum in float32: HCCL cannot all_reduce float64
    # (utils.device.DEVICE_KINDS reducible_dtypes), and every backend takes these two.
    loss_sum = torch.zeros(1, dtype=torch.float32, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # correct@1, correct@5, images
    steps = len(loader)
    for step, (images, targets) in enumerate(progress(loader, steps, f'{log_prefix}Test', show_progress, logger)):
        if targets.numel() == 0:
            continue  # every image of this batch was unreadable
        images, targets = _to_device(images, targets, device, channels_last)
        with autocast():
            output = model(images)
        output = output.float()
        loss = F.cross_entropy(output, targets, reduction='sum')
        k = min(5, output.shape[1])
        correct = output.topk(k, dim=1).indices.eq(targets[:, None])
        batch = torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum(),
                             torch.full((), targets.numel(), dtype=torch.int64, device=device)])
        loss_sum += loss
        counts += batch
        if (step + 1) % log_interval == 0 or step == steps - 1:
            (b_top1, b_top5, n), (s_top1, s_top5, s_n) = batch.tolist(), counts.tolist()
            b_loss, s_loss = torch.stack([loss, loss_sum[0]]).tolist()
            logger.info(
                f'{log_prefix}Test: [{step + 1:>4d}/{steps:>4d}]  '
                f'Loss: {b_loss / n:.4f} ({s_loss / s_n:.4f})  '
                f'Acc@1: {100 * b_top1 / n:.4f} ({100 * s_top1 / s_n:.4f})  '
                f'Acc@5: {100 * b_top5 / n:.4f} ({100 * s_top5 / s_n:.4f})')
    counts = torch.cat([counts, torch.tensor([int(getattr(loader, 'skipped', 0))], dtype=torch.int64, device=device)])
    all_reduce_sum(loss_sum, dist_env)
    all_reduce_sum(counts, dist_env)
    (total_loss,), (top1, top5, images, skipped) = loss_sum.tolist(), counts.tolist()
    if images == 0:
        raise UnreadableDatasetError('the validation set',
                                     f'no image could be read ({skipped} unreadable files skipped)')
    metrics = dict(loss=total_loss / images, top1=100.0 * top1 / images, top5=100.0 * top5 / images,
                   images=images, skipped=skipped)
    # The count of unreadable files follows the accuracy only when there are some, so the line keeps the
    # ModelZoo's familiar form on clean data.
    logger.info(f"{log_prefix}* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} "
                f"Loss {metrics['loss']:.3f} (images {images})" + (f" skipped {skipped}" if skipped else ''))
    return metrics


def evaluate_parts(parts: TrainingParts, settings: TrainSettings, dist_env: DistEnv, logger, ema: bool = False) -> dict:
    """`evaluate` of the parts' evaluation model (with `ema`, the EMA weights) on their validation loader, as
    the settings say. Never the DDP wrapper: its forward would sync buffers, and ranks hold unequal shards."""
    model = parts.model_ema.module if ema else parts.eval_model
    return evaluate(model, parts.val_loader, device=dist_env.device, dist_env=dist_env, logger=logger,
                    autocast=parts.precision.autocast, log_interval=settings.log_interval,
                    channels_last=settings.channels_last, log_prefix='EMA ' if ema else '',
                    show_progress=settings.show_progress)


class _Training:
    """What `fit` shares between its steps: the parts, the settings, the place and the non-finite guard."""

    def __init__(self, parts: TrainingParts, settings: TrainSettings, dist_env: DistEnv, logger, run_dir: str):
        self.parts, self.settings, self.dist_env, self.logger, self.run_dir = parts, settings, dist_env, logger, run_dir
        self.steps_per_epoch = settings.steps_per_epoch(len(parts.train_loader))
        # The float16 GradScaler (and apex's loss scaling) skips steps whose gradients are not finite;
        # without one a non-finite loss has already spoilt the weights.
        self.scaler_skips_steps = parts.precision.checkpoint_key is not None
        self.guard = NonFiniteGuard(self.scaler_skips_steps, settings.max_nonfinite_steps)
        self.report = parts.report or RunReport.for_run(run_dir, dist_env.is_main, logger)

    def continue_schedule(self, resume: ResumePoint) -> int:
        """Move the scheduler to where the checkpoint left it; returns the step inside the first epoch."""
        recovery, scheduler = resume.recovery, self.parts.scheduler
        start_step = resume_step(recovery, self.parts.train_loader.batch_size, self.dist_env.world_size) if recovery else 0
        if recovery:
            self.logger.info(f'continuing epoch {recovery["epoch"]} after {recovery["samples_seen"]} samples '
                             f'(step {start_step})')
        # timm schedulers ignore the call whose unit (epochs or updates) is not theirs, so making both
        # covers --sched-on-updates too.
        if resume.epoch:
            scheduler.step(resume.epoch)
        if resume.epoch or start_step:
            scheduler.step_update(resume.epoch * self.steps_per_epoch + start_step)
        return start_step

    def check_state(self, when: str) -> None:
        """Never save (or pick as best) a state holding NaN or inf, whatever the loss said (check_finite_state)."""
        model, model_ema = self.parts.model, self.parts.model_ema
        states = {'model': model.state_dict(), **({'EMA': model_ema.module.state_dict()} if model_ema else {})}
        check_finite_state(states, when, self.scaler_skips_steps, self.logger if self.dist_env.is_main else None)

    def save_recovery(self, epoch: int, steps_done: int) -> None:
        self.guard.check()  # never save weights that a non-finite step touched
        self.check_state(f'in epoch {epoch} after step {steps_done}')
        save_recovery_point(self.parts.saver, self.parts.training_state, epoch, steps_done,
                            self.parts.train_loader.batch_size, self.dist_env.world_size,
                            epoch * self.steps_per_epoch + steps_done, self.dist_env.device, self.logger)

    def train_epoch(self, epoch: int, stop: StopRequest, recovery: Optional[dict], first_step: int):
        """Train one epoch (continuing inside it from `recovery`); returns (stats, recovery points)."""
        parts, settings, dist_env = self.parts, self.settings, self.dist_env
        # Seed per epoch so that drop path and mixup draw the same numbers whether or not the run
        # was resumed; per-image augmentation is seeded in the dataset.
        set_seed(settings.seed, epoch, dist_env.rank)
        parts.train_loader.sampler.set_epoch(epoch, recovery['samples_seen'] if recovery else 0)
        if recovery and len(recovery['rng']) == dist_env.world_size:
            restore_rng_state(recovery['rng'][dist_env.rank], dist_env.device)  # continue mid-epoch random streams
        if parts.mixup_fn is not None and settings.mixup_off_epoch and epoch >= settings.mixup_off_epoch:
            parts.mixup_fn.mixup_enabled = False
        points = RecoveryPoints(stop, functools.partial(self.save_recovery, epoch), dist_env.device,
                                settings.recovery_interval, sync_every=STOP_CHECK_STEPS if dist_env.distributed else 1)
        stats = train_one_epoch(parts, settings, epoch, dist_env, self.logger,
                                num_updates=epoch * self.steps_per_epoch + first_step, start_step=first_step,
                                nonfinite_guard=self.guard, on_step_end=points)
        self.report.losses(stats['logged_losses'])
        return stats, points

    def evaluate_epoch(self, epoch: int) -> dict:
        """Distribute the BN statistics and evaluate; with an EMA its metrics are the epoch's."""
        parts, settings, dist_env = self.parts, self.settings, self.dist_env
        self.guard.check()
        if settings.dist_bn:
            distribute_bn(parts.model, dist_env.world_size, reduce=settings.dist_bn == 'reduce')
        self.check_state(f'after epoch {epoch}')
        metrics = evaluate_parts(parts, settings, dist_env, self.logger)
        if parts.model_ema is not None:
            if settings.dist_bn:
                distribute_bn(parts.model_ema, dist_env.world_size, reduce=settings.dist_bn == 'reduce')
            metrics = evaluate_parts(parts, settings, dist_env, self.logger, ema=True)
        return metrics


def _stopped(stop: StopRequest, where: str) -> Preempted:
    return Preempted(f'stopped by {stop.signal_name or "a signal on another rank"} {where}',
                     stop.signal_name or 'SIGTERM')


def fit(parts: TrainingParts, settings: TrainSettings, dist_env: DistEnv, logger, run_dir: str,
        resume: Optional[ResumePoint] = None) -> Optional[tuple]:
    """Train epochs resume.epoch .. settings.epochs - 1, evaluating, saving and reporting after each one.

    `resume` (utils.resume.restore_training) gives the first epoch, the best so far and, for a recovery
    checkpoint, the position inside that epoch. SIGTERM/SIGINT stop the run after saving where it was
    (Preempted). With an EMA, as in the reference (timm 0.4 train.py), the EMA weights' evaluation is the
    epoch's metric: it ranks the checkpoints, feeds the scheduler and summary.csv; both weights are saved.
    Returns the best (top-1, epoch), or None.
    """
    resume = resume or ResumePoint()
    training = _Training(parts, settings, dist_env, logger, run_dir)
    start_step = training.continue_schedule(resume)
    if parts.model_ema is not None:
        logger.info("model EMA: the EMA weights' Acc@1 ranks the checkpoints (model_best, checkpoint-<epoch>) and "
                    'gives the best metric, as in the reference; checkpoints hold both (state_dict, state_dict_ema)')
    best = resume.best
    with StopRequest() as stop:
        for epoch in range(resume.epoch, settings.epochs):
            resuming = resume.recovery is not None and epoch == resume.recovery['epoch']
            train_stats, points = training.train_epoch(epoch, stop, resume.recovery if resuming else None,
                                                       start_step if resuming else 0)
            if train_stats['stopped']:
                raise _stopped(stop, f'in epoch {epoch} after step {points.stopped_after}; {recovery_path(run_dir)} '
                                     'holds that point: run the same command with --resume auto (and the same '
                                     '--experiment) to continue')
            metrics = training.evaluate_epoch(epoch)
            parts.scheduler.step(epoch + 1, metrics['top1'])
            if dist_env.is_main:
                best = parts.saver.save(parts.training_state(), epoch, metrics['top1'])
            elif best is None or metrics['top1'] > best[0]:
                best = (metrics['top1'], epoch)  # every rank has the same metrics
            # After the checkpoint: a full disk must not cost the epoch (the reports name their own write
            # failures and the run goes on).
            training.report.epoch(epoch_record(epoch, train_stats, metrics), best)
            if stop_requested(stop, dist_env.device):  # the signal came during evaluation or saving
                raise _stopped(stop, f'after epoch {epoch}, which is saved in {LAST_FILE}: run the same command '
                                     'with --resume auto to continue')
    return best

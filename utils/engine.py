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
from typing import Callable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import AverageMeter, distribute_bn

from utils.checkpoint import LAST_FILE, nonfinite_tensors, recovery_path
from utils.device import DistEnv, all_reduce_sum, synchronize
from utils.errors import NonFiniteLossError, NonFiniteStateError, UnreadableDatasetError
from utils.reporting import RunReport, epoch_record, progress
from utils.resume import (Preempted, RecoveryPoints, StopRequest, restore_rng_state, resume_step, save_recovery_point,
                          set_seed, stop_requested)

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


def _to_device(images, targets, device, channels_last):
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def train_one_epoch(model: torch.nn.Module, loader, criterion: Callable, optimizer: torch.optim.Optimizer,
                    precision, device: torch.device, epoch: int, dist_env: DistEnv, logger,
                    mixup_fn: Optional[Callable] = None, lr_scheduler=None, num_updates: int = 0,
                    clip_grad: Optional[float] = None, clip_mode: str = 'norm', model_ema=None,
                    log_interval: int = 50, max_steps: Optional[int] = None, channels_last: bool = False,
                    nonfinite_guard: Optional[NonFiniteGuard] = None, start_step: int = 0,
                    on_step_end: Optional[Callable[[int], bool]] = None, show_progress: bool = False):
    """One pass over the training loader; returns dict(loss, lr, fps, num_updates, skipped, stopped,
    logged_losses: the current loss of each log line).

    start_step: steps of this epoch done before a resume (the loader yields only the rest).
    on_step_end(steps done in the epoch) -> True stops the epoch early (preemption, utils.resume).
    """
    model.train()
    steps = len(loader) if not max_steps else max(0, min(len(loader), max_steps - start_step))
    global_batch = loader.batch_size * dist_env.world_size
    batch_time, data_time = AverageMeter(), AverageMeter()
    loss_sum = torch.zeros((), device=device)
    nonfinite_guard = nonfinite_guard or NonFiniteGuard(scaler_skips_steps=False)
    epoch_loss_sum = 0.0
    logged_losses = []  # the current loss of each log line, for the results file
    stopped = False

    previous_end = timed_start = time.perf_counter()
    timed_steps = steps
    for step, (images, targets) in enumerate(progress(loader, steps, f'Train {epoch}', show_progress, logger)):
        if step >= steps:
            break
        data_time.update(time.perf_counter() - previous_end)
        images, targets = _to_device(images, targets, device, channels_last)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)

        with precision.autocast():
            output = model(images)
            loss = criterion(output, targets)
        # Each optimizer's own default: torch's sets grads to None; torch_npu's fused optimizers raise on
        # set_to_none=True (torch_npu/optim/npu_fused_optim_base.py) and zero their combined buffer; apex
        # with combine_grad replaces zero_grad by a function taking no arguments (apex patch/npu.patch).
        optimizer.zero_grad()
        precision.backward_step(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                                parameters=model.parameters())
        num_updates += 1
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)

        loss = loss.detach().float()
        loss_sum += loss
        nonfinite_guard.update(loss, f'epoch {epoch} step {start_step + step + 1}')
        last_step = step == steps - 1
        if steps > FPS_WARMUP_STEPS and step == FPS_WARMUP_STEPS - 1:
            synchronize(device)
            timed_start, timed_steps = time.perf_counter(), steps - FPS_WARMUP_STEPS
        step_end = time.perf_counter()
        batch_time.update(step_end - previous_end)  # includes data loading, like the FPS
        previous_end = step_end
        if (step + 1) % log_interval == 0 or last_step:
            nonfinite_guard.check()
            stats = torch.stack([loss, loss_sum])
            all_reduce_sum(stats, dist_env)
            loss_now, loss_total = (stats / dist_env.world_size).tolist()
            lr = optimizer.param_groups[0]['lr']
            done, total = start_step + step + 1, start_step + steps
            logger.info(
                f'Train: {epoch} [{done:>4d}/{total:>4d} ({100.0 * done / total:>3.0f}%)]  '
                f'Loss: {loss_now:.4f} ({loss_total / (step + 1):.4f})  '
                f'Time: {batch_time.val:.3f}s, {global_batch / max(batch_time.val, 1e-9):>6.2f}/s  '
                f'LR: {lr:.3e}  Data: {data_time.val:.3f} ({data_time.avg:.3f})')
            epoch_loss_sum = loss_total
            logged_losses.append(loss_now)
        if on_step_end is not None and on_step_end(start_step + step + 1):
            stopped = True
            break
    synchronize(device)
    elapsed = time.perf_counter() - timed_start
    fps = global_batch * timed_steps / max(elapsed, 1e-9)
    skipped = torch.tensor([float(getattr(loader, 'skipped', 0))], device=device)
    skipped = int(all_reduce_sum(skipped, dist_env).item())
    if not stopped:  # the FPS of a partial epoch would mislead the performance scripts
        logger.info(f'Epoch {epoch} FPS:{fps:.2f}')
    if skipped:
        logger.info(f'Epoch {epoch} skipped {skipped} unreadable training images (each replaced by another sample)')
    return dict(loss=epoch_loss_sum / max(steps, 1), lr=optimizer.param_groups[0]['lr'], fps=fps,
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
    # The count of unreadable files follows the accuracy only when there are some, so the line the
    # launch scripts parse keeps its exact form on clean data.
    logger.info(f"{log_prefix}* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} "
                f"Loss {metrics['loss']:.3f} (images {images})" + (f" skipped {skipped}" if skipped else ''))
    return metrics


def fit(model: torch.nn.Module, train_model: torch.nn.Module, eval_model: torch.nn.Module, train_loader, val_loader,
        criterion: Callable, optimizer: torch.optim.Optimizer, scheduler, precision, device: torch.device,
        dist_env: DistEnv, logger, run_dir: str, saver, training_state: Callable[[], dict], *, start_epoch: int,
        total_epochs: int, steps_per_epoch: int, seed: int, best: Optional[tuple] = None,
        recovery: Optional[dict] = None, recovery_interval: int = 0, max_nonfinite_steps: int = 20,
        mixup_fn=None, mixup_off_epoch: int = 0, model_ema=None, clip_grad: Optional[float] = None,
        clip_mode: str = 'norm', log_interval: int = 50, max_steps: Optional[int] = None,
        channels_last: bool = False, dist_bn: str = '', report: Optional[RunReport] = None,
        show_progress: bool = False):
    """Train epochs start_epoch .. total_epochs - 1, evaluating, logging and saving after each one.

    model is the bare model (its state is saved, its BN statistics distributed); train_model wraps it
    for training (DDP, torch.compile), eval_model for evaluation. saver (utils.checkpoint.RunCheckpoints)
    is None except on rank 0; training_state() gives the state it saves. recovery: the position inside
    start_epoch that a recovery checkpoint recorded. dist_bn: 'reduce' or 'broadcast' the BN statistics
    after each epoch ('' = leave them). SIGTERM/SIGINT stop the run after saving where it was (Preempted).
    With model_ema, as in the reference (timm 0.4 train.py), the EMA weights' evaluation is the epoch's
    metric: it ranks the checkpoints, feeds the scheduler and summary.csv; both weights are saved.
    Returns the best (top-1, epoch), or None.
    """
    start_step = resume_step(recovery, train_loader.batch_size, dist_env.world_size) if recovery else 0
    if recovery:
        logger.info(f'continuing epoch {recovery["epoch"]} after {recovery["samples_seen"]} samples (step {start_step})')
    # Continue the schedule where the checkpoint left it. timm schedulers ignore the call whose unit
    # (epochs or updates) is not theirs, so making both covers --sched-on-updates too.
    if start_epoch:
        scheduler.step(start_epoch)
    if start_epoch or start_step:
        scheduler.step_update(start_epoch * steps_per_epoch + start_step)
    # The float16 GradScaler (and apex's loss scaling) skips steps whose gradients are not finite;
    # without one a non-finite loss has already spoilt the weights.
    nonfinite_guard = NonFiniteGuard(precision.checkpoint_key is not None, max_nonfinite_steps)
    if model_ema is not None:
        logger.info("model EMA: the EMA weights' Acc@1 ranks the checkpoints (model_best, checkpoint-<epoch>) and "
                    'gives the best metric, as in the reference; checkpoints hold both (state_dict, state_dict_ema)')
    report = report or RunReport.for_run(run_dir, dist_env.is_main, logger)
    eval_kwargs = dict(device=device, dist_env=dist_env, logger=logger, autocast=precision.autocast,
                       log_interval=log_interval, channels_last=channels_last, show_progress=show_progress)

    def check_state(when: str) -> None:
        """Never save (or pick as best) a state holding NaN or inf, whatever the loss said (check_finite_state)."""
        states = {'model': model.state_dict(), **({'EMA': model_ema.module.state_dict()} if model_ema else {})}
        check_finite_state(states, when, precision.checkpoint_key is not None, logger if dist_env.is_main else None)

    def save_recovery(epoch: int, steps_done: int) -> None:
        nonfinite_guard.check()  # never save weights that a non-finite step touched
        check_state(f'in epoch {epoch} after step {steps_done}')
        save_recovery_point(saver, training_state, epoch, steps_done, train_loader.batch_size, dist_env.world_size,
                            epoch * steps_per_epoch + steps_done, device, logger)

    with StopRequest() as stop:
        for epoch in range(start_epoch, total_epochs):
            # Seed per epoch so that drop path and mixup draw the same numbers whether or not the run
            # was resumed; per-image augmentation is seeded in the dataset.
            set_seed(seed, epoch, dist_env.rank)
            resuming = recovery is not None and epoch == recovery['epoch']
            train_loader.sampler.set_epoch(epoch, recovery['samples_seen'] if resuming else 0)
            if resuming and len(recovery['rng']) == dist_env.world_size:
                restore_rng_state(recovery['rng'][dist_env.rank], device)  # continue mid-epoch random streams
            if mixup_fn is not None and mixup_off_epoch and epoch >= mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            points = RecoveryPoints(stop, functools.partial(save_recovery, epoch), device, recovery_interval,
                                    sync_every=STOP_CHECK_STEPS if dist_env.distributed else 1)
            first_step = start_step if resuming else 0
            train_stats = train_one_epoch(
                train_model, train_loader, criterion, optimizer, precision, device, epoch, dist_env, logger,
                mixup_fn=mixup_fn, lr_scheduler=scheduler, num_updates=epoch * steps_per_epoch + first_step,
                clip_grad=clip_grad, clip_mode=clip_mode, model_ema=model_ema, log_interval=log_interval,
                max_steps=max_steps, channels_last=channels_last, nonfinite_guard=nonfinite_guard,
                start_step=first_step, on_step_end=points, show_progress=show_progress)
            report.losses(train_stats['logged_losses'])
            if train_stats['stopped']:
                raise Preempted(f'stopped by {stop.signal_name or "a signal on another rank"} in epoch {epoch} after '
                                f'step {points.stopped_after}; {recovery_path(run_dir)} holds that point: run the same command '
                                'with --resume auto (and the same --experiment) to continue',
                                stop.signal_name or 'SIGTERM')
            nonfinite_guard.check()
            if dist_bn:
                distribute_bn(model, dist_env.world_size, reduce=dist_bn == 'reduce')
            check_state(f'after epoch {epoch}')
            metrics = evaluate(eval_model, val_loader, **eval_kwargs)
            if model_ema is not None:
                if dist_bn:
                    distribute_bn(model_ema, dist_env.world_size, reduce=dist_bn == 'reduce')
                metrics = evaluate(model_ema.module, val_loader, log_prefix='EMA ', **eval_kwargs)
            scheduler.step(epoch + 1, metrics['top1'])
            if dist_env.is_main:
                best = saver.save(training_state(), epoch, metrics['top1'])
            elif best is None or metrics['top1'] > best[0]:
                best = (metrics['top1'], epoch)  # every rank has the same metrics
            # After the checkpoint: a full disk must not cost the epoch (the reports name their own write
            # failures and the run goes on).
            report.epoch(epoch_record(epoch, train_stats, metrics), best)
            if stop_requested(stop, device):  # the signal came during evaluation or saving
                raise Preempted(f'stopped by {stop.signal_name or "a signal on another rank"} after epoch {epoch}, '
                                f'which is saved in {LAST_FILE}: run the same command with --resume auto to continue',
                                stop.signal_name or 'SIGTERM')
    return best

#!/usr/bin/env python3
"""Train or evaluate a VAN model on an ImageFolder dataset (the reference recipe by default).

    python main.py --data_path DIR [--model van_b0] [--amp] [--device auto|npu|cuda|cpu] ...
    torchrun --nproc_per_node 8 main.py --data_path DIR --model van_base -b 128 --amp
    python main.py --data_path DIR --eval --resume output/train/RUN/model_best.pth.tar

This file only wires the parts in utils/ together: `run` goes through its phases (setup, model,
data, placement, training parts, then evaluation or training). Every option and its rule is in
utils/options.py; the errors a user can cause are utils/errors.py's, reported here in one line.
"""
import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import timm
import torch
from timm.utils import ModelEmaV3

import models  # noqa: F401  (registers the VAN variants with timm)
from models.weights import load_pretrained
from utils.amp import amp_backend_for, create_precision
from utils.checkpoint import (BEST_FILE, CHECKPOINTS_ON_DISK, LAST_FILE, RunCheckpoints, check_output_dir,
                              estimate_checkpoint_bytes, find_checkpoint, prepare_run_dir, resolve_run_dir, run_options,
                              save_run_args, training_state)
from utils.data import (RunData, build_datasets, build_loaders, build_mixup, build_train_criterion,
                        check_dataset_layout, find_class_map, find_split_dirs)
from utils.device import (DistEnv, check_memory_format, cleanup_distributed, is_peer_failure, peer_failure_message,
                          pin_memory_settings, setup_device)
from utils.engine import TrainingParts, TrainSettings, evaluate_parts, fit
from utils.errors import DatasetError, ModelError, UserError
from utils.images import resolve_eval_config
from utils.optim import create_optimizer, create_scheduler
from utils.options import (adopt_optimizer_options, eval_overrides, parse_args, plain_args, resolve_recipe,
                           schedule_options, train_augmentation, train_settings)
from utils.reporting import (LOG_FILE, RESULTS_FILE, TENSORBOARD_DIR, RunReport, RunResults, create_writer,
                             progress_enabled, setup_logger)
from utils.resume import Preempted, ResumePoint, restore_training, set_seed


@dataclass
class RunContext:
    """Where the run happens and what it reports to: the result of `setup`."""
    dist_env: DistEnv
    logger: logging.Logger
    run_dir: Optional[str]  # None for --eval, which writes no run dir
    train_dir: str
    classes: Dict[str, int]  # class folder -> index, from the training split
    results: RunResults
    show_progress: bool  # a progress bar only where someone watches (rank 0, stderr a terminal)


def setup(args, resources: contextlib.ExitStack, started: Optional[float]) -> RunContext:
    """Device, dataset check, run dir and its lock, logger, the recipe line, args.yaml, results file."""
    dist_env = setup_device(args.device, args.local_rank, args.dist_timeout)
    check_memory_format(dist_env.device, args.channels_last)
    # The dataset first: a layout error must not leave an empty run dir behind.
    check_dataset_layout(args.data_path, need_train=not args.eval)
    train_dir, _ = find_split_dirs(args.data_path)
    classes = find_class_map(train_dir)
    run_dir = None if args.eval else resolve_run_dir(args.output, args.experiment, args.resume == 'auto',
                                                     f'{args.model}-{args.img_size or 224}')
    run_lock = prepare_run_dir(run_dir, dist_env, resources) if run_dir else None
    logger = setup_logger(dist_env.is_main, os.path.join(run_dir, LOG_FILE) if run_dir else None)
    logger.info(f'device {dist_env.device}, world size {dist_env.world_size}' + (f', run dir {run_dir}' if run_dir else ''))
    if run_lock and run_lock.describe_takeover():
        logger.info(run_lock.describe_takeover())
    recipe = resolve_recipe(args, dist_env.world_size)  # before args.yaml: the run records what it uses
    if not args.eval:
        logger.info(recipe)
    if run_dir and dist_env.is_main:
        save_run_args(run_dir, plain_args(args))
    results_path = args.results or (os.path.join(run_dir, RESULTS_FILE) if run_dir else None)
    results = RunResults(results_path if dist_env.is_main else None, 'eval' if args.eval else 'train', args.model,
                         dist_env.world_size, args.batch_size, logger, started)
    return RunContext(dist_env, logger, run_dir, train_dir, classes, results, progress_enabled(dist_env.is_main))


def create_model(args, num_classes: int, class_to_idx=None, logger=None):
    """The model, with the --pretrained weights whose head rows are matched to the dataset's classes
    (`class_to_idx`) by name when the file names its classes; evaluation never runs a fresh head."""
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  lka_impl=args.lka_impl)
    try:
        model = timm.create_model(args.model, **kwargs)
        if args.pretrained:
            for note in load_pretrained(model, args.pretrained, args.model, require_head=args.eval,
                                        class_to_idx=class_to_idx):
                if logger is not None:
                    logger.info(note)
        return model
    except (FileNotFoundError, ValueError) as error:  # the models package's messages name the fix
        raise ModelError(f'cannot build {args.model!r}: {error}') from None
    except RuntimeError as error:
        if 'Unknown model' in str(error) or args.pretrained:
            raise ModelError(f'cannot build {args.model!r}: {error}') from None
        raise


def build_model(args, ctx: RunContext) -> torch.nn.Module:
    """The model (same initial weights on every rank), once the disk has room for its checkpoints."""
    num_classes = args.num_classes or len(ctx.classes)
    if num_classes < len(ctx.classes):
        raise DatasetError(f'--num-classes {num_classes} is smaller than the {len(ctx.classes)} class folders '
                           f'in {ctx.train_dir!r}')
    set_seed(args.seed)
    model = create_model(args, num_classes, ctx.classes, ctx.logger)
    if ctx.run_dir and ctx.dist_env.is_main:
        check_output_dir(ctx.run_dir, CHECKPOINTS_ON_DISK * estimate_checkpoint_bytes(model, ema=args.model_ema))
    return model


def build_data(args, ctx: RunContext, model: torch.nn.Module) -> RunData:
    """Datasets and loaders, preprocessed as the model's config (and the options) say."""
    data_config = resolve_eval_config(model, eval_overrides(args))
    train_set, val_set, class_to_idx = build_datasets(args.data_path, data_config, train_augmentation(args), args.seed,
                                                      with_train=not args.eval, strict_data=args.strict_data)
    dist_env = ctx.dist_env
    pin_memory, pin_memory_device = pin_memory_settings(dist_env.device, args.pin_mem)
    train_loader, val_loader = build_loaders(
        train_set, val_set, args.batch_size, args.validation_batch_size or args.batch_size,
        args.workers, dist_env.rank, dist_env.world_size, args.seed, pin_memory, pin_memory_device)
    ctx.logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {model.num_classes} '
                    f'classes, {len(train_set) if train_set else "-"} train / {len(val_set)} val images, '
                    f'input {data_config.input_size}')
    return RunData(train_set, val_set, class_to_idx, train_loader, val_loader)


def place_model(args, ctx: RunContext, model: torch.nn.Module) -> torch.nn.Module:
    """The model on its device, in its memory format, with synchronised BatchNorm when asked."""
    model.to(ctx.dist_env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    ctx.logger.info(f'lka_impl {model.lka_impl}, memory format {"channels_last" if args.channels_last else "NCHW"}, '
                    f'torch.compile {"on" if args.compile else "off"}, '
                    f'cudnn.benchmark {"on" if args.cudnn_benchmark else "off"}')
    if args.sync_bn and ctx.dist_env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_training(args, ctx: RunContext, model: torch.nn.Module,
                   data: RunData) -> Tuple[TrainingParts, ResumePoint, TrainSettings]:
    """Optimizer, precision, EMA and schedule, continued from the --resume checkpoint; returns the parts, where
    the run continues and the settings of the loops."""
    dist_env, logger, device = ctx.dist_env, ctx.logger, ctx.dist_env.device
    search_dir = os.path.join(args.output, args.experiment or '') if args.eval else ctx.run_dir
    checkpoint_path, checkpoint = find_checkpoint(args.resume, search_dir, logger, for_eval=args.eval)
    if checkpoint is not None and not args.eval and adopt_optimizer_options(args, checkpoint, checkpoint_path, logger) \
            and dist_env.is_main:
        save_run_args(ctx.run_dir, plain_args(args))
    optimizer = create_optimizer(model, device, args.opt, args.lr, args.weight_decay, args.momentum,
                                 args.opt_eps, args.opt_betas, amp_backend_for(args.amp, args.amp_backend, device))
    model, optimizer, precision = create_precision(model, optimizer, device, args.amp, args.amp_backend,
                                                   args.opt_level, args.loss_scale, args.amp_dtype)
    logger.info(f'{precision}, optimizer {type(optimizer).__name__}')
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    settings = train_settings(args, dist_env.distributed, ctx.show_progress)
    scheduler, settings.epochs = create_scheduler(
        optimizer, args.epochs, args.cooldown_epochs, args.warmup_epochs, args.warmup_lr, args.min_lr, args.sched,
        args.decay_epochs, args.decay_rate, args.sched_on_updates,
        settings.steps_per_epoch(len(data.train_loader) if data.train_loader else 1))
    parts = TrainingParts(model, data.train_loader, None, optimizer, precision, scheduler, data.val_loader,
                          model_ema=model_ema)
    resume = ResumePoint()
    if checkpoint is not None:
        resume = restore_training(
            checkpoint, checkpoint_path, parts, data.class_to_idx, logger, run_dir=ctx.run_dir, weights_only=args.eval,
            keep_schedule=schedule_options(run_options(checkpoint)) == schedule_options(vars(args)),
            train_samples=len(data.train_set) if data.train_set else None)
    parts.eval_model = parts.train_model = torch.compile(model) if args.compile else model
    if dist_env.distributed:
        parts.train_model = torch.nn.parallel.DistributedDataParallel(
            parts.eval_model, device_ids=None if device.type == 'cpu' else [device.index])
    return parts, resume, settings


def train(args, ctx: RunContext, parts: TrainingParts, resume: ResumePoint, settings: TrainSettings, data: RunData) -> None:
    """Train to the end of the schedule, saving and reporting each epoch; then the curves and the best line."""
    dist_env, logger = ctx.dist_env, ctx.logger
    parts.mixup_fn = build_mixup(args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_prob, args.mixup_switch_prob,
                                 args.mixup_mode, args.smoothing, parts.model.num_classes)
    parts.criterion = build_train_criterion(parts.mixup_fn, args.smoothing)
    if dist_env.is_main:
        parts.saver = RunCheckpoints(ctx.run_dir, args.checkpoint_hist, resume.history, resume.best)
    parts.training_state = functools.partial(
        training_state, parts.model, parts.optimizer, parts.scheduler, parts.precision, parts.model_ema, args.model,
        plain_args(args), data.class_to_idx, len(data.train_set))
    tensorboard = create_writer(args.tensorboard, os.path.join(ctx.run_dir, TENSORBOARD_DIR), dist_env.is_main, logger)
    parts.report = RunReport.for_run(ctx.run_dir, dist_env.is_main, logger, tensorboard, ctx.results)
    ctx.results.start(resume.epoch)
    best = fit(parts, settings, dist_env, logger, ctx.run_dir, resume)
    parts.report.finish(best, ctx.run_dir, logger, ema_file=BEST_FILE if parts.model_ema is not None else None)


def run(args, resources: contextlib.ExitStack, started: Optional[float] = None) -> None:
    """The whole run, phase by phase; what it must hold until it ends (the run dir lock) goes on `resources`."""
    ctx = setup(args, resources, started)
    model = build_model(args, ctx)
    data = build_data(args, ctx, model)
    model = place_model(args, ctx, model)
    parts, resume, settings = build_training(args, ctx, model, data)
    if args.eval:
        ctx.results.set_evaluation(evaluate_parts(parts, settings, ctx.dist_env, ctx.logger))
    else:
        train(args, ctx, parts, resume, settings, data)


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv, description=__doc__)
    try:
        with contextlib.ExitStack() as resources:
            run(args, resources, started)
    except UserError as error:  # utils.errors: one message, exit status 2, no traceback
        print(f'error: {error}', file=sys.stderr, flush=True)
        return 2
    except Preempted as stopped:
        print(stopped, file=sys.stderr, flush=True)
        return stopped.exit_status
    except KeyboardInterrupt:
        print(f'interrupted; the last completed epoch is in {LAST_FILE} (--resume auto continues)', file=sys.stderr)
        return 130
    except Exception as error:
        if not is_peer_failure(error):
            raise
        print(f'error: {peer_failure_message(error)}', file=sys.stderr, flush=True)
        return 1
    finally:
        cleanup_distributed()
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python3
"""Train or evaluate a VAN model on an ImageFolder dataset (the reference recipe by default).

    python main.py --data_path DIR [--model van_b0] [--amp] [--device auto|npu|cuda|cpu] ...
    torchrun --nproc_per_node 8 main.py --data_path DIR --model van_base -b 128 --amp
    python main.py --data_path DIR --eval --resume output/train/RUN/model_best.pth.tar

This file only wires the parts in utils/ together; see `build_parser` for every option.
"""
import argparse
import contextlib
import functools
import os
import sys

import torch
import yaml

import models  # registers the VAN variants with timm
from models.weights import load_pretrained
import timm
from timm.utils import ModelEmaV3


from utils.errors import CheckpointError, DatasetError, ModelError, OptionError, UserError
from utils.amp import AMP_BACKENDS, AMP_DTYPES, OPT_LEVELS, amp_backend_for, create_precision, parse_loss_scale
from utils.checkpoint import (BEST_FILE, CHECKPOINTS_ON_DISK, LAST_FILE, RECOVERY_FILE, RunCheckpoints, check_output_dir,
                              estimate_checkpoint_bytes, find_checkpoint, prepare_run_dir, resolve_run_dir, run_options,
                              save_run_args, training_state)
from utils.resume import Preempted, ResumePoint, restore_training, set_seed
from utils.images import resolve_eval_config
from utils.data import (build_datasets, build_loaders, build_mixup, build_train_criterion, check_dataset_layout,
                        find_class_map, find_split_dirs)
from utils.device import (DEVICE_CHOICES, check_memory_format, cleanup_distributed,
                          init_distributed_device, is_peer_failure, pin_memory_settings)
from utils.engine import TrainSettings, TrainingParts, evaluate, fit
from utils.optim import LR_BASE_SCALES, check_optimizer, check_schedule, create_optimizer, create_scheduler, effective_lr
from utils.options import (IMG_SIZE, Number, augment_policy, convert_values, interpolation_name,
                           optimizer_name, scheduler_name, train_interpolation_name)
from utils.reporting import LOG_FILE, TENSORBOARD_DIR, RunReport, create_writer, plot_run_curves, progress_enabled, setup_logger

# Rules shared by several options (each option's own rule is its `type=`, see utils/options.py).
PROBABILITY = Number(float, at_least=0, at_most=1)
RATE = Number(float, at_least=0, below=1)  # dropout, drop path, label smoothing, betas
POSITIVE = Number(float, above=0)
NON_NEGATIVE = Number(float, at_least=0)
COUNT = Number(int, at_least=1)
NON_NEGATIVE_INT = Number(int, at_least=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='YAML',
                        help='YAML file whose keys (flag names, - or _) set defaults; the command line wins')
    group = parser.add_argument_group('data')
    group.add_argument('data_dir', nargs='?', default=None, help='dataset root (same as --data_path)')
    group.add_argument('--data_path', '--data-path', dest='data_path', default=None, metavar='DIR',
                       help='dataset root holding train/ and val/ (or validation/), one folder per class')
    group.add_argument('-j', '--workers', type=NON_NEGATIVE_INT, default=4, help='data loading processes per device')
    group.add_argument('--pin-mem', action='store_true', help='pin host memory of batches (faster copies to the GPU; always on for NPU)')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='van_b0', choices=models.MODEL_NAMES, metavar='NAME',
                       help='van_b0..van_b6, van_tiny/small/base/large')
    group.add_argument('--pretrained', default=None, metavar='PATH',
                       help='start from these weights (official, timm-style checkpoint or HuggingFace file)')
    group.add_argument('--num-classes', type=Number(int, at_least=1, at_most=1_000_000), default=None,
                       help='default: the number of class folders')
    group.add_argument('--lka-impl', default='auto', choices=models.lka_impls(),
                       help="implementation of the block's depthwise convolutions: auto (= fast: faster on CPU, "
                            "nn.Conv2d elsewhere), plain (nn.Conv2d), polyphase or triton (CUDA candidates, "
                            "not yet measured; tools/gpu_benchmark.sh)")
    group.add_argument('--img-size', type=IMG_SIZE, default=None, help='input size (default: the model\'s, 224)')
    group.add_argument('--crop-pct', type=Number(float, above=0, at_most=1), default=None,
                       help='eval center-crop fraction (default 0.9)')
    group.add_argument('--mean', type=Number(float), nargs=3, default=None, metavar='M', help='normalisation mean')
    group.add_argument('--std', type=POSITIVE, nargs=3, default=None, metavar='S', help='normalisation std')
    group.add_argument('--interpolation', type=interpolation_name, default=None,
                       help='eval resize interpolation (default bicubic)')
    group.add_argument('--drop', type=RATE, default=0.0, help='dropout rate')
    group.add_argument('--drop-path', type=RATE, default=None,
                       help=f'stochastic depth rate (default: the variant\'s recipe value, {_recipe_drop_paths()})')
    group.add_argument('--channels-last', action='store_true', help='run the model in channels_last memory format')
    group.add_argument('--compile', action='store_true', help='torch.compile the model')
    group.add_argument('--cudnn-benchmark', action='store_true',
                       help='let cuDNN time its algorithms for each new input shape (fixed-size training on CUDA)')
    group.add_argument('--sync-bn', action='store_true', help='synchronise BatchNorm statistics across devices')
    group.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''),
                       help='after each epoch average (reduce) or copy rank 0\'s (broadcast) BN statistics')
    group.add_argument('--model-ema', action='store_true', help='keep, evaluate and save an EMA of the weights')
    group.add_argument('--model-ema-decay', type=PROBABILITY, default=0.9998, help='EMA decay per update')

    group = parser.add_argument_group('optimizer and schedule')
    group.add_argument('-b', '--batch-size', type=COUNT, default=128, help='batch size per device')
    group.add_argument('-vb', '--validation-batch-size', type=COUNT, default=None, help='default: --batch-size')
    group.add_argument('--opt', type=optimizer_name, default='adamw', help='any timm optimizer name')
    group.add_argument('--opt-eps', type=POSITIVE, default=None, help='optimizer epsilon')
    group.add_argument('--opt-betas', type=RATE, nargs='+', default=None, help='optimizer betas')
    group.add_argument('--momentum', type=PROBABILITY, default=0.9, help='SGD momentum')
    group.add_argument('--weight-decay', type=NON_NEGATIVE, default=0.05,
                       help='not applied to biases and 1-D parameters')
    group.add_argument('--clip-grad', type=POSITIVE, default=None, help='gradient clipping value (off by default)')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    group.add_argument('--sched', type=scheduler_name, default='cosine', help='timm scheduler name')
    group.add_argument('--lr', type=POSITIVE, default=None,
                       help='peak learning rate (default: --lr-base scaled to the global batch, batch size x '
                            'processes: 1e-3 at 8 x 128, 1.25e-4 at 1 x 128)')
    group.add_argument('--lr-base', type=POSITIVE, default=1e-3,
                       help='learning rate of a global batch of --lr-base-size (default 1e-3)')
    group.add_argument('--lr-base-size', type=COUNT, default=1024,
                       help='the global batch that --lr-base belongs to (default 1024)')
    group.add_argument('--lr-base-scale', default='linear', choices=LR_BASE_SCALES,
                       help='linear (default): lr = lr-base x global batch / lr-base-size; '
                            'sqrt: lr-base x the square root of that ratio')
    group.add_argument('--warmup-lr', type=NON_NEGATIVE, default=1e-6, help='learning rate at the start of warmup')
    group.add_argument('--min-lr', type=NON_NEGATIVE, default=1e-6, help='end of the cosine and the cooldown lr')
    group.add_argument('--epochs', type=COUNT, default=300, help='epochs of the schedule (cooldown comes on top)')
    group.add_argument('--warmup-epochs', type=NON_NEGATIVE_INT, default=5)
    group.add_argument('--cooldown-epochs', type=NON_NEGATIVE_INT, default=10)
    group.add_argument('--decay-epochs', type=POSITIVE, default=100, help='step schedulers: epochs between decays')
    group.add_argument('--decay-rate', type=POSITIVE, default=0.1, help='step schedulers: decay factor')
    group.add_argument('--sched-on-updates', action='store_true',
                       help='update the learning rate every step instead of once per epoch (the reference '
                            'steps once per epoch)')

    group = parser.add_argument_group('augmentation and regularisation')
    group.add_argument('--train-interpolation', type=train_interpolation_name, default='random',
                       help='training resize interpolation')
    group.add_argument('--scale', type=Number(float, above=0, at_most=1), nargs=2, default=(0.08, 1.0),
                       help='random-resized-crop area range')
    group.add_argument('--ratio', type=POSITIVE, nargs=2, default=(3. / 4., 4. / 3.),
                       help='random-resized-crop aspect range')
    group.add_argument('--hflip', type=PROBABILITY, default=0.5)
    group.add_argument('--vflip', type=PROBABILITY, default=0.0)
    group.add_argument('--color-jitter', type=NON_NEGATIVE, default=0.4)
    group.add_argument('--aa', type=augment_policy, default='rand-m9-mstd0.5-inc1',
                       help="auto-augment policy; 'none' disables it")
    group.add_argument('--reprob', type=PROBABILITY, default=0.25, help='random erasing probability')
    group.add_argument('--remode', default='pixel', choices=('pixel', 'rand', 'const'), help='random erasing mode')
    group.add_argument('--recount', type=COUNT, default=1, help='random erasing count')
    group.add_argument('--mixup', type=NON_NEGATIVE, default=0.8, help='mixup alpha (0 = off)')
    group.add_argument('--cutmix', type=NON_NEGATIVE, default=1.0, help='cutmix alpha (0 = off)')
    group.add_argument('--cutmix-minmax', type=Number(float, above=0, at_most=1), nargs=2, default=None)
    group.add_argument('--mixup-prob', type=PROBABILITY, default=1.0)
    group.add_argument('--mixup-switch-prob', type=PROBABILITY, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    group.add_argument('--mixup-off-epoch', type=NON_NEGATIVE_INT, default=0,
                       help='turn mixup off from this epoch (0 = never)')
    group.add_argument('--smoothing', type=RATE, default=0.1, help='label smoothing')

    group = parser.add_argument_group('precision and device')
    group.add_argument('--amp', action='store_true', help='mixed precision (O1)')
    group.add_argument('--amp-backend', default=None, choices=AMP_BACKENDS,
                       help='auto (default): apex on NPU when installed, else native torch.autocast')
    group.add_argument('--opt-level', default=None, choices=OPT_LEVELS, help='apex opt level (default O1)')
    group.add_argument('--loss-scale', type=loss_scale, default=None, help="'dynamic' (default) or a fixed number")
    group.add_argument('--amp-dtype', default=None, choices=AMP_DTYPES,
                       help='native autocast type; auto (default) = float16 on GPU/NPU, bfloat16 on CPU')
    group.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    group.add_argument('--local_rank', '--local-rank', dest='local_rank', type=Number(int, at_least=-1), default=-1,
                       help='set by torch.distributed.launch; torchrun uses LOCAL_RANK instead')

    group = parser.add_argument_group('run')
    group.add_argument('--seed', type=Number(int, at_least=0, at_most=2**63 - 1), default=42)
    group.add_argument('--output', default='./output/train', metavar='DIR', help='parent of the run dir')
    group.add_argument('--experiment', default=None, metavar='NAME',
                       help='run dir name (default <YYYYmmdd-HHMMSS>-<model>-<img size>)')
    group.add_argument('--resume', default=None, metavar='PATH|auto',
                       help="continue a run from a checkpoint; 'auto' = newest checkpoint in the run dir")
    group.add_argument('--eval', action='store_true', help='only evaluate --resume/--pretrained weights')
    group.add_argument('--log-interval', type=COUNT, default=50, help='steps between training log lines')
    group.add_argument('--checkpoint-hist', type=NON_NEGATIVE_INT, default=10,
                       help='keep the best N checkpoint-<epoch> files')
    group.add_argument('--max-steps-per-epoch', type=COUNT, default=None,
                       help='cap the steps of each epoch (performance runs)')
    group.add_argument('--tensorboard', action='store_true',
                       help='also write per-epoch scalars to <run dir>/tensorboard (needs the tensorboard package)')

    group = parser.add_argument_group('faults')
    group.add_argument('--strict-data', action='store_true',
                       help='stop at the first unreadable image (default: skip it, report it, count it)')
    group.add_argument('--recovery-interval', type=NON_NEGATIVE_INT, default=0, metavar='N',
                       help=f'also write {RECOVERY_FILE} every N steps (0 = only on SIGTERM/SIGINT)')
    group.add_argument('--max-nonfinite-steps', type=COUNT, default=20, metavar='N',
                       help='stop when the loss is NaN/inf for N steps in a row under the float16 loss scaler '
                            '(without a scaler the first one stops the run)')
    group.add_argument('--dist-timeout', type=Number(float, at_least=1), default=600, metavar='SECONDS',
                       help='a process waiting longer than this for the others (one died or hangs) stops with a message')
    return parser


def _recipe_drop_paths() -> str:
    """'0.1 for van_b0, van_b1, van_b2; 0.2 for ...' from the variant table."""
    by_rate = {}
    for variant, rate in models.RECIPE_DROP_PATH.items():
        by_rate.setdefault(rate, []).append(variant)
    return '; '.join(f'{rate:g} for {", ".join(names)}' for rate, names in by_rate.items())


def loss_scale(text: str):
    """argparse type of --loss-scale (the rule lives in utils.amp.parse_loss_scale)."""
    try:
        return parse_loss_scale(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ordered(flag):
    def rule(args):
        low, high = getattr(args, flag.lstrip('-').replace('-', '_')) or (0, 0)
        return f'{flag} takes a range: the first value must not exceed the second, got {low:g} {high:g}' \
            if low > high else None
    return rule


def _amp_options_need_amp(args):
    given = [flag for flag, value in (('--amp-backend', args.amp_backend), ('--opt-level', args.opt_level),
                                      ('--loss-scale', args.loss_scale), ('--amp-dtype', args.amp_dtype))
             if value is not None]
    return f'{", ".join(given)} only apply with --amp' if given and not args.amp else None


def _schedule_builds(args):
    try:
        check_schedule(args.sched, args.epochs, args.cooldown_epochs, args.warmup_epochs, args.warmup_lr,
                       args.min_lr, args.decay_epochs, args.decay_rate, args.sched_on_updates)
    except ValueError as error:
        return f'--sched: {error}'
    return None


def _optimizer_builds(args):
    try:
        check_optimizer(args.opt, args.lr or 1e-3, args.weight_decay, args.momentum, args.opt_eps, args.opt_betas)
    except ValueError as error:
        return f'--opt: {error}'
    return None


# Rules that involve several options: each returns the error message, or None when the options agree.
COMBINATION_RULES = (
    lambda a: None if a.data_path else 'the dataset root is required: --data_path DIR (DIR/train and DIR/val)',
    lambda a: '--eval needs the weights to evaluate: --resume PATH or --pretrained PATH'
    if a.eval and not (a.resume or a.pretrained) else None,
    _amp_options_need_amp,
    lambda a: f'--opt-level {a.opt_level} needs --amp-backend apex; native autocast is O1 only'
    if a.opt_level not in (None, 'O1') and a.amp_backend == 'native' else None,
    lambda a: f'mixup/cutmix mixes pairs and needs an even --batch-size (got {a.batch_size}); '
              'change it or pass --mixup 0 --cutmix 0'
    if (a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None) and a.batch_size % 2 else None,
    lambda a: '--eval --resume auto needs --experiment NAME to know which run to evaluate'
    if a.resume == 'auto' and a.eval and not a.experiment else None,
    _ordered('--scale'), _ordered('--ratio'), _ordered('--cutmix-minmax'),
    _schedule_builds,
    _optimizer_builds,
)


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict:
    """The YAML file's option values, checked by the same rules as the command line."""
    try:
        with open(path, encoding='utf-8') as f:
            config = yaml.safe_load(f) or {}
    except OSError as error:
        parser.error(f'cannot read --config {path!r}: {error.strerror}')
    except UnicodeDecodeError:
        parser.error(f'--config {path!r} is not a text file (YAML of option: value lines)')
    except yaml.YAMLError as error:
        parser.error(f'--config {path!r} is not valid YAML: {error}')
    except RecursionError:
        parser.error(f'--config {path!r} is nested too deeply to be an option file')
    if not isinstance(config, dict):
        parser.error(f'--config {path!r} must be a mapping of option: value')
    values = {str(key).replace('-', '_'): value for key, value in config.items()}
    if 'config' in values:
        parser.error(f'--config {path!r} names another config file; put all options in one file')
    try:
        return convert_values(parser, values, f'--config {path!r}')
    except OptionError as error:
        parser.error(str(error))


def parse_args(argv=None) -> argparse.Namespace:
    """Command line over YAML config over recipe defaults; every value is checked by its option's rule
    (utils/options.py), then the rules between options (COMBINATION_RULES), all before anything starts."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        parser.set_defaults(**_read_config(parser, args.config))
    args = parser.parse_args(argv)

    args.data_path = args.data_path or args.data_dir
    for rule in COMBINATION_RULES:
        message = rule(args)
        if message:
            parser.error(message)
    args.amp_backend = args.amp_backend or 'auto'
    args.opt_level = args.opt_level or 'O1'
    args.amp_dtype = args.amp_dtype or 'auto'
    args.loss_scale = args.loss_scale or 'dynamic'
    return args


def resolve_recipe(args, world_size: int) -> str:
    """Fill in the options whose recipe value depends on the run, in args: --lr from the global batch
    (--batch-size x world size, utils.optim.effective_lr), --drop-path from the variant table. Values
    given on the command line or in --config stay. Returns the log line that states the result."""
    global_batch = args.batch_size * world_size
    if args.lr is not None:
        lr_source = 'given'
    else:
        ratio = f'{global_batch} / {args.lr_base_size}'
        lr_source = f'--lr-base {args.lr_base:g} x ' + (ratio if args.lr_base_scale == 'linear' else f'sqrt({ratio})')
    args.lr = effective_lr(args.lr, global_batch, args.lr_base, args.lr_base_size, args.lr_base_scale)
    if args.drop_path is not None:
        drop_path_source = 'given'
    else:
        try:
            args.drop_path = models.recipe_drop_path(args.model)
        except ValueError as error:
            raise ModelError(str(error)) from None
        drop_path_source = f'{args.model} recipe'
    return (f'settings: model {args.model}, world size {world_size}, global batch {global_batch} '
            f'({world_size} x {args.batch_size}), lr {args.lr:.6g} ({lr_source}), '
            f'drop path {args.drop_path:g} ({drop_path_source})')


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


SCHEDULE_OPTIONS = ('sched', 'lr', 'warmup_lr', 'min_lr', 'epochs', 'warmup_epochs', 'cooldown_epochs',
                    'decay_epochs', 'decay_rate', 'sched_on_updates')


def schedule_options(args: dict) -> dict:
    """The options that shape the learning-rate schedule: a resumed run takes the checkpoint's scheduler
    state only when they are unchanged."""
    return {k: args.get(k) for k in SCHEDULE_OPTIONS}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def plain_args(args) -> dict:
    """args as a dict of plain values (loadable with weights_only=True, writable as YAML)."""
    return {k: _plain(v) for k, v in vars(args).items()}


# A resumed run continues with the optimizer it was saved with: the optimizer state fits no other class,
# and loading it restores these settings anyway. (The learning rate belongs to the schedule, SCHEDULE_OPTIONS.)
OPTIMIZER_OPTIONS = ('opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay')


def adopt_optimizer_options(args, checkpoint: dict, path: str, logger) -> bool:
    """Set args' optimizer options to those stored in the checkpoint (checked by the options' own rules),
    with one log line naming what changed; returns whether anything did."""
    saved = run_options(checkpoint)
    try:
        saved = convert_values(build_parser(), {k: saved[k] for k in OPTIMIZER_OPTIONS if k in saved},
                               f'the options stored in {path!r}')
    except OptionError as error:
        raise CheckpointError(str(error)) from None
    changed = {k: v for k, v in saved.items() if _plain(v) != _plain(getattr(args, k))}
    if not changed:
        return False
    flags = ', '.join(f'--{k.replace("_", "-")} {v if not isinstance(v, list) else " ".join(map(str, v))} '
                      f'(not {getattr(args, k)})' for k, v in changed.items())
    logger.info(f'resuming with the optimizer settings of {path}: {flags}; a run keeps its optimizer when it '
                'resumes (to change it, start a new run from these weights with --pretrained)')
    for key, value in changed.items():
        setattr(args, key, value)
    return True


def run(args, resources: contextlib.ExitStack) -> None:
    """The whole run; what it must hold until it ends (the run dir lock) goes on `resources`."""
    dist_env = init_distributed_device(args.device, args.local_rank, args.dist_timeout)
    device = dist_env.device
    check_memory_format(device, args.channels_last)
    # The dataset first: a layout error must not leave an empty run dir behind.
    check_dataset_layout(args.data_path, need_train=not args.eval)
    train_dir, _ = find_split_dirs(args.data_path)
    classes = find_class_map(train_dir)
    run_dir = None if args.eval else resolve_run_dir(args.output, args.experiment, args.resume == 'auto',
                                                     f'{args.model}-{args.img_size or 224}')
    run_lock = prepare_run_dir(run_dir, dist_env, resources) if run_dir else None
    logger = setup_logger(dist_env.is_main, os.path.join(run_dir, LOG_FILE) if run_dir else None)
    logger.info(f'device {device}, world size {dist_env.world_size}' + (f', run dir {run_dir}' if run_dir else ''))
    if run_lock and run_lock.describe_takeover():
        logger.info(run_lock.describe_takeover())
    settings = resolve_recipe(args, dist_env.world_size)  # before args.yaml: the run records what it uses
    if not args.eval:
        logger.info(settings)
    if run_dir and dist_env.is_main:
        save_run_args(run_dir, plain_args(args))

    num_classes = args.num_classes or len(classes)
    if num_classes < len(classes):
        raise DatasetError(f'--num-classes {num_classes} is smaller than the {len(classes)} class folders '
                           f'in {train_dir!r}')

    set_seed(args.seed)  # same initial weights on every rank
    model = create_model(args, num_classes, classes, logger)
    if run_dir and dist_env.is_main:
        check_output_dir(run_dir, CHECKPOINTS_ON_DISK * estimate_checkpoint_bytes(model, ema=args.model_ema))
    data_config = resolve_eval_config(model, dict(img_size=args.img_size, crop_pct=args.crop_pct, mean=args.mean,
                                                  std=args.std, interpolation=args.interpolation))
    train_aug = dict(scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
                     color_jitter=args.color_jitter, auto_augment=None if args.aa == 'none' else args.aa,
                     re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                     interpolation=args.train_interpolation)
    train_set, val_set, class_to_idx = build_datasets(args.data_path, data_config, train_aug, args.seed,
                                                      with_train=not args.eval, strict_data=args.strict_data)
    pin_memory, pin_memory_device = pin_memory_settings(device, args.pin_mem)
    train_loader, val_loader = build_loaders(
        train_set, val_set, args.batch_size, args.validation_batch_size or args.batch_size,
        args.workers, dist_env.rank, dist_env.world_size, args.seed, pin_memory, pin_memory_device)
    logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {num_classes} classes, '
                f'{len(train_set) if train_set else "-"} train / {len(val_set)} val images, input {data_config.input_size}')

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    logger.info(f'lka_impl {model.lka_impl}, memory format {"channels_last" if args.channels_last else "NCHW"}, '
                f'torch.compile {"on" if args.compile else "off"}, '
                f'cudnn.benchmark {"on" if args.cudnn_benchmark else "off"}')
    if args.sync_bn and dist_env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    search_dir = os.path.join(args.output, args.experiment or '') if args.eval else run_dir
    checkpoint_path, checkpoint = find_checkpoint(args.resume, search_dir, logger, for_eval=args.eval)
    if checkpoint is not None and not args.eval and adopt_optimizer_options(args, checkpoint, checkpoint_path, logger) \
            and dist_env.is_main:
        save_run_args(run_dir, plain_args(args))
    optimizer = create_optimizer(model, device, args.opt, args.lr, args.weight_decay, args.momentum,
                                 args.opt_eps, args.opt_betas, amp_backend_for(args.amp, args.amp_backend, device))
    model, optimizer, precision = create_precision(model, optimizer, device, args.amp, args.amp_backend,
                                                   args.opt_level, args.loss_scale, args.amp_dtype)
    logger.info(f'{precision}, optimizer {type(optimizer).__name__}')
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    steps_per_epoch = (len(train_loader) if train_loader else 1)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    scheduler, total_epochs = create_scheduler(
        optimizer, args.epochs, args.cooldown_epochs, args.warmup_epochs, args.warmup_lr, args.min_lr,
        args.sched, args.decay_epochs, args.decay_rate, args.sched_on_updates, steps_per_epoch)

    resume = ResumePoint()
    if checkpoint is not None:
        same_schedule = schedule_options(run_options(checkpoint)) == schedule_options(vars(args))
        resume = restore_training(checkpoint, checkpoint_path, model, optimizer, scheduler, precision, model_ema,
                                  class_to_idx, run_dir, logger, keep_schedule=same_schedule, weights_only=args.eval,
                                  train_samples=len(train_set) if train_set is not None else None)

    eval_model = torch.compile(model) if args.compile else model
    train_model = eval_model
    if dist_env.distributed:
        device_ids = None if device.type == 'cpu' else [device.index]
        train_model = torch.nn.parallel.DistributedDataParallel(eval_model, device_ids=device_ids)
    # A progress bar only where someone watches (rank 0, stderr a terminal); logs stay unchanged.
    show_progress = progress_enabled(dist_env.is_main)
    if args.eval:
        # Evaluate the bare model: DDP's forward would sync buffers, and ranks hold unequal shards.
        evaluate(eval_model, val_loader, device, dist_env, logger, autocast=precision.autocast,
                 log_interval=args.log_interval, channels_last=args.channels_last, show_progress=show_progress)
        return

    mixup_fn = build_mixup(args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_prob, args.mixup_switch_prob,
                           args.mixup_mode, args.smoothing, num_classes)
    criterion = build_train_criterion(mixup_fn, args.smoothing)
    saver = RunCheckpoints(run_dir, args.checkpoint_hist, resume.history, resume.best) if dist_env.is_main else None
    state = functools.partial(training_state, model, optimizer, scheduler, precision, model_ema, args.model,
                              plain_args(args), class_to_idx, len(train_set))
    tensorboard = create_writer(args.tensorboard, os.path.join(run_dir, TENSORBOARD_DIR), dist_env.is_main, logger)
    report = RunReport.for_run(run_dir, dist_env.is_main, logger, tensorboard)
    parts = TrainingParts(model, train_loader, criterion, optimizer, precision, scheduler, val_loader, train_model,
                          eval_model, model_ema, mixup_fn, saver, state, report)
    settings = TrainSettings(
        epochs=total_epochs, seed=args.seed, log_interval=args.log_interval, max_steps=args.max_steps_per_epoch,
        clip_grad=args.clip_grad, clip_mode=args.clip_mode, channels_last=args.channels_last,
        show_progress=show_progress, recovery_interval=args.recovery_interval,
        max_nonfinite_steps=args.max_nonfinite_steps, mixup_off_epoch=args.mixup_off_epoch,
        dist_bn=args.dist_bn if dist_env.distributed and not args.sync_bn else '')
    best = fit(parts, settings, dist_env, logger, run_dir, resume)
    report.close()
    if dist_env.is_main:
        plot_run_curves(run_dir, logger)
    if best is not None:
        if model_ema is not None:
            logger.info(f"best metric: the EMA weights' (state_dict_ema in {BEST_FILE}; tools/export_weights.py "
                        '--ema exports them, --eval/--pretrained load the regular state_dict)')
        logger.info(f'*** Best metric: {best[0]:.3f} (epoch {best[1]})')


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with contextlib.ExitStack() as resources:
            run(args, resources)
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
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f'error: process {os.environ.get("RANK", "?")} lost contact with the others ({first_line}); another '
              'process probably failed or hangs, see its output. Finished epochs are kept: fix the cause and run '
              'again with --resume auto', file=sys.stderr, flush=True)
        return 1
    finally:
        cleanup_distributed()
    return 0


if __name__ == '__main__':
    sys.exit(main())

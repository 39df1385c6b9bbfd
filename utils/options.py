"""main.py's command line: every option with its rule, the rules between options, the YAML config,
and the recipe values that depend on the run (`resolve_recipe`).

Each option states its rule once, where it is declared (`build_parser` here, and the tools' parsers
with the same types), e.g. `type=Number(float, above=0)`. argparse applies it to what the command
line gives, and the same action (type, choices, number of values) is applied to the values of a YAML
config and of a resumed checkpoint's arguments (`convert_value`), so a bad value is one `error: ...`
line (exit 2) at start, wherever it came from, instead of a traceback hours later. Rules between
options (`COMBINATION_RULES`) run after parsing, before anything starts.

Names are checked against timm's own registries and parsers (optimizers, schedulers,
auto-augment policies, interpolation modes), so whatever timm accepts is accepted here.

What options mean for the rest of the run is also said here, once: which of them a resumed run
compares with its checkpoint (SCHEDULE_OPTIONS) or takes from it (OPTIMIZER_OPTIONS), and how they
become the arguments of the other modules (train_augmentation, eval_overrides, train_settings).
"""
import argparse
import difflib
import math
from typing import Any, Iterable, Optional

import torch
import yaml

import models
from utils.amp import AMP_BACKENDS, AMP_DTYPES, OPT_LEVELS, parse_loss_scale
from utils.checkpoint import RECOVERY_FILE, run_options
from utils.device import DEVICE_CHOICES, resolve_device
from utils.engine import TrainSettings
from utils.errors import CheckpointError, DeviceError, ModelError, OptionError
from utils.optim import LR_BASE_SCALES, check_optimizer, check_schedule, effective_lr


class Number:
    """argparse type: a finite int or float, optionally bounded (at_least/at_most inclusive, above/below
    exclusive). Rejects nan and inf, and for `int` anything that is not a whole number ('8.5', 'True')."""

    def __init__(self, kind=float, at_least=None, above=None, at_most=None, below=None):
        self.kind = kind
        self.at_least, self.above, self.at_most, self.below = at_least, above, at_most, below
        self.__name__ = 'integer' if kind is int else 'number'  # argparse names the type in some messages

    def describe(self) -> str:
        bounds = [f'{sign} {value}' for sign, value in (('>=', self.at_least), ('>', self.above),
                                                           ('<=', self.at_most), ('<', self.below))
                  if value is not None]
        what = 'an integer' if self.kind is int else 'a number'
        return what + (' ' + ' and '.join(bounds) if bounds else '')

    def __call__(self, text) -> Any:
        try:
            value = self.kind(str(text).strip())
        except ValueError:
            value = None
        if value is None or (self.kind is float and not math.isfinite(value)) or (
                self.at_least is not None and value < self.at_least) or (
                self.above is not None and value <= self.above) or (
                self.at_most is not None and value > self.at_most) or (
                self.below is not None and value >= self.below):
            raise argparse.ArgumentTypeError(f'expected {self.describe()}, got {text!r}')
        return value

    def __repr__(self):
        return f'Number({self.describe()})'


def _unknown(kind: str, text: str, known: Iterable[str], hint: str = '') -> argparse.ArgumentTypeError:
    close = difflib.get_close_matches(str(text).lower(), list(known), n=3)
    suggestion = f'; did you mean {" or ".join(close)}?' if close else ''
    return argparse.ArgumentTypeError(f'{text!r} is not {kind}{suggestion}{hint}')


def optimizer_name(text: str) -> str:
    """A name timm's optimizer factory builds here (its registry, optionally prefixed 'lookahead_')."""
    from timm.optim import get_optimizer_class, list_optimizers
    name = str(text)
    base = name.lower()[len('lookahead_'):] if name.lower().startswith('lookahead_') else name.lower()
    known = list_optimizers()
    if base not in known:
        raise _unknown('an optimizer timm knows', name, known,
                       " (all: python -c 'import timm.optim; print(timm.optim.list_optimizers())')")
    try:
        get_optimizer_class(base)  # imports its class: apex/bitsandbytes ones need those packages and CUDA
    except Exception as error:
        raise argparse.ArgumentTypeError(f'optimizer {name!r} cannot be used here: {error}') from None
    return name


def scheduler_name(text: str) -> str:
    """A learning-rate schedule name that timm's create_scheduler_v2 builds (not 'none': the loop needs one)."""
    name = str(text)
    try:
        check_schedule(sched=name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def interpolation_name(text: str, allow_random: bool = False) -> str:
    """A resize interpolation timm's transforms know ('random' = bilinear or bicubic per image, training only)."""
    from timm.data.transforms import str_to_interp_mode
    name = str(text)
    if allow_random and name == 'random':
        return name
    try:
        str_to_interp_mode(name)
    except KeyError:
        from timm.data.transforms import _pil_interpolation_to_str
        known = sorted(_pil_interpolation_to_str.values()) + (['random'] if allow_random else [])
        raise argparse.ArgumentTypeError(f'{name!r} is not an interpolation; use one of {", ".join(known)}') from None
    return name


def train_interpolation_name(text: str) -> str:
    return interpolation_name(text, allow_random=True)


def augment_policy(text: str) -> str:
    """'none', or an auto-augment policy string that timm's training transform can build (rand-..., augmix-...,
    original, v0, 3a ...)."""
    from timm.data import create_transform
    name = str(text)
    if name == 'none':
        return name
    try:
        create_transform(32, is_training=True, auto_augment=name)
    except Exception as error:  # timm reports a bad policy with assertions
        detail = f': {error}' if str(error) else ''
        raise argparse.ArgumentTypeError(
            f'{name!r} is not an auto-augment policy timm can build{detail} (e.g. rand-m9-mstd0.5-inc1, '
            'augmix-m5-w4-d2, original, v0, 3a; none disables it)') from None
    return name


def usable_device(text: str) -> torch.device:
    """argparse type of the tools' --device: a torch device this machine has (utils.device.resolve_device)."""
    try:
        return resolve_device(str(text))
    except DeviceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# Shared by main.py and the tools: VAN downsamples 32-fold; beyond 4096 pixels a side one image
# alone needs tens of GB of activations.
IMG_SIZE = Number(int, at_least=32, at_most=4096)


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def convert_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """`value` (from YAML or a checkpoint: a str, number, bool, list or None) converted and checked with
    the same type, choices and number of values as the command line would; OptionError when it breaks them.

    On/off flags take only real booleans: the string 'false' would otherwise switch them on.
    """
    if _is_flag(action):
        if not isinstance(value, bool):
            raise OptionError(f'expected true or false, got {value!r} ({type(value).__name__})')
        return value
    if value is None:
        if action.default is None:
            return None
        raise OptionError(f'needs a value (its default is {action.default!r})')
    expected = action.nargs
    values = list(value) if isinstance(value, (list, tuple)) else None
    if expected in (None, '?'):
        if values is not None or isinstance(value, dict):
            raise OptionError(f'expected one value, got {value!r}')
        values = [value]
    else:
        if values is None:
            raise OptionError(f'expected a list of {expected if isinstance(expected, int) else "one or more"} values, '
                              f'got {value!r}')
        if (isinstance(expected, int) and len(values) != expected) or (expected == '+' and not values):
            raise OptionError(f'expected {expected if isinstance(expected, int) else "one or more"} values, '
                              f'got {len(values)}: {value!r}')
    if any(isinstance(v, (list, tuple, dict)) for v in values):
        raise OptionError(f'expected plain values, got {value!r}')
    if any(isinstance(v, bool) for v in values):  # YAML's true is neither the number 1 nor a name
        raise OptionError(f'expected a number or name, got {value!r}')
    try:  # argparse's own conversion and choices check, exactly as for the command line's strings
        converted = [parser._get_value(action, str(v)) for v in values]
        for v in converted:
            parser._check_value(action, v)
    except argparse.ArgumentError as error:
        raise OptionError(error.message) from None
    return converted[0] if expected in (None, '?') else converted


def convert_values(parser: argparse.ArgumentParser, values: dict, source: str,
                   keys: Optional[Iterable[str]] = None) -> dict:
    """{dest: value} checked by `convert_value`; OptionError naming `source`, the option and the rule.
    Keys that name no option are an error too."""
    actions = {action.dest: action for action in parser._actions if action.dest != 'help'}
    unknown = sorted(str(k) for k in values if k not in actions)
    if unknown:
        raise OptionError(f'{source} sets unknown options: {", ".join(unknown)}')
    converted = {}
    for dest in (keys if keys is not None else values):
        action = actions[dest]
        flag = max(action.option_strings, key=len) if action.option_strings else dest
        try:
            converted[dest] = convert_value(parser, action, values[dest])
        except OptionError as error:
            raise OptionError(f'{source}: {dest} ({flag}): {error}') from None
    return converted


# Rules shared by several options (each option's own rule is its `type=`).
PROBABILITY = Number(float, at_least=0, at_most=1)
RATE = Number(float, at_least=0, below=1)  # dropout, drop path, label smoothing, betas
POSITIVE = Number(float, above=0)
NON_NEGATIVE = Number(float, at_least=0)
COUNT = Number(int, at_least=1)
NON_NEGATIVE_INT = Number(int, at_least=0)


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """main.py's options, each with its rule; `description` is main.py's usage text."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='YAML',
                        help='YAML file whose keys (flag names, - or _) set defaults; the command line wins')
    _add_data_options(parser.add_argument_group('data'))
    _add_model_options(parser.add_argument_group('model'))
    _add_optimizer_options(parser.add_argument_group('optimizer and schedule'))
    _add_augmentation_options(parser.add_argument_group('augmentation and regularisation'))
    _add_device_options(parser.add_argument_group('precision and device'))
    _add_run_options(parser.add_argument_group('run'))
    _add_fault_options(parser.add_argument_group('faults'))
    return parser


def _add_data_options(group) -> None:
    group.add_argument('data_dir', nargs='?', default=None, help='dataset root (same as --data_path)')
    group.add_argument('--data_path', '--data-path', dest='data_path', default=None, metavar='DIR',
                       help='dataset root holding train/ and val/ (or validation/), one folder per class')
    group.add_argument('-j', '--workers', type=NON_NEGATIVE_INT, default=4, help='data loading processes per device')
    group.add_argument('--pin-mem', action='store_true', help='pin host memory of batches (faster copies to the GPU; always on for NPU)')


def _add_model_options(group) -> None:
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


def _add_optimizer_options(group) -> None:
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


def _add_augmentation_options(group) -> None:
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


def _add_device_options(group) -> None:
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


def _add_run_options(group) -> None:
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
    group.add_argument('--results', default=None, metavar='PATH',
                       help='write the results as JSON (per-epoch FPS, loss and metrics, each logged loss, best top-1; '
                            'utils/reporting.py) to PATH (default: <run dir>/results.json; --eval writes one only here)')


def _add_fault_options(group) -> None:
    group.add_argument('--strict-data', action='store_true',
                       help='stop at the first unreadable image (default: skip it, report it, count it)')
    group.add_argument('--recovery-interval', type=NON_NEGATIVE_INT, default=0, metavar='N',
                       help=f'also write {RECOVERY_FILE} every N steps (0 = only on SIGTERM/SIGINT)')
    group.add_argument('--max-nonfinite-steps', type=COUNT, default=20, metavar='N',
                       help='stop when the loss is NaN/inf for N steps in a row under the float16 loss scaler '
                            '(without a scaler the first one stops the run)')
    group.add_argument('--dist-timeout', type=Number(float, at_least=1), default=600, metavar='SECONDS',
                       help='a process waiting longer than this for the others (one died or hangs) stops with a message')


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


def parse_args(argv=None, description: Optional[str] = None) -> argparse.Namespace:
    """Command line over YAML config over recipe defaults; every value is checked by its option's rule,
    then the rules between options (COMBINATION_RULES), all before anything starts."""
    parser = build_parser(description)
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


def train_augmentation(args) -> dict:
    """The training augmentation options as utils.data.train_transform takes them."""
    return dict(scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
                auto_augment=None if args.aa == 'none' else args.aa, re_prob=args.reprob, re_mode=args.remode,
                re_count=args.recount, interpolation=args.train_interpolation)


def eval_overrides(args) -> dict:
    """The evaluation preprocessing options as utils.images.resolve_eval_config takes them (None: the model's)."""
    return dict(img_size=args.img_size, crop_pct=args.crop_pct, mean=args.mean, std=args.std,
                interpolation=args.interpolation)


def train_settings(args, distributed: bool, show_progress: bool) -> TrainSettings:
    """The options the training loops take (`epochs` is set from the schedule, which adds the cooldown);
    BatchNorm statistics are distributed only between processes that do not synchronise them already."""
    return TrainSettings(
        epochs=args.epochs, seed=args.seed, log_interval=args.log_interval, max_steps=args.max_steps_per_epoch,
        clip_grad=args.clip_grad, clip_mode=args.clip_mode, channels_last=args.channels_last,
        show_progress=show_progress, recovery_interval=args.recovery_interval,
        max_nonfinite_steps=args.max_nonfinite_steps, mixup_off_epoch=args.mixup_off_epoch,
        dist_bn=args.dist_bn if distributed and not args.sync_bn else '')


def default_options() -> argparse.Namespace:
    """Every option at its default (the recipe), e.g. for a tool that measures what training does."""
    return build_parser().parse_args([])

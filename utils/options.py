"""The rules a command-line value must follow, as argparse `type=` callables.

Each option states its rule once, where it is declared (main.py's and the tools' `build_parser`), e.g.
`type=Number(float, above=0)`. argparse applies it to what the command line gives, and main.py
applies the same action (type, choices, number of values) to the values of a YAML config and of a
resumed checkpoint's arguments (`convert_value`), so a bad value is one `error: ...` line (exit 2)
at start, wherever it came from, instead of a traceback hours later.

Names are checked against timm's own registries and parsers (optimizers, schedulers,
auto-augment policies, interpolation modes), so whatever timm accepts is accepted here.
"""
import argparse
import difflib
import math
from typing import Any, Iterable, Optional

import torch

from utils.errors import DeviceError, OptionError


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
    from utils.optim import check_schedule
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
    """A torch device that exists on this machine (cpu, cuda, cuda:1, npu:0 ...)."""
    from utils.device import resolve_device_type
    kind = str(text).split(':')[0]
    if kind not in ('cpu', 'cuda', 'npu'):
        raise argparse.ArgumentTypeError(f'{text!r}: use cpu, cuda[:N] or npu[:N]')
    if kind != 'cpu':
        try:
            resolve_device_type(kind)  # imports torch_npu for npu, which makes 'npu' a device type
        except DeviceError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    try:
        device = torch.device(str(text))
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f'{text!r} is not a device ({error})') from None
    if device.index is not None and kind != 'cpu':
        count = torch.cuda.device_count() if kind == 'cuda' else torch.npu.device_count()
        if device.index >= count:
            raise argparse.ArgumentTypeError(f'{text!r}: this machine has {count} {kind} device(s), numbered from 0')
    return device


# Shared by main.py and tools/predict.py: VAN downsamples 32-fold; beyond 4096 pixels a side one image
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

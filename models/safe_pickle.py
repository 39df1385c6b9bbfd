"""A pickle module for torch.load that can only build an allow-list: safe loading on every supported torch.

`torch.load(f, pickle_module=safe_pickle, weights_only=False)` reads torch.save files, zip and legacy
format, the same way on torch 2.1 and the newest: torch's own unpickler (a subclass of this module's
`Unpickler`) maps storage types itself and asks `Unpickler.find_class` for every other global the file
names, and its legacy reader calls this module's `load` for its header pickles. Python's unpickler
resolves every callable or class a pickle can use (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT1-4) through
find_class (Python docs, pickle, "Restricting Globals"), so a file can only call what is listed here.

The list is what torch.save writes for dense tensors, parameters and containers (the classes torch's own
weights_only loader accepts for them) plus `argparse.Namespace`, which timm-style training scripts (the
official VAN release's, the Ascend port's) store as 'args'. torch's weights_only loader cannot accept
that class before torch 2.5 (models/compat.py), which is why this module exists.

find_class alone leaves one door open: BUILD sets attributes on whatever object precedes it, and that may
be an allowed class or function itself (`argparse.Namespace.__repr__ = ...`, a rebuild function's
defaults), which would change how the rest of the program runs. The unpickler therefore applies BUILD only
to instances of the few types whose state a checkpoint carries. That needs the Python implementation of
the unpickler (`pickle._Unpickler`; the C one cannot be changed per opcode); a checkpoint's pickle holds
only the structure and small values, the tensor data is read by torch, so the difference is milliseconds.
"""
import _compat_pickle
import argparse
import codecs
import collections
import functools
import io
import pickle
from typing import Dict

import torch

from . import compat

__all__ = ['Unpickler', 'load', 'loads', 'UnpicklingError', 'UnsafePickleError', 'allowed_globals']

UnpicklingError = pickle.UnpicklingError

# The only types whose instances a pickle may set state on (BUILD): an OrderedDict's _metadata (state dicts),
# a Namespace's attributes, a tensor's or parameter's flags.
_BUILDABLE = (collections.OrderedDict, argparse.Namespace, torch.Tensor, torch.nn.Parameter)


class UnsafePickleError(UnpicklingError):
    """The pickle asks for something outside the allow-list. `reason` says what, as a clause
    ('it contains objects of posix.system, and unpickling those could run arbitrary code')."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@functools.lru_cache(maxsize=None)
def allowed_globals() -> Dict[str, object]:
    """'module.name' -> object: every global a checkpoint may name."""
    allowed = {
        'collections.OrderedDict': collections.OrderedDict,
        'argparse.Namespace': argparse.Namespace,
        'torch.Size': torch.Size,
        'torch.Tensor': torch.Tensor,
        'torch.device': torch.device,
        'torch.nn.parameter.Parameter': torch.nn.Parameter,
        'torch.serialization._get_layout': torch.serialization._get_layout,
        'torch._tensor._rebuild_from_type_v2': torch._tensor._rebuild_from_type_v2,
        # Protocol 2 (torch.save's default) writes bytes as _codecs.encode(text, 'latin1') and sets as set(list).
        '_codecs.encode': codecs.encode,
        'builtins.set': set,
        'builtins.frozenset': frozenset,
        'builtins.bytearray': bytearray,
        'builtins.complex': complex,
        'builtins.slice': slice,
    }
    allowed.update(compat.tensor_rebuild_functions())
    for value in vars(torch).values():  # dtypes, layouts and memory formats pickle as torch.<name>
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[f'torch.{str(value).split(".")[-1]}'] = value
    return allowed


def _load_build(unpickler: 'Unpickler') -> None:
    target = unpickler.stack[-2]  # the state is on top; BUILD applies it to the object below
    if type(target) not in _BUILDABLE:
        what = getattr(target, '__qualname__', None) or type(target).__name__
        module = getattr(target, '__module__', None)
        raise UnsafePickleError(f'it sets attributes of {module + "." if module else ""}{what}, which would change '
                                f'how this program runs')
    pickle._Unpickler.load_build(unpickler)


class Unpickler(pickle._Unpickler):
    """An unpickler that builds only `allowed_globals()` and sets state only on checkpoint types;
    anything else raises UnsafePickleError."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str):
        # Protocols 0-2 (torch.save writes 2) may name Python 2 modules (__builtin__.set): map them as pickle does.
        if self.proto < 3 and self.fix_imports:
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = allowed_globals().get(f'{module}.{name}')
        if found is None:
            raise UnsafePickleError(f'it contains objects of {module}.{name}, and unpickling those could run '
                                    f'arbitrary code')
        return found


def load(file, **kwargs):
    """pickle.load with the restricted Unpickler."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs):
    """pickle.loads with the restricted Unpickler."""
    return Unpickler(io.BytesIO(data), **kwargs).load()

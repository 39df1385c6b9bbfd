"""Reading VAN weight files safely and loading them into a model.

`safe_load` is the one way this repository reads .pth/.pt/.bin/.safetensors files: pickles are read
by torch.load through models/safe_pickle.py, an unpickler that builds only tensors, plain containers and
`argparse.Namespace` (which timm-style training scripts store as 'args'), the same on every supported
torch, so a file cannot run code while it is read.

`extract_state_dict` turns every format users bring into a state dict with the reference names:
the official release `{'state_dict': ...}`, a plain state dict, training checkpoints (this repo's,
the reference's, the Ascend port's) with optimizer state and `module.` prefixes, and HuggingFace
transformers `VanForImageClassification` files. `load_weights` (`load_pretrained` for a file) puts
one into a model, keeping or re-initialising the head by class count and naming the variant when
the weights do not fit.
"""
import argparse
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import compat, safe_pickle
from .van import ALIASES, VARIANTS

__all__ = ['UnsafeFileError', 'safe_load', 'extract_state_dict', 'load_pretrained', 'load_weights', 'guess_variant',
           'file_class_map', 'align_head_to_classes']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# The class torch's weights-only loader must additionally allow where TORCH_FORCE_WEIGHTS_ONLY_LOAD makes us use it.
_WEIGHTS_ONLY_EXTRA_GLOBALS = [argparse.Namespace]
# torch.load's own switch (every release from 2.1): when set, torch refuses any pickle_module.
_FORCE_WEIGHTS_ONLY_VARIABLE = 'TORCH_FORCE_WEIGHTS_ONLY_LOAD'
_RESAVE_HINT = ('Re-save only the tensors (e.g. torch.save({"state_dict": model.state_dict()}, PATH)) from a '
                'trusted environment.')

# Files HuggingFace puts in a model directory, in the order they are tried.
_HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')

# Training checkpoints may hold the regular and the EMA weights. The regular weights are the ones
# the run validated and resumes from, so they win; EMA weights load only when the file has nothing else.
_STATE_DICT_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')

HEAD_KEYS = ('head.weight', 'head.bias')


class UnsafeFileError(RuntimeError):
    """The file can only be read by unpickling arbitrary Python objects, which could run code."""


def safe_load(path: PathLike) -> Any:
    """Read a checkpoint without executing code from it.

    *.safetensors files are read with safetensors; everything else with torch.load through the restricted
    unpickler of models/safe_pickle.py (tensors, parameters, plain containers, argparse.Namespace), on the
    CPU. When TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, torch accepts no unpickler of ours: torch's own
    weights-only loader reads the file then, allowing argparse.Namespace where torch can (2.5+).
    A directory is read through the HuggingFace file it contains (model.safetensors, pytorch_model.bin).

    Raises:
        FileNotFoundError: the path does not exist (or a directory has no weight file).
        UnsafeFileError: the file pickles objects other than tensors and plain containers (named).
        ValueError: the file is not a readable checkpoint (truncated, another format, a plain pickle).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in _HF_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f'{path} is a directory without {" or ".join(_HF_WEIGHT_FILES)}; '
                                    f'pass the weight file itself')
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f'weights file not found: {path}')

    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f'{path} is not a readable safetensors file ({e})') from e

    with open(path, 'rb') as f:
        magic = f.read(2)
    # torch.save writes a zip archive ('PK'); older torch and plain pickles start with the PROTO opcode.
    if not (magic == b'PK' or magic[:1] == b'\x80'):
        raise ValueError(f'{path} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)')
    if magic == b'PK' and _is_torchscript_archive(path):
        # torch.load would hand it to torch.jit.load and return a program, not a checkpoint.
        raise ValueError(f'{path} is a TorchScript program (torch.jit.save), not a checkpoint; save the model\'s '
                         f'state_dict with torch.save instead')
    if os.environ.get(_FORCE_WEIGHTS_ONLY_VARIABLE, '0').lower() in ('1', 'y', 'yes', 'true'):
        return _torch_weights_only_load(path)
    try:
        return torch.load(path, map_location='cpu', pickle_module=safe_pickle, weights_only=False)
    except safe_pickle.UnsafePickleError as e:
        raise UnsafeFileError(f'refusing to read {path}: {e.reason}. {_RESAVE_HINT}') from e
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, OSError, AttributeError, IndexError,
            TypeError, ValueError) as e:
        raise ValueError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from e


def _is_torchscript_archive(path: Path) -> bool:
    """Whether a zip file is what torch.jit.save writes (a constants.pkl beside the code), not torch.save."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count('/') == 1 and name.endswith('/constants.pkl') for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # torch.load names what is wrong with it


def _torch_weights_only_load(path: Path) -> Any:
    """safe_load's reading under TORCH_FORCE_WEIGHTS_ONLY_LOAD: torch's weights-only unpickler, with the same
    messages as the restricted unpickler's where torch names the global it refused."""
    allowing = compat.weights_only_allowing(_WEIGHTS_ONLY_EXTRA_GLOBALS)
    try:
        if allowing is None:
            return torch.load(path, map_location='cpu', weights_only=True)
        with allowing:
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' not in str(e):
            raise ValueError(f'{path} is not a readable PyTorch checkpoint ({e})') from e
        # torch 2.1-2.3: "Unsupported class posix.system"; later: "Unsupported global: GLOBAL posix.system ...",
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r'(?:GLOBAL|[Uu]nsupported class) ([\w.]+)', str(e))
        name = found.group(1) if found else None
        if name in safe_pickle.allowed_globals():
            raise UnsafeFileError(
                f'cannot read {path} while {_FORCE_WEIGHTS_ONLY_VARIABLE} is set: it contains {name}, which '
                f'torch {torch.__version__}\'s weights-only loader cannot allow (torch >= 2.5 can). Unset '
                f'{_FORCE_WEIGHTS_ONLY_VARIABLE}: the file is then read with this repository\'s restricted '
                f'unpickler, which allows it and still refuses code') from None
        what = f'objects of {name}' if name else 'Python objects other than tensors and plain containers'
        raise UnsafeFileError(f'refusing to read {path}: it contains {what}, and unpickling those could run '
                              f'arbitrary code. {_RESAVE_HINT}') from None
    except (RuntimeError, KeyError, EOFError, OSError, AttributeError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from e


# ---------------------------------------------------------------------------------------------
# Format normalisation
# ---------------------------------------------------------------------------------------------
# HuggingFace transformers (models/deprecated/van) name -> reference name, within stage s (0-based)
# and layer j. Every prefix ends at a '.' or is a whole name, so `depth_wise.` never matches
# `depth_wise_dilated.`.
_HF_LAYER_RENAMES = (
    ('pre_normomalization.', 'norm1.'),  # (sic) transformers' spelling
    ('attention.pre_projection.conv.', 'attn.proj_1.'),
    ('attention.attention_layer.attention.depth_wise.', 'attn.spatial_gating_unit.conv0.'),
    ('attention.attention_layer.attention.depth_wise_dilated.', 'attn.spatial_gating_unit.conv_spatial.'),
    ('attention.attention_layer.attention.point_wise.', 'attn.spatial_gating_unit.conv1.'),
    ('attention.post_projection.', 'attn.proj_2.'),
    ('attention_scaling.weight', 'layer_scale_1'),
    ('post_normalization.', 'norm2.'),
    ('mlp.in_dense.', 'mlp.fc1.'),
    ('mlp.depth_wise.', 'mlp.dwconv.dwconv.'),
    ('mlp.out_dense.', 'mlp.fc2.'),
    ('mlp_scaling.weight', 'layer_scale_2'),
)
_HF_STAGE = re.compile(r'^encoder\.stages\.(\d+)\.(.*)$')
_HF_LAYER = re.compile(r'^layers\.(\d+)\.(.*)$')


def _hf_to_reference_name(name: str) -> Optional[str]:
    """Reference name of a transformers VAN tensor; None for tensors the model does not use.

    VanForImageClassification prefixes the backbone with `van.`; a bare VanModel does not.
    """
    if name.startswith('classifier.'):
        return 'head.' + name[len('classifier.'):]
    if name.startswith('van.'):
        name = name[len('van.'):]
    if name.startswith('layernorm.'):
        return None  # transformers creates this norm but its forward never applies it
    stage = _HF_STAGE.match(name)
    if not stage:
        return name  # unknown: kept, so the mismatch report shows it
    i, rest = int(stage.group(1)) + 1, stage.group(2)
    for hf_prefix, ref_prefix in (('embeddings.convolution.', 'proj.'), ('embeddings.normalization.', 'norm.')):
        if rest.startswith(hf_prefix):
            return f'patch_embed{i}.{ref_prefix}{rest[len(hf_prefix):]}'
    if rest.startswith('normalization.'):
        return f'norm{i}.{rest[len("normalization."):]}'
    layer = _HF_LAYER.match(rest)
    if layer:
        j, tail = layer.groups()
        for hf_prefix, ref_prefix in _HF_LAYER_RENAMES:
            if tail.startswith(hf_prefix):
                return f'block{i}.{j}.{ref_prefix}{tail[len(hf_prefix):]}'
    return name


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(checkpoint: Any, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The model weights of any supported format, under reference names.

    Raises ValueError naming `source` when the object holds no state dict.
    """
    state_dict = None
    if _is_state_dict(checkpoint):
        state_dict = checkpoint
    elif isinstance(checkpoint, Mapping):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(checkpoint.get(key)):
                state_dict = checkpoint[key]
                if key.endswith('ema'):
                    _logger.info(f'{source} holds only EMA weights ({key!r}); loading them')
                break
    if state_dict is None:
        keys = ', '.join(map(str, list(checkpoint)[:8])) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f'{source} holds no model weights: expected a state dict or a dict with one of '
                         f'{", ".join(_STATE_DICT_KEYS)}; found {keys}')

    # DDP / DataParallel saves prefix every name with `module.`, torch.compile'd models with `_orig_mod.`.
    stripped = True
    while stripped:
        stripped = False
        for prefix in ('module.', '_orig_mod.'):
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped = True
    if any(k.startswith(('van.encoder.stages.', 'encoder.stages.')) for k in state_dict):
        renamed = {}
        for k, v in state_dict.items():
            new_name = _hf_to_reference_name(k)
            if new_name is not None:
                renamed[new_name] = v
        state_dict = renamed
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------------
def guess_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The VAN variant whose shape the weights have, or None when they are no VAN of the table."""
    try:
        dims, depths, ratios = [], [], []
        for i in range(1, 5):
            dim = state_dict[f'norm{i}.weight'].shape[0]
            depth = len({int(k.split('.')[1]) for k in state_dict if k.startswith(f'block{i}.')})
            hidden = state_dict[f'block{i}.0.mlp.fc1.weight'].shape[0]
            dims.append(dim)
            depths.append(depth)
            ratios.append(hidden / dim)
    except (KeyError, IndexError, ValueError):
        return None
    for name, cfg in VARIANTS.items():
        if tuple(cfg['embed_dims']) == tuple(dims) and tuple(cfg['depths']) == tuple(depths) and \
                tuple(float(r) for r in cfg['mlp_ratios']) == tuple(ratios):
            return name
    return None


def _describe(names: List[str], limit: int = 5) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' (and {len(names) - limit} more)' if len(names) > limit else '')


def _variant_label(variant: str) -> str:
    return f'{variant} (= {ALIASES[variant]})' if variant in ALIASES else variant


def load_pretrained(model: nn.Module, path: PathLike, variant: str, require_head: bool = False,
                    class_to_idx: Optional[Mapping[str, int]] = None) -> List[str]:
    """Load the weights in the file `path` into `model`, a VAN built as `variant`.

    See `load_weights` for the rules (and the notes it returns); `safe_load` for unreadable or unsafe files.
    """
    return load_weights(model, safe_load(path), variant, source=str(path), require_head=require_head,
                        class_to_idx=class_to_idx)


def file_class_map(checkpoint: Any) -> Optional[Dict[str, int]]:
    """The class name -> output index map a checkpoint carries (main.py stores `class_to_idx`), or None."""
    class_map = checkpoint.get('class_to_idx') if isinstance(checkpoint, Mapping) else None
    if not isinstance(class_map, Mapping) or not class_map or not all(
            isinstance(k, str) and isinstance(i, int) and not isinstance(i, bool) for k, i in class_map.items()):
        return None
    return dict(class_map)


def align_head_to_classes(file_head: Dict[str, torch.Tensor], file_classes: Optional[Dict[str, int]],
                           class_to_idx: Optional[Mapping[str, int]], source: str, require_head: bool) -> List[str]:
    """Reorder the file's head rows in place so that output i is the dataset's class i, matching the two
    class maps by name (rows of classes the dataset lacks follow, in the file's order). Evaluation
    (require_head) refuses a file that does not know every class of the dataset; fine-tuning keeps such
    a head as it is. Returns notes for the log."""
    if class_to_idx is None or 'head.weight' not in file_head:
        return []
    if file_classes is None:
        return [f'{source} carries no class map: its outputs are taken to be the dataset\'s classes in sorted '
                'order'] if require_head else []
    rows = file_head['head.weight'].shape[0]
    unknown = sorted(set(class_to_idx) - set(file_classes))
    numbered = sorted(file_classes.values()) == list(range(rows)) and \
        sorted(class_to_idx.values()) == list(range(len(class_to_idx)))
    if unknown or not numbered:
        if not require_head:
            return []
        if not numbered:
            raise ValueError(f'{source}: its class map does not number its {rows} outputs 0..{rows - 1}, so they '
                             'cannot be matched to the dataset\'s classes')
        extra = sorted(set(file_classes) - set(class_to_idx))
        raise ValueError(f'{source} was trained on other classes than the dataset has (only in the dataset: '
                         f'{_describe(unknown)}; only in the weights: {_describe(extra) or "none"}); evaluate it on '
                         'the dataset it was trained on')
    order = [file_classes[name] for name in sorted(class_to_idx, key=class_to_idx.get)]
    order += [i for i in range(rows) if i not in set(order)]
    if order == list(range(rows)):
        return []
    for key in HEAD_KEYS:
        if key in file_head:
            file_head[key] = file_head[key][order]
    moved = [name for name in sorted(class_to_idx) if file_classes[name] != class_to_idx[name]]
    return [f'{source} numbers its classes in another order than the dataset ({_describe(moved)}); its head is '
            'reordered by class name, so each output is the dataset\'s class of that name']


def load_weights(model: nn.Module, checkpoint: Any, variant: str, source: str = 'the weights',
                 require_head: bool = False, class_to_idx: Optional[Mapping[str, int]] = None) -> List[str]:
    """Load a checkpoint or state dict of any supported format into `model`, a VAN built as `variant`.

    The backbone must match exactly (names and shapes). The head is loaded when its shape matches the
    model's; otherwise the model keeps its freshly initialised head and one log line says so.
    Raises ValueError naming `variant` and the first mismatching keys when `source` holds another
    variant or another architecture, and, with `require_head` (evaluation: a fresh head would score
    chance), when the head does not fit.

    class_to_idx (the dataset's class name -> index): when the file carries its own class map, its head
    rows are matched to the dataset's classes by name (a file whose classes sort differently would
    otherwise score near chance); with `require_head` a file of other classes is refused.
    Returns notes for the caller's log (what was done to the head).
    """
    state_dict = extract_state_dict(checkpoint, source=source)
    target = model.state_dict()

    file_head = {k: state_dict.pop(k) for k in HEAD_KEYS if k in state_dict}
    model_head = {k: target[k] for k in HEAD_KEYS if k in target}
    head_fits = bool(model_head) and set(file_head) == set(model_head) and all(
        file_head[k].shape == model_head[k].shape for k in model_head)
    notes = []

    # BatchNorm's step counter only matters for momentum=None; conversions may leave it out.
    for name, tensor in target.items():
        if name.endswith('num_batches_tracked') and name not in state_dict:
            state_dict[name] = tensor

    missing = [k for k in target if k not in state_dict and k not in model_head]
    unexpected = [k for k in state_dict if k not in target]
    wrong_shape = [f'{k} {tuple(v.shape)} in the file, {tuple(target[k].shape)} in the model'
                   for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or wrong_shape:
        guessed = guess_variant(state_dict)
        looks_like = f'it looks like {guessed} weights' if guessed else 'it does not look like a VAN of the table'
        problems = [f'{label}: {_describe(names)}' for label, names in (
            ('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', wrong_shape)) if names]
        raise ValueError(f'{source} does not fit {_variant_label(variant)} ({looks_like}); ' + '; '.join(problems) +
                         '. Choose the model that matches the file, or a file of the chosen model.')

    if head_fits:  # (a head that is re-initialised has no classes to match)
        notes += align_head_to_classes(file_head, file_class_map(checkpoint), class_to_idx, source, require_head)
        state_dict.update(file_head)
    elif model_head or file_head:
        file_classes = file_head['head.weight'].shape[0] if 'head.weight' in file_head else 0
        model_classes = getattr(model, 'num_classes', 0)
        if file_classes == model_classes and 'head.weight' in model_head:  # same classes, other pooling
            mismatch = (f'has a head over {file_head["head.weight"].shape[1]} features but the model\'s pooling '
                        f'gives {model_head["head.weight"].shape[1]}')
            fix = 'build the model with the global_pool the weights were trained with'
        else:
            mismatch = f'has a head for {file_classes} classes but the model has {model_classes}'
            fix = f'use the dataset the weights were trained on (or --num-classes {file_classes})'
        if require_head:
            raise ValueError(f'{source} {mismatch}: evaluating a freshly initialised head is meaningless; {fix}')
        notes.append(f'{source} {mismatch}; ' + ('keeping a freshly initialised head' if model_head else
                                                 'the model has no head (features only)'))
    model.load_state_dict({**state_dict, **({} if head_fits else model_head)}, strict=True)
    for note in notes:
        _logger.info(note)
    return notes

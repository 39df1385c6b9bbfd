"""A ready-to-run eval model from any checkpoint file, for the tools that use a trained model.

tools/export_onnx.py and tools/predict.py accept every file the models package reads (main.py's
training checkpoints, the official `{'state_dict': ...}` release, timm/Ascend-port checkpoints,
HuggingFace files). Besides the weights they need what the file says about the run: the variant
(`arch`, or `args['model']`), the class names (`class_to_idx`) and the eval preprocessing options
(`args`). This module collects those in one place so both tools agree on them, and `eval_preprocessing`
turns them into the evaluation's own transform (utils.images.eval_transform), so that prediction and
the exported graph's input are what evaluation uses.

Files are read only through `models.weights` (`safe_load`, `extract_state_dict`, and timm's
`pretrained=True` path that calls `load_pretrained`), so an unsafe pickle is refused here as well.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple

import timm
import torch

import models
from models.weights import UnsafeFileError, extract_state_dict, guess_variant, safe_load
from utils.checkpoint import run_options
from utils.errors import CheckpointError
from utils.images import DataConfig, eval_transform, resolve_eval_config

__all__ = ['LoadedModel', 'load_model', 'eval_preprocessing', 'read_class_map']


@dataclass
class LoadedModel:
    model: torch.nn.Module          # in eval mode, on the CPU
    variant: str                    # the timm name it was built as
    num_classes: int
    class_names: Optional[List[str]]  # index -> name, when the checkpoint or a class-map file has them
    data_args: dict  # the run's eval-preprocessing options, for timm's resolve_data_config


def eval_preprocessing(loaded: LoadedModel, img_size: Optional[int] = None) -> Tuple[Callable, DataConfig]:
    """(transform, config): the evaluation preprocessing of the loaded run (its stored options, else the
    model's defaults), at `img_size` when given; the transform takes `utils.images.load_rgb`'s images."""
    overrides = dict(loaded.data_args, **({'input_size': (3, img_size, img_size)} if img_size else {}))
    config = resolve_eval_config(loaded.model, overrides)
    return eval_transform(config), config


def _img_size(args: dict) -> Optional[Tuple[int, int]]:
    """Training image size from main.py's `img_size` or timm's `input_size` ([C, H, W])."""
    size = args.get('img_size')
    if isinstance(size, int) and size > 0:
        return size, size
    size = args.get('input_size')
    if isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size):
        return size[1], size[2]
    return None


def _eval_data_args(args: dict) -> dict:
    """The run's eval preprocessing options (main.py: --img-size --crop-pct --mean --std --interpolation)
    in resolve_data_config's terms; values of an unexpected type are left out (the model default applies)."""
    data_args = {}
    size = _img_size(args)
    if size:
        data_args['input_size'] = (3, *size)
    crop_pct = args.get('crop_pct')
    if isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1:
        data_args['crop_pct'] = float(crop_pct)
    if isinstance(args.get('interpolation'), str) and args['interpolation']:
        data_args['interpolation'] = args['interpolation']
    for key in ('mean', 'std'):
        value = args.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
            data_args[key] = tuple(float(v) for v in value)
    return data_args


def _ordered_names(by_index: Mapping[int, str], num_classes: int, source: str) -> List[str]:
    """Names in class-index order; CheckpointError unless the indices are exactly 0..num_classes-1."""
    if sorted(by_index) != list(range(num_classes)):
        raise CheckpointError(f'{source}: the class map must name each of the model\'s {num_classes} classes '
                              f'0..{num_classes - 1} once; it has {len(by_index)} entries with indices '
                              f'{min(by_index, default=None)}..{max(by_index, default=None)}. '
                              f'Use the class map of the same training run')
    return [by_index[i] for i in range(num_classes)]


def _names_from_class_to_idx(class_to_idx: Mapping, num_classes: int, source: str) -> List[str]:
    try:
        by_index = {int(index): str(name) for name, index in class_to_idx.items()}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{source}: class map must map names to class indices ({e})') from e
    return _ordered_names(by_index, num_classes, source)


def read_class_map(path, num_classes: int) -> List[str]:
    """Class names, index order, from a file: text (one name per line, line i = class i) or JSON.

    JSON may be a list of names, a `class_to_idx` object ({"cat": 0, ...}, what ImageFolder and
    main.py produce) or an index-keyed object ({"0": "cat", ...}; a list value such as
    ["n01440764", "tench"] in ImageNet's class index file uses its last item, the readable name).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f'cannot read class map {path}: {e}') from e
    if path.suffix.lower() == '.json':
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f'class map {path} is not valid JSON ({e})') from e
        if isinstance(data, list):
            names = [str(n) for n in data]
        elif isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values()):
            return _names_from_class_to_idx(data, num_classes, f'class map {path}')
        elif isinstance(data, dict) and data and all(str(k).isdigit() for k in data):
            # Keyed by index, so names may repeat (ImageNet has two different classes called "crane").
            by_index = {int(k): str(name[-1] if isinstance(name, list) and name else name) for k, name in data.items()}
            return _ordered_names(by_index, num_classes, f'class map {path}')
        else:
            raise CheckpointError(f'class map {path}: expected a JSON list of names, {{"name": index}} '
                                  f'or {{"index": "name"}}')
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise CheckpointError(f'class map {path} has {len(names)} names but the model has {num_classes} '
                              f'outputs; give one name per class, in class-index order')
    return names


def load_model(path, model_name: Optional[str] = None, class_map: Optional[str] = None,
               lka_impl: str = 'plain') -> LoadedModel:
    """Build the model a checkpoint file holds, with its head, in eval mode on the CPU.

    The variant is `model_name` when given, else the checkpoint's `arch`, else `args['model']`,
    else the one whose layer shapes the weights have. `lka_impl` defaults to 'plain' (nn.Conv2d
    exactly as the reference), the form exporters and other runtimes understand.

    Raises CheckpointError (utils.errors) with a message naming the file, also for what the models
    package finds (a missing or unsafe file, weights that do not fit).
    """
    try:
        return _load_model(str(path), model_name, class_map, lka_impl)
    except (FileNotFoundError, UnsafeFileError, ValueError) as error:  # models.weights' messages name the fix
        raise CheckpointError(str(error)) from None


def _load_model(source: str, model_name: Optional[str], class_map: Optional[str], lka_impl: str) -> LoadedModel:
    checkpoint = safe_load(source)
    state_dict = extract_state_dict(checkpoint, source=source)
    args = run_options(checkpoint)
    meta = checkpoint if isinstance(checkpoint, Mapping) else {}

    variant = model_name or meta.get('arch') or args.get('model') or guess_variant(state_dict)
    if not variant:
        raise CheckpointError(f'{source} does not say which model it holds and its weights match no VAN '
                              f'variant; pass --model (one of {", ".join(models.MODEL_NAMES)})')
    if variant not in models.MODEL_NAMES:
        raise CheckpointError(f'{source}: model {variant!r} is not a VAN variant; pass --model with one of '
                              f'{", ".join(models.MODEL_NAMES)}')
    head = state_dict.get('head.weight')
    if head is None or head.dim() != 2:
        raise CheckpointError(f'{source} has no classifier head (head.weight); it holds a backbone only. '
                              f'Use a checkpoint of a trained classifier (e.g. model_best.pth.tar of a run)')
    num_classes = head.shape[0]

    model = timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=source),
                              num_classes=num_classes, lka_impl=lka_impl)
    model.eval()

    if class_map is not None:
        class_names = read_class_map(class_map, num_classes)
    elif isinstance(meta.get('class_to_idx'), Mapping):
        class_names = _names_from_class_to_idx(meta['class_to_idx'], num_classes, f'{source} (class_to_idx)')
    else:
        class_names = None
    return LoadedModel(model=model, variant=variant, num_classes=num_classes,
                       class_names=class_names, data_args=_eval_data_args(args))

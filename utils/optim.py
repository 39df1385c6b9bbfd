"""Optimizer, learning rate and its schedule, built from timm's factories.

The peak learning rate follows the global batch (timm's --lr-base convention, `effective_lr`).
Weight decay is not applied to biases and 1-D parameters (norms, layer scales). AdamW runs fused
where the device offers a fused kernel; which one (and with which AMP stack) is the device's
`fused_adamw` entry in utils.device.DEVICE_KINDS.
"""
import importlib
import warnings
from typing import Optional

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2

from utils.device import TORCH_FUSED, device_kind


def _import_class(path: str):
    """'module:Class' -> the class, or None when the module does not import or lacks it."""
    module_name, class_name = path.split(':')
    try:
        module = importlib.import_module(module_name)
    except Exception:  # torch_npu and apex fail at import in many ways (missing CANN libraries)
        return None
    return getattr(module, class_name, None)


LR_BASE_SCALES = ('linear', 'sqrt')


def effective_lr(lr: Optional[float], global_batch: int, lr_base: float = 1e-3, lr_base_size: int = 1024,
                 lr_base_scale: str = 'linear') -> float:
    """The peak learning rate of a run whose steps see `global_batch` images (per device x processes).

    An explicit `lr` wins. Otherwise, as timm's train.py (--lr-base): `lr_base` belongs to a global
    batch of `lr_base_size` and is scaled to `global_batch` linearly or by the square root of the
    ratio. The VAN recipe, 1e-3 at 8 x 128 = 1024, is the linear rule with the defaults.
    """
    if lr is not None:
        return lr
    if global_batch < 1 or lr_base_size < 1:
        raise ValueError(f'global batch ({global_batch}) and lr base size ({lr_base_size}) must be positive')
    if lr_base_scale not in LR_BASE_SCALES:
        raise ValueError(f"lr base scale must be one of {', '.join(LR_BASE_SCALES)}, got {lr_base_scale!r}")
    ratio = global_batch / lr_base_size
    return lr_base * (ratio if lr_base_scale == 'linear' else ratio ** 0.5)


def create_optimizer(model: torch.nn.Module, device: torch.device, opt: str = 'adamw', lr: float = 1e-3,
                     weight_decay: float = 0.05, momentum: float = 0.9, eps=None, betas=None,
                     amp_backend: str = 'none'):
    """Any timm optimizer by name; AdamW uses the device's fused kernel when one exists.

    amp_backend ('none', 'native' or 'apex', utils.amp.amp_backend_for): a vendor fused AdamW only works
    with its own AMP stack, so it is chosen to match the one create_precision will set up.
    """
    kwargs = {}
    if eps is not None:
        kwargs['eps'] = eps
    if betas is not None:
        kwargs['betas'] = tuple(betas)
    fused = device_kind(device).fused_adamw.get(amp_backend) if opt.lower() == 'adamw' else None
    if fused == TORCH_FUSED:
        kwargs['fused'] = True  # one kernel for all parameters instead of several per tensor
    elif fused:
        fused_cls = _import_class(fused)
        if fused_cls is not None:
            params = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=_no_decay_names(model))
            return fused_cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               filter_bias_and_bn=True, **kwargs)


def _no_decay_names(model):
    return set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()


def create_scheduler(optimizer: torch.optim.Optimizer, epochs: int = 300, cooldown_epochs: int = 10,
                     warmup_epochs: int = 5, warmup_lr: float = 1e-6, min_lr: float = 1e-6,
                     sched: str = 'cosine', decay_epochs: float = 90, decay_rate: float = 0.1,
                     step_per_update: bool = False, updates_per_epoch: int = 0):
    """The reference's schedule; returns (scheduler, total_epochs incl. cooldown).

    As in the reference (timm 0.4.x create_scheduler): cosine over `epochs` counted from epoch 0 (the
    warmup overlaps its start, no warmup prefix), linear warmup from `warmup_lr`, then `cooldown_epochs`
    at `min_lr`. The learning rate changes once per epoch unless `step_per_update`.
    """
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=decay_epochs, decay_rate=decay_rate,
        cooldown_epochs=cooldown_epochs, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
        warmup_prefix=False, step_on_epochs=not step_per_update,
        updates_per_epoch=updates_per_epoch if step_per_update else 0)
    if scheduler is None:  # timm up to 1.0.30 returns no schedule for a name it does not know (1.0.31 raises)
        raise ValueError(f'Unknown scheduler {sched!r}')
    return scheduler, total_epochs


def check_schedule(sched: str = 'cosine', epochs: int = 300, cooldown_epochs: int = 10, warmup_epochs: int = 5,
                   warmup_lr: float = 1e-6, min_lr: float = 1e-6, decay_epochs: float = 90, decay_rate: float = 0.1,
                   step_per_update: bool = False) -> None:
    """Build the schedule on a stand-in optimizer, so that a name or combination timm refuses (an unknown
    name, 'plateau' per update, a wsd decay longer than the run) is a ValueError at start, in timm's words."""
    if sched == 'none':
        raise ValueError("'none' (no schedule) is not supported: use 'constant' for a fixed learning rate")
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        with warnings.catch_warnings():  # timm's deprecation notes come once, when the run builds its schedule
            warnings.simplefilter('ignore')
            create_scheduler(stand_in, epochs, cooldown_epochs, warmup_epochs, warmup_lr, min_lr, sched, decay_epochs,
                             decay_rate, step_per_update, updates_per_epoch=1)
    except (ValueError, AssertionError, TypeError, KeyError) as error:
        raise ValueError(f'schedule {sched!r} cannot be built: {error}') from None


def check_optimizer(opt: str, lr: float, weight_decay: float, momentum: float, eps=None, betas=None) -> None:
    """Build the optimizer for a stand-in layer and take one step, so that settings its class refuses (e.g.
    two --opt-betas for an optimizer that takes three) are a ValueError at start, in the class's words."""
    stand_in = torch.nn.Linear(2, 2)
    try:
        optimizer = create_optimizer(stand_in, torch.device('cpu'), opt, lr, weight_decay, momentum, eps, betas)
        stand_in(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    except Exception as error:  # optimizer classes check their arguments in many ways
        given = ', '.join(f'{flag} {value}' for flag, value in (('--opt-eps', eps), ('--opt-betas', betas))
                          if value is not None)
        raise ValueError(f'optimizer {opt!r} cannot be used with these settings{" (" + given + ")" if given else ""}: '
                         f'{type(error).__name__}: {error}') from None

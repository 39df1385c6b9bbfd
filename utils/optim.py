"""Optimizer and learning-rate schedule, built from timm's factories.

Weight decay is not applied to biases and 1-D parameters (norms, layer scales). AdamW runs fused
where the device offers a fused kernel; the NPU gate is here only.
"""
import importlib
import warnings

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2


def _npu_fused_adamw():
    """torch_npu's NpuFusedAdamW, else Ascend apex's, else None."""
    for module_name in ('torch_npu.optim', 'apex.optimizers'):
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue
        if hasattr(module, 'NpuFusedAdamW'):
            return module.NpuFusedAdamW
    return None


def create_optimizer(model: torch.nn.Module, device: torch.device, opt: str = 'adamw', lr: float = 1e-3,
                     weight_decay: float = 0.05, momentum: float = 0.9, eps=None, betas=None):
    """Any timm optimizer by name; AdamW uses the device's fused kernel when one exists."""
    kwargs = {}
    if eps is not None:
        kwargs['eps'] = eps
    if betas is not None:
        kwargs['betas'] = tuple(betas)
    if opt.lower() == 'adamw' and device.type == 'npu':
        fused_cls = _npu_fused_adamw()
        if fused_cls is not None:
            params = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=_no_decay_names(model))
            return fused_cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if opt.lower() == 'adamw' and device.type == 'cuda':
        kwargs['fused'] = True  # one kernel for all parameters instead of several per tensor
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
    return create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=decay_epochs, decay_rate=decay_rate,
        cooldown_epochs=cooldown_epochs, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
        warmup_prefix=False, step_on_epochs=not step_per_update,
        updates_per_epoch=updates_per_epoch if step_per_update else 0)


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

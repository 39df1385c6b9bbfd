"""Mixed precision ("AMP O1") as one object, whatever the backend.

The training loop always writes
    with precision.autocast():
        loss = criterion(model(x), y)
    precision.backward_step(loss, optimizer, clip_grad=..., parameters=...)
and `Precision` hides which backend runs: none (fp32), native `torch.autocast` (+ GradScaler for
float16), or apex `amp.initialize` (Ascend's build, or an old NVIDIA build that still has `apex.amp`).
The apex gate lives here and nowhere else; what differs per device (AMP dtype, loss scaler, whether
apex may run and combines gradients) comes from utils.device.DEVICE_KINDS.
"""
import contextlib
import functools
import importlib
import math
from typing import Callable, Iterable, Optional

import torch
from timm.utils import dispatch_clip_grad

from models import compat
from utils.device import device_kind
from utils.errors import AmpError

AMP_BACKENDS = ('auto', 'apex', 'native')
AMP_DTYPES = ('auto', 'float16', 'bfloat16')
OPT_LEVELS = ('O1', 'O2')


def find_apex_amp():
    """Return the `apex.amp` module when an apex with amp.initialize is importable, else None.

    The PyPI package named `apex` is unrelated and NVIDIA's current apex dropped `apex.amp`; both
    count as absent.
    """
    try:
        apex_amp = importlib.import_module('apex.amp')
    except Exception:  # apex builds can fail at import in many ways (missing CUDA/CANN libs)
        return None
    return apex_amp if hasattr(apex_amp, 'initialize') else None


def parse_loss_scale(value: str):
    """'dynamic' or a positive number, for --loss-scale."""
    if str(value) == 'dynamic':
        return 'dynamic'
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"--loss-scale must be 'dynamic' or a positive number, got {value!r}")
    return number


def resolve_amp_backend(requested: str, device_type: str, apex_available: bool) -> str:
    """Choose 'apex' or 'native' for --amp.

    auto takes apex where the device's entry says so and it is installed (NPU: Ascend's fused O1
    path, the ModelZoo setup) and native autocast elsewhere: on GPU native autocast is the maintained
    O1 equivalent, and apex never supported CPU. `apex` asks for it explicitly (NPU or GPU).
    """
    if requested not in AMP_BACKENDS:
        raise AmpError(f"--amp-backend {requested!r} is not one of {', '.join(AMP_BACKENDS)}")
    kind = device_kind(device_type)
    if requested == 'native':
        return 'native'
    if requested == 'apex':
        if not apex_available:
            raise AmpError('--amp-backend apex was asked for but apex.amp is not importable (install '
                           "Ascend's apex on NPU; NVIDIA's current apex has no amp). Use --amp-backend native.")
        if not kind.apex_supported:
            raise AmpError(f'--amp-backend apex needs an NPU or GPU; on {device_type} use --amp-backend native '
                           '(bfloat16).')
        return 'apex'
    return 'apex' if apex_available and kind.apex_by_default else 'native'


def amp_backend_for(enabled: bool, requested: str, device) -> str:
    """'none' without --amp, else the backend create_precision will run ('apex' or 'native').

    The optimizer is built before create_precision and must match it (utils.optim.create_optimizer).
    """
    if not enabled:
        return 'none'
    return resolve_amp_backend(requested, device.type, find_apex_amp() is not None)


def resolve_amp_dtype(requested: str, device_type: str) -> torch.dtype:
    """The device's AMP dtype for auto: float16 on accelerators, bfloat16 on CPU."""
    if requested not in AMP_DTYPES:
        raise AmpError(f"--amp-dtype {requested!r} is not one of {', '.join(AMP_DTYPES)}")
    dtype = device_kind(device_type).amp_dtype if requested == 'auto' else getattr(torch, requested)
    if dtype == torch.float16 and device_type == 'cpu' and compat.cpu_float16_reason():
        raise AmpError(compat.cpu_float16_reason())
    return dtype


class Precision:
    """Autocast context factory + backward/step, with a checkpointable state.

    `checkpoint_key` is the key the state is saved under ('amp_scaler' for GradScaler, 'amp' for
    apex, None when there is nothing to save), matching timm-style checkpoints.
    """

    def __init__(self, backend: str, autocast: Callable[[], contextlib.AbstractContextManager],
                 dtype: torch.dtype = torch.float32, scaler=None, apex_amp=None, fixed_scale=None):
        self.backend = backend
        # --loss-scale <number>: overflowing steps are skipped but the scale never changes.
        self._fixed_scale = fixed_scale
        self.dtype = dtype
        self.autocast = autocast
        self._scaler = scaler
        self._apex_amp = apex_amp
        if apex_amp is not None:
            self.checkpoint_key = 'amp'
        elif scaler is not None:
            self.checkpoint_key = 'amp_scaler'
        else:
            self.checkpoint_key = None

    def __repr__(self):
        scale = 'GradScaler' if self._scaler is not None else 'no scaler'
        return f'Precision(backend={self.backend}, dtype={self.dtype}, {scale})'

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      clip_grad: Optional[float] = None, clip_mode: str = 'norm',
                      parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
        """Backward, optional gradient clipping (on unscaled gradients), optimizer step."""
        if self._apex_amp is not None:
            with self._apex_amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            if clip_grad is not None:
                dispatch_clip_grad(self._apex_amp.master_params(optimizer), clip_grad, mode=clip_mode)
            optimizer.step()
        elif self._scaler is not None:
            self._scaler.scale(loss).backward()
            if clip_grad is not None:
                self._scaler.unscale_(optimizer)
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            self._scaler.step(optimizer)
            self._scaler.update(self._fixed_scale)
        else:
            loss.backward()
            if clip_grad is not None:
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            optimizer.step()

    def state_dict(self):
        if self._apex_amp is not None:
            return self._apex_amp.state_dict()
        return self._scaler.state_dict() if self._scaler is not None else None

    def load_state_dict(self, state) -> None:
        if state is None:
            return
        if self._apex_amp is not None:
            self._apex_amp.load_state_dict(state)
        elif self._scaler is not None:
            if 'dynamic' in self._scaler.state_dict() and 'dynamic' not in state:
                # torch_npu's scaler saves 'dynamic' and requires it on load (torch_npu/npu/amp/grad_scaler.py
                # load_state_dict); states written by torch.amp.GradScaler (older NPU runs, GPU) lack it.
                # Precision's scaler is always dynamic (a fixed --loss-scale goes through update()).
                state = dict(state, dynamic=True)
            self._scaler.load_state_dict(state)


def _check_optimizer_pairing(optimizer, backend: str, combine_grad: bool) -> None:
    """Refuse the fused optimizer of one AMP stack handed to the other (see DeviceKind.fused_adamw)."""
    apex_fused = getattr(optimizer, 'is_npu_fused_optimizer', False) is True
    torch_npu_fused = getattr(optimizer, 'is_fused_optimizer', False) is True and not apex_fused
    if backend == 'apex' and combine_grad and torch_npu_fused:
        raise AmpError(f"torch_npu's {type(optimizer).__name__} cannot go through apex amp.initialize(combine_grad=True): "
                       'apex would unscale a stale copy of its gradients. Use --amp-backend native, or '
                       "apex.optimizers' fused optimizer with apex.")
    if backend != 'apex' and apex_fused:
        raise AmpError(f"apex's {type(optimizer).__name__} only runs under apex amp.initialize; use --amp-backend apex "
                       "or torch_npu's fused optimizer.")


def create_precision(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                     enabled: bool, backend: str = 'auto', opt_level: str = 'O1',
                     loss_scale='dynamic', amp_dtype: str = 'auto'):
    """Set up mixed precision; returns (model, optimizer, Precision).

    Call before wrapping the model in DistributedDataParallel (apex.amp.initialize must see the bare
    model). Without --amp the same object runs the plain fp32 path.
    """
    if not enabled:
        _check_optimizer_pairing(optimizer, 'none', False)
        return model, optimizer, Precision('none', contextlib.nullcontext)
    kind = device_kind(device)
    loss_scale = parse_loss_scale(loss_scale) if isinstance(loss_scale, str) else loss_scale
    apex_amp = find_apex_amp()
    chosen = resolve_amp_backend(backend, device.type, apex_amp is not None)
    if opt_level not in OPT_LEVELS:
        raise AmpError(f"--opt-level {opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
    if opt_level != 'O1' and chosen != 'apex':
        raise AmpError(f'--opt-level {opt_level} needs apex; native autocast only implements O1.')
    _check_optimizer_pairing(optimizer, chosen, kind.apex_combine_grad)
    if chosen == 'apex':
        kwargs = dict(opt_level=opt_level, loss_scale=loss_scale)
        if kind.apex_combine_grad:
            kwargs['combine_grad'] = True  # Ascend's apex fuses gradient buffers for speed
        model, optimizer = apex_amp.initialize(model, optimizer, **kwargs)
        # apex patches the ops itself: no autocast region is needed.
        return model, optimizer, Precision('apex', contextlib.nullcontext, torch.float16, apex_amp=apex_amp)
    dtype = resolve_amp_dtype(amp_dtype, device.type)
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
    # bfloat16 has float32's exponent range, so gradients cannot underflow: no scaler needed.
    scaler = None
    if dtype == torch.float16:
        scaler = kind.grad_scaler(device.type, None if loss_scale == 'dynamic' else float(loss_scale))
    fixed_scale = None if loss_scale == 'dynamic' or scaler is None else float(loss_scale)
    return model, optimizer, Precision('native', autocast, dtype, scaler=scaler, fixed_scale=fixed_scale)

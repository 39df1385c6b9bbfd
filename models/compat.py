"""Every version gate of the repository: torch, torchvision, timm, numpy and triton.

Nothing else compares versions or probes for APIs; code that needs a capability asks here. Each gate
names the release that brought the capability and what runs before it. Where an older stack lacks
something, the feature either behaves exactly as on the newest torch (a replacement built from older
APIs) or, when the user asked for it explicitly, is refused with the fix (UnsupportedError).

The supported range is torch 2.1 (Ascend's long-term torch_npu line) to the newest release that
requirements.txt admits; README.md's "Supported versions" table says what degrades below which release.
It lives in models/ because models/ is the lowest layer (utils/ and tools/ import models, never the
reverse) and five of the gates are needed inside models/.
"""
import functools
import gc
import os
import sys
from typing import Callable, List

import torch
from torch.torch_version import TorchVersion

TORCH = TorchVersion(torch.__version__)

# The releases that brought what the code uses (checked in each wheel's own sources).
CPU_GRAD_SCALER = (2, 3)        # torch.amp.GradScaler(device); before: torch.cuda.amp.GradScaler only
NUMPY2_ABI = (2, 3)             # first torch wheels built against NumPy 2; older ones need numpy < 2
DEVICE_AUTOCAST_API = (2, 4)    # torch.is_autocast_enabled(device), get_autocast_dtype, torch.amp.custom_fwd
CUSTOM_OPS = (2, 4)             # torch.library.custom_op / register_fake / register_autograd / opcheck
ONNX_DYNAMO_FLAG = (2, 5)       # torch.onnx.export(dynamo=...)
SAFE_GLOBALS_CONTEXT = (2, 5)   # torch.serialization.safe_globals; before: weights-only loading has no allow-list context
DATALOADER_PINS_FOR_ACCELERATOR = (2, 9)  # DataLoader pins for the current accelerator, ignores pin_memory_device
TIMM_MIN = (1, 0, 12)           # timm.optim.get_optimizer_class / list_optimizers (utils/options.py)
DIST_ERROR_CLASSES = (2, 2)     # torch.distributed.DistNetworkError, DistStoreError; before: plain RuntimeError
PG_DEALLOC_RELEASES_GIL = (2, 8)  # ProcessGroup's binding releases the GIL while its backends stop (pytorch#154976)


class UnsupportedError(RuntimeError):
    """The installed torch lacks a capability the user asked for explicitly."""


def torch_at_least(version) -> bool:
    return TORCH >= version


# --- dispatch modes, compiling -------------------------------------------------------------------
try:  # torch >= 2.4
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as in_dispatch_mode
except ImportError:  # torch 2.1-2.3: the same question asked of the mode stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def in_dispatch_mode() -> bool:
        return _get_current_dispatch_mode() is not None

if hasattr(torch.compiler, 'is_compiling'):  # torch >= 2.3
    is_compiling: Callable[[], bool] = torch.compiler.is_compiling
else:
    import torch._dynamo

    is_compiling = torch._dynamo.is_compiling


# --- autocast ----------------------------------------------------------------------------------
if torch_at_least(DEVICE_AUTOCAST_API):
    def autocast_enabled(device_type: str) -> bool:
        return torch.is_autocast_enabled(device_type)

    def autocast_dtype(device_type: str) -> torch.dtype:
        return torch.get_autocast_dtype(device_type)

    def custom_fwd(device_type: str):
        return torch.amp.custom_fwd(device_type=device_type)

    def custom_bwd(device_type: str):
        return torch.amp.custom_bwd(device_type=device_type)
else:
    def autocast_enabled(device_type: str) -> bool:
        if device_type == 'cpu':
            return torch.is_autocast_cpu_enabled()
        if device_type == 'cuda':
            return torch.is_autocast_enabled()
        return False  # other backends keep their own autocast state on these releases

    def autocast_dtype(device_type: str) -> torch.dtype:
        return torch.get_autocast_cpu_dtype() if device_type == 'cpu' else torch.get_autocast_gpu_dtype()

    # What torch.amp.custom_fwd/custom_bwd do from 2.4 on (torch/amp/autocast_mode.py): the forward records
    # the autocast state, the backward runs under that same state. torch.cuda.amp's pair is CUDA-only.
    def custom_fwd(device_type: str):
        def decorate(forward):
            @functools.wraps(forward)
            def wrapped(ctx, *args, **kwargs):
                ctx._van_autocast_state = (autocast_enabled(device_type), autocast_dtype(device_type))
                return forward(ctx, *args, **kwargs)
            return wrapped
        return decorate

    def custom_bwd(device_type: str):
        def decorate(backward):
            @functools.wraps(backward)
            def wrapped(ctx, *args, **kwargs):
                enabled, dtype = ctx._van_autocast_state
                with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    return backward(ctx, *args, **kwargs)
            return wrapped
        return decorate


def grad_scaler(device_type: str, **kwargs):
    """torch's loss scaler for float16 AMP on `device_type` (NPU runs use torch_npu's, see utils/device.py)."""
    if torch_at_least(CPU_GRAD_SCALER):
        return torch.amp.GradScaler(device_type, **kwargs)
    if device_type == 'cuda' or not kwargs.get('enabled', True):  # a disabled scaler passes through anywhere
        return torch.cuda.amp.GradScaler(**kwargs)
    raise UnsupportedError(cpu_float16_reason() or f'no loss scaler for {device_type} in torch {torch.__version__}')


def grad_scaler_classes() -> tuple:
    """The classes grad_scaler() can return (to recognise torch's scalers in checks and tests)."""
    classes = (torch.cuda.amp.GradScaler,)
    return (torch.amp.GradScaler,) + classes if torch_at_least(CPU_GRAD_SCALER) else classes


def cpu_float16_reason() -> str:
    """'' where float16 AMP can run on the CPU (autocast 2.2, GradScaler 2.3), else why not and the fix."""
    return '' if torch_at_least(CPU_GRAD_SCALER) else (
        f'float16 mixed precision on the CPU needs torch >= 2.3 (a CPU GradScaler); this is torch '
        f'{torch.__version__}. Use --amp-dtype bfloat16 (the CPU default, needs no scaler) or a newer torch.')


# --- checkpoint loading -------------------------------------------------------------------------
# The functions torch.save names to rebuild dense tensors and parameters (_v3 and meta tensors came after 2.1).
_TENSOR_REBUILDS = ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3', '_rebuild_parameter',
                    '_rebuild_parameter_with_state', '_rebuild_meta_tensor_no_storage')


def tensor_rebuild_functions() -> dict:
    """'torch._utils.<name>' -> function, for those of the rebuild functions this torch has."""
    return {f'torch._utils.{name}': getattr(torch._utils, name)
            for name in _TENSOR_REBUILDS if hasattr(torch._utils, name)}


def weights_only_allowing(extra_globals: list):
    """A context in which torch.load(weights_only=True) also builds `extra_globals` (classes), or None where
    torch has no such context (before 2.5; add_safe_globals of 2.4 would change the whole process)."""
    if not torch_at_least(SAFE_GLOBALS_CONTEXT):
        return None
    return torch.serialization.safe_globals(extra_globals)


# --- torch.distributed ---------------------------------------------------------------------------
def dist_peer_error_classes() -> tuple:
    """The torch.distributed error classes that always mean another process or the network failed (store and
    network errors); empty before 2.2, where those are RuntimeErrors known only by their text."""
    import torch.distributed as dist
    return (dist.DistNetworkError, dist.DistStoreError) if torch_at_least(DIST_ERROR_CLASSES) else ()


def destroy_process_group() -> None:
    """torch.distributed.destroy_process_group() of the default group, without the deadlock of torch < 2.8.

    Freeing a process group stops its backends, which join their worker threads. Before 2.8 the ProcessGroup's
    Python binding does that holding the GIL, while a worker thread may still be letting go of the last
    collective (a gloo AsyncWork) whose tensors Python has already dropped: freeing those needs the GIL, so
    both threads wait for each other forever (seen at the end of torchrun runs on torch 2.1; fixed upstream by
    pytorch#154976). The backends' own bindings (ProcessGroupGloo, ProcessGroupNCCL) have always released the
    GIL while they stop, so on those releases this holds each backend, destroys the group, and then lets go of
    the backends last: their threads stop with the GIL free.
    """
    import torch.distributed as dist
    if torch_at_least(PG_DEALLOC_RELEASES_GIL):
        dist.destroy_process_group()
        return
    group = dist.group.WORLD
    try:
        backends = [group._get_backend(torch.device(device)) for device in group._device_types]
    except (RuntimeError, AttributeError, ValueError):  # a backend this torch cannot name (third-party): as torch does
        backends = []
    del group
    dist.destroy_process_group()
    gc.collect()  # a DDP module or a traceback in a reference cycle may still hold the group: free it now
    del backends  # the last references: each backend stops its threads with the GIL released


# --- export, data loading, custom ops, Triton ----------------------------------------------------
def onnx_export_kwargs() -> dict:
    """Names the TorchScript exporter where torch.onnx.export also has the dynamo one (2.5+)."""
    return {'dynamo': False} if torch_at_least(ONNX_DYNAMO_FLAG) else {}


def dataloader_pins_for_current_accelerator() -> bool:
    """From 2.9 DataLoader pins for the current accelerator and ignores pin_memory_device."""
    return torch_at_least(DATALOADER_PINS_FOR_ACCELERATOR)


def custom_ops_reason() -> str:
    """'' where torch.library.custom_op exists (the Triton route registers its kernels with it)."""
    return '' if torch_at_least(CUSTOM_OPS) else (
        f'needs torch >= 2.4 (torch.library.custom_op); this is torch {torch.__version__}')


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (triton >= 3.4 keeps the setting in knobs)."""
    import triton
    knobs = getattr(triton, 'knobs', None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


# --- the installed stack as a whole -------------------------------------------------------------
def stack_problems() -> List[str]:
    """Installed combinations that cannot work, each with its fix (main.py and the tools stop on them)."""
    problems = []
    try:
        import numpy
    except ImportError:
        numpy = None
    if numpy is not None and int(numpy.__version__.split('.')[0]) >= 2 and not torch_at_least(NUMPY2_ABI):
        problems.append(f'torch {torch.__version__} was built against NumPy 1.x and cannot exchange arrays with '
                        f'NumPy {numpy.__version__}: pip install "numpy<2"')
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and TorchVersion(timm.__version__) < TIMM_MIN:
        problems.append(f'timm {timm.__version__} is older than {".".join(map(str, TIMM_MIN))}: '
                        f'pip install "timm>={".".join(map(str, TIMM_MIN))},<1.1"')
    return problems


def require_working_stack() -> None:
    """Stop with `error:` lines and exit status 2 when stack_problems() finds any (models/__init__.py calls it,
    so main.py, the tools and the tests stop before an import or a data loader fails deep inside torch)."""
    problems = stack_problems()
    if problems:
        for problem in problems:
            print(f'error: {problem}', file=sys.stderr)
        raise SystemExit(2)


def describe() -> str:
    """One line naming the stack (settings log line, reports)."""
    import platform
    parts = [f'python {platform.python_version()}', f'torch {torch.__version__}']
    for name in ('torchvision', 'timm', 'numpy'):
        try:
            parts.append(f'{name} {__import__(name).__version__}')
        except ImportError:
            parts.append(f'{name} missing')
    return ', '.join(parts)

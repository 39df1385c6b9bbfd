"""Device and distributed setup, resolved once at start, and the table of what differs per device.

Everything after `setup_device` only sees a `torch.device` and a `DistEnv`; the NPU
gate (importing torch_npu) lives here and nowhere else, and so does the host memory allocator
setting of CPU training (`keep_freed_host_memory`). Every choice that depends on the kind of device
(backend, AMP dtype, loss scaler, fused optimizer, pinning, memory formats, reducible dtypes) is one
`DeviceKind` entry of `DEVICE_KINDS`: the rest of the code asks `device_kind(device)` instead of
comparing device types, so adding or fixing a device is one entry.
"""
import ctypes
import ctypes.util
import datetime
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, FrozenSet, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from models import compat
from utils.errors import DeviceError

DEVICE_CHOICES = ('auto', 'npu', 'cuda', 'cpu')


def _torch_grad_scaler(device_type: str, init_scale: Optional[float]):
    return compat.grad_scaler(device_type, **({} if init_scale is None else dict(init_scale=init_scale)))


def _torch_npu_grad_scaler(device_type: str, init_scale: Optional[float]):
    # torch_npu's own scaler (torch_npu/npu/amp/grad_scaler.py), not torch's generic scaler for 'npu': on the
    # Atlas training series (910A, is_support_inf_nan() False) float16 overflow saturates instead of giving
    # inf/NaN, and only this scaler clears the overflow flag in scale() and all-reduces the overflow count
    # (_sync_dist_overflow_count), so every rank skips the same steps; it also unscales a fused optimizer's
    # combined gradients in one call. dynamic stays True for a fixed --loss-scale too: with dynamic=False
    # its step() runs optimizer.step() even on overflow; Precision keeps the scale fixed through
    # update(new_scale) instead, as it does with torch's scaler.
    from torch_npu.npu.amp import GradScaler
    return GradScaler(**({} if init_scale is None else dict(init_scale=init_scale)), dynamic=True)


# all_reduce dtypes of each collective backend. HCCL: torch_npu ProcessGroupHCCL.cpp checkSupportedDataType
# (v2.1.0-v2.7.1; float64 only on Ascend950 from 2.7.1, so never relied on). gloo and NCCL also take float64.
_HCCL_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                          torch.bfloat16})
_GLOO_NCCL_DTYPES = _HCCL_DTYPES | {torch.uint8, torch.float64}
_ALL_MEMORY_FORMATS = (torch.contiguous_format, torch.preserve_format, torch.channels_last)
TORCH_FUSED = 'torch'  # DeviceKind.fused_adamw value: torch.optim.AdamW(fused=True)


@dataclass(frozen=True)
class DeviceKind:
    """What one kind of device needs; see DEVICE_KINDS."""
    module: Optional[str]              # imported to register the device type ('torch_npu'); None: built into torch
    runtime_env: Tuple[str, ...]       # variables that show the device's runtime was set up (CANN's set_env.sh)
    dist_backend: str                  # torch.distributed backend
    reducible_dtypes: FrozenSet[torch.dtype]  # dtypes that backend's all_reduce accepts
    amp_dtype: torch.dtype             # autocast dtype of --amp-dtype auto
    apex_by_default: bool              # --amp-backend auto takes apex when it is installed
    apex_supported: bool               # --amp-backend apex can run here
    apex_combine_grad: bool            # amp.initialize(combine_grad=True) (Ascend apex's fused gradient buffers)
    grad_scaler: Callable[[str, Optional[float]], object]  # (device type, initial scale or None) -> float16 scaler
    fused_adamw: Mapping[str, str]     # AMP backend ('apex', 'native', 'none') -> 'module:Class' or TORCH_FUSED
    pin_memory: bool                   # pin batches even without --pin-mem
    pin_memory_device: str             # DataLoader pin_memory_device, for a torch that does not pin for the current accelerator
    memory_formats: Tuple[torch.memory_format, ...]  # formats Tensor.to(memory_format=) supports


DEVICE_KINDS = {
    # Sources: Ascend/pytorch v2.1.0-v2.7.1 and Ascend/apex, files named in each comment.
    'npu': DeviceKind(
        module='torch_npu',
        runtime_env=('ASCEND_HOME_PATH', 'ASCEND_TOOLKIT_HOME', 'ASCEND_OPP_PATH'),
        dist_backend='hccl', reducible_dtypes=_HCCL_DTYPES,
        amp_dtype=torch.float16,
        # The ModelZoo port's O1 setup: apex.amp.initialize(..., combine_grad=True).
        apex_by_default=True, apex_supported=True, apex_combine_grad=True,
        grad_scaler=_torch_npu_grad_scaler,
        # apex only recognises its own fused optimizers (is_npu_fused_optimizer, apex patch/npu.patch
        # _process_optimizer); torch_npu's (is_fused_optimizer) under combine_grad gets a second combined
        # gradient buffer and apex then unscales a stale one. apex's NpuFusedAdamW.step raises without
        # amp.initialize (src/apex/optimizers/npu_fused_adamw.py). So each goes with its own AMP.
        fused_adamw={'apex': 'apex.optimizers:NpuFusedAdamW', 'native': 'torch_npu.optim:NpuFusedAdamW',
                     'none': 'torch_npu.optim:NpuFusedAdamW'},
        # Unpinned host memory turns each non_blocking copy into a stream sync (torch_npu
        # CachingHostAllocator.cpp process_unregistered_mem_location_type).
        pin_memory=True, pin_memory_device='npu',
        # torch_npu's Tensor.to docs: memory_format only torch.contiguous_format or torch.preserve_format.
        memory_formats=(torch.contiguous_format, torch.preserve_format)),
    'cuda': DeviceKind(
        module=None, runtime_env=(), dist_backend='nccl', reducible_dtypes=_GLOO_NCCL_DTYPES,
        amp_dtype=torch.float16, apex_by_default=False, apex_supported=True, apex_combine_grad=False,
        grad_scaler=_torch_grad_scaler,
        fused_adamw={'apex': TORCH_FUSED, 'native': TORCH_FUSED, 'none': TORCH_FUSED},
        pin_memory=False, pin_memory_device='', memory_formats=_ALL_MEMORY_FORMATS),
    'cpu': DeviceKind(
        module=None, runtime_env=(), dist_backend='gloo', reducible_dtypes=_GLOO_NCCL_DTYPES,
        # bfloat16: the only half type CPU autocast runs fast; it needs no loss scaling.
        amp_dtype=torch.bfloat16, apex_by_default=False, apex_supported=False, apex_combine_grad=False,
        grad_scaler=_torch_grad_scaler, fused_adamw={},
        pin_memory=False, pin_memory_device='', memory_formats=_ALL_MEMORY_FORMATS),
}
BACKEND_BY_DEVICE = {name: kind.dist_backend for name, kind in DEVICE_KINDS.items()}


def device_kind(device) -> DeviceKind:
    """The DEVICE_KINDS entry of a torch.device (or anything with .type, or a type name)."""
    return DEVICE_KINDS[device if isinstance(device, str) else device.type]


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank, the number of processes, and its device."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _runtime_set_up(kind: DeviceKind) -> Optional[str]:
    """'NAME=value' of the first variable showing the device's runtime is set up, else None."""
    return next((f'{name}={os.environ[name]}' for name in kind.runtime_env if os.environ.get(name)), None)


def _npu_available() -> bool:
    """Whether torch_npu imports and sees an NPU.

    torch_npu fails at import (missing libhccl.so) on machines without CANN, so it is only tried when
    installed, and there an import failure means "no NPU". Where CANN's set_env.sh was sourced the user
    means to train on the NPU: a torch_npu that is missing or fails to import is then a DeviceError
    carrying the import error, never a quiet fall-back to another device.
    """
    kind = DEVICE_KINDS['npu']
    cann = _runtime_set_up(kind)
    if importlib.util.find_spec(kind.module) is None:
        if cann:
            raise DeviceError(f'CANN is set up ({cann}) but {kind.module} is not installed: install the torch_npu '
                              f'matching torch {torch.__version__} and this CANN, or pass --device cpu/cuda to '
                              'train without the NPU')
        return False
    try:
        importlib.import_module(kind.module)  # registers the 'npu' device type
    except Exception as error:
        if cann:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DeviceError(f'CANN is set up ({cann}) but {kind.module} cannot be imported: '
                              f'{type(error).__name__}: {first_line}. Install the torch_npu matching torch '
                              f'{torch.__version__} and this CANN, or pass --device cpu/cuda to train without the NPU')
        return False
    return hasattr(torch, 'npu') and torch.npu.is_available()


def resolve_device_type(requested: str = 'auto') -> str:
    """Return 'npu', 'cuda' or 'cpu' for --device; an absent requested device is a DeviceError.

    auto prefers NPU, then CUDA, then CPU; where CANN is set up but torch_npu cannot be imported it
    stops with that import error (see _npu_available) instead of training elsewhere.
    """
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"--device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if requested == 'auto':
        if _npu_available():
            return 'npu'
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if requested == 'npu' and not _npu_available():
        raise DeviceError('--device npu was asked for but no NPU is usable: torch_npu is not installed, '
                          'fails to import (CANN not sourced?) or sees no device. Use --device auto or cpu.')
    if requested == 'cuda' and not torch.cuda.is_available():
        raise DeviceError('--device cuda was asked for but torch sees no CUDA GPU. Use --device auto or cpu.')
    return requested


def resolve_device(name: str = 'auto') -> torch.device:
    """The torch.device a user names for one process (the tools' --device): auto (NPU, then CUDA, then CPU,
    as `resolve_device_type`), cpu, cuda[:N] or npu[:N]; DeviceError when this machine does not have it.
    Training resolves its device with `setup_device`, which also takes the local rank's."""
    kind, _, index = str(name).partition(':')
    if kind not in DEVICE_CHOICES or (index and kind == 'auto'):
        raise DeviceError(f'{name!r}: use auto, cpu, cuda[:N] or npu[:N]')
    device_type = resolve_device_type(kind)  # imports torch_npu for npu, which makes 'npu' a device type
    try:
        device = torch.device(f'{device_type}:{index}' if index else device_type)
    except RuntimeError as error:
        raise DeviceError(f'{name!r} is not a device ({error})') from None
    if device.index is not None and device_type != 'cpu':
        count = getattr(torch, device_type).device_count()
        if device.index >= count:
            raise DeviceError(f'{name!r}: this machine has {count} {device_type} device(s), numbered from 0')
    return device


def check_memory_format(device, channels_last: bool) -> None:
    """DeviceError when --channels-last asks for a memory format the device does not support."""
    if channels_last and torch.channels_last not in device_kind(device).memory_formats:
        raise DeviceError(f'--channels-last is not supported on {device.type}: its Tensor.to takes only the '
                          'contiguous and preserve memory formats (torch_npu docs). Leave --channels-last out.')


def pin_memory_settings(device, requested: bool) -> Tuple[bool, str]:
    """(pin_memory, pin_memory_device) for the DataLoaders: --pin-mem, or always where the device wants
    pinned batches (NPU); the device name only where the installed torch needs it."""
    kind = device_kind(device)
    pin = requested or kind.pin_memory
    # From torch 2.9 DataLoader pins for the current accelerator and ignores pin_memory_device with a
    # deprecation warning (pytorch/pytorch#131858, #158323); before it, only an explicit pin_memory_device
    # pins for a device other than CUDA.
    named = pin and kind.pin_memory_device and not compat.dataloader_pins_for_current_accelerator()
    return pin, kind.pin_memory_device if named else ''


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_host_memory_kept = False


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the kernel.

    CPU training allocates and frees gigabytes per step in tensors of tens of megabytes. glibc
    serves each of those with a fresh mmap and unmaps it on free, so every step faults all of its
    memory in again, page by page: on the 2-core development VM that is 1.2-2.4 million page faults
    and 3-6 s of kernel time per van_b0 step at batch 32 (measured: training step 3.0 -> 5.2
    images/s for the plain model, 5.5 -> 8.4 for the fast one). Serving them from the heap and not
    trimming it keeps the memory mapped between steps; the process then holds its peak footprint.
    Returns whether the setting took effect (False off glibc, e.g. macOS or musl); idempotent.
    """
    global _host_memory_kept
    if _host_memory_kept:
        return True
    if not sys.platform.startswith('linux'):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success. No mmap for large blocks: they come from the heap and are reused.
    # A trim threshold above any step's footprint keeps the heap top mapped between steps.
    _host_memory_kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    return _host_memory_kept


def _rank_env(local_rank_arg: int):
    """(rank, world_size, local_rank) from torchrun's env, or torch.distributed.launch's --local_rank."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if 'LOCAL_RANK' in os.environ:
        local_rank = int(os.environ['LOCAL_RANK'])
    else:
        local_rank = max(local_rank_arg, 0)
    rank = int(os.environ.get('RANK', local_rank))
    return rank, world_size, local_rank


def _restart_store(world_size: int, timeout: datetime.timedelta):
    """A store private to this attempt of a torchrun worker group on one node, else None (env://).

    torchrun (torch >= 2.5) keeps one TCPStore for the whole job and hands it to every attempt
    after a --max-restarts restart. Joining it through env:// reuses the keys the previous attempt
    wrote, so the restarted ranks read the dead processes' addresses and never connect (gloo:
    "connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712). Prefixing the keys
    with TORCHELASTIC_RESTART_COUNT isolates the attempts; that count is only the same on every
    rank when one agent (one node) restarts them all, so on several nodes torch's default is kept
    and restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README).
    """
    elastic = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True' and 'TORCHELASTIC_RESTART_COUNT' in os.environ
    if not elastic or os.environ.get('GROUP_WORLD_SIZE') != '1':
        return None
    shared = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world_size, False,
                           timeout=timeout)
    return dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", shared)


def setup_device(device: str = 'auto', local_rank: int = -1, timeout_s: float = 600) -> DistEnv:
    """Pick the device and, when launched with several processes, join the process group. (Not timm's
    init_distributed_device, which takes the argparse namespace and returns a device.)

    The backend follows the device (hccl, nccl, gloo). Multi-node runs need nothing extra: torchrun's
    --nnodes/--node_rank/--master_addr arrive as RANK/WORLD_SIZE/MASTER_ADDR in the environment.
    `timeout_s` bounds every collective: when another process dies or hangs, this one gets an error
    after at most that long instead of waiting forever (see is_peer_failure). On CPU the host
    allocator is told to keep freed memory (`keep_freed_host_memory`).
    """
    device_type = resolve_device_type(device)
    rank, world_size, local_rank = _rank_env(local_rank)
    if device_type == 'cpu':
        torch_device = torch.device('cpu')
        keep_freed_host_memory()
    else:
        accelerator = getattr(torch, device_type)
        if local_rank >= accelerator.device_count():
            raise DeviceError(f'local rank {local_rank} has no {device_type} device '
                              f'(this node has {accelerator.device_count()})')
        # Set the current device before init_process_group so hccl/nccl bind to the right one.
        accelerator.set_device(local_rank)
        torch_device = torch.device(device_type, local_rank)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(world_size, timeout)
        dist.init_process_group(backend=device_kind(device_type).dist_backend, init_method=None if store else 'env://',
                                store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(device=torch_device, rank=rank, world_size=world_size, local_rank=local_rank)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (only for timing at log points, never per step)."""
    if device.type != 'cpu':
        getattr(torch, device.type).synchronize(device)


def all_reduce_sum(tensor: torch.Tensor, dist_env: DistEnv) -> torch.Tensor:
    """Sum a tensor over all ranks (identity for one process); returns the same tensor.

    The dtype must be one the device's backend reduces (DeviceKind.reducible_dtypes: HCCL has no
    float64): a TypeError names it rather than letting the backend fail mid-run.
    """
    if dist_env.distributed:
        kind = device_kind(dist_env.device)
        if tensor.dtype not in kind.reducible_dtypes:
            raise TypeError(f'{kind.dist_backend} cannot all_reduce {tensor.dtype}; use one of '
                            f'{sorted(str(d) for d in kind.reducible_dtypes)}')
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# What a collective's error says when another process died, hangs or lost its network. Backend names
# alone ("HCCL", "NCCL", "gloo") are not signs: every error of those backends names them, e.g.
# "HCCL allreduce: Unsupported data type fp64" is a bug of this process, not a lost peer.
PEER_LOSS_SIGNS = (
    'Connection closed by peer', 'Connection reset by peer', 'Broken pipe',  # gloo / TCPStore: a peer died
    'Application timeout caused pair closure',  # gloo (e.g. DDP's buffer sync): a peer hangs
    'Timed out', 'timed out',  # gloo and the store waiting for a peer
    'Socket Timeout',  # the store waiting for a peer, torch < 2.2 (a plain RuntimeError there)
    'Watchdog caught collective operation timeout',  # NCCL and HCCL (ProcessGroupHCCL.cpp) watchdogs
    'communicator was aborted', 'ncclRemoteError',  # NCCL: a peer failed or the network broke
    'SUSPECT REMOTE ERROR',  # HCCL device error blaming the remote side (ProcessGroupHCCL.cpp get_device_error)
)


def is_peer_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when another process died, hung or lost its network."""
    # The store and network errors are about other processes; DistBackendError is any backend failure,
    # so like plain RuntimeErrors it counts only when its text says a peer was lost.
    if isinstance(error, compat.dist_peer_error_classes()):
        return True
    text = str(error)
    return dist.is_available() and dist.is_initialized() and any(sign in text for sign in PEER_LOSS_SIGNS)


def peer_failure_message(error: BaseException) -> str:
    """What to tell the user when `is_peer_failure(error)`: this process lost the others, whose output says why."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f'process {os.environ.get("RANK", "?")} lost contact with the others ({first_line}); another process '
            'probably failed or hangs, see its output. Finished epochs are kept: fix the cause and run again with '
            '--resume auto')


def cleanup_distributed() -> None:
    """Leave the process group (last thing a distributed run does, after its checkpoints are written)."""
    if dist.is_available() and dist.is_initialized():
        compat.destroy_process_group()  # not torch's directly: before torch 2.8 that can deadlock

"""Device and distributed setup, resolved once at start.

Everything after `init_distributed_device` only sees a `torch.device` and a `DistEnv`; the NPU
gate (importing torch_npu) lives here and nowhere else, and so does the host memory allocator
setting of CPU training (`keep_freed_host_memory`).
"""
import ctypes
import ctypes.util
import datetime
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICE_CHOICES = ('auto', 'npu', 'cuda', 'cpu')
BACKEND_BY_DEVICE = {'npu': 'hccl', 'cuda': 'nccl', 'cpu': 'gloo'}


class DeviceError(RuntimeError):
    """The requested device cannot be used on this machine."""


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


def _npu_available() -> bool:
    # torch_npu fails at import (missing libhccl.so) on machines without CANN, so only try it when
    # it is installed, and treat an import failure as "no NPU".
    if importlib.util.find_spec('torch_npu') is None:
        return False
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device type)
    except Exception:
        return False
    return hasattr(torch, 'npu') and torch.npu.is_available()


def resolve_device_type(requested: str = 'auto') -> str:
    """Return 'npu', 'cuda' or 'cpu' for --device; an absent requested device is a DeviceError."""
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


def init_distributed_device(device: str = 'auto', local_rank: int = -1, timeout_s: float = 600) -> DistEnv:
    """Pick the device and, when launched with several processes, join the process group.

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
        dist.init_process_group(backend=BACKEND_BY_DEVICE[device_type], init_method=None if store else 'env://',
                                store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(device=torch_device, rank=rank, world_size=world_size, local_rank=local_rank)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (only for timing at log points, never per step)."""
    if device.type != 'cpu':
        getattr(torch, device.type).synchronize(device)


def all_reduce_sum(tensor: torch.Tensor, dist_env: DistEnv) -> torch.Tensor:
    """Sum a tensor over all ranks (identity for one process); returns the same tensor."""
    if dist_env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def is_peer_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when another process died, hung or lost its network."""
    if isinstance(error, getattr(dist, 'DistError', ())):
        return True
    text = str(error)
    return dist.is_available() and dist.is_initialized() and any(sign in text for sign in (
        'Connection closed by peer', 'Connection reset by peer', 'Timed out', 'timed out', 'Broken pipe',
        'NCCL', 'HCCL', 'gloo'))


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

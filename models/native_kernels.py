"""Native CPU kernels for depthwise convolutions: built from models/csrc on first use, else absent.

The one place that decides whether the C kernels of `models/csrc/depthwise.c` are used. They are
compiled once per machine with the system C compiler (`$CC`, else `cc`) into a cache folder
(`$VAN_KERNEL_CACHE`, else `~/.cache/van-kernels`, else a temporary folder) and loaded with ctypes: no PyTorch headers, so a
build takes about a second, and nothing beyond a C compiler is needed. Where there is no compiler or
the build fails, `available()` is False, models/fast_conv.py keeps its PyTorch route and a warning
says why, once. `VAN_NATIVE_KERNELS=0` switches them off quietly (to compare, or to rule them out).

The kernels take float32 channels_last maps whose channel count is a multiple of 8 (all VAN widths).
"""
import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import compat

__all__ = ['available', 'unavailable_reason', 'supports', 'disabled', 'conv_forward', 'conv_weight_grad', 'gelu_backward']

_SOURCE = Path(__file__).resolve().parent / 'csrc' / 'depthwise.c'
# -fno-strict-aliasing: the source reads float arrays through vector-typed pointers.
_FLAGS = ['-O3', '-std=gnu99', '-fPIC', '-shared', '-fno-strict-aliasing']
# Tried in order: native vector width with OpenMP threads, then portable fallbacks.
_VARIANTS = (['-march=native', '-fopenmp'], ['-fopenmp'], [])

_lock = threading.Lock()
_lib = None
_reason: Optional[str] = None
_tried = False
_suspended = False  # inside `disabled()`


def _cpu_signature() -> str:
    """What -march=native depends on: a build is only reused on the same kind of CPU."""
    try:
        with open('/proc/cpuinfo') as f:
            lines = [l for l in f if l.startswith(('model name', 'flags', 'Features', 'CPU part'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    """$VAN_KERNEL_CACHE, else ~/.cache/van-kernels, else (read-only home) a per-user temporary folder."""
    if os.environ.get('VAN_KERNEL_CACHE'):
        return Path(os.environ['VAN_KERNEL_CACHE'])
    home_cache = Path.home() / '.cache' / 'van-kernels'
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        if os.access(home_cache, os.W_OK):
            return home_cache
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f'van-kernels-{os.getuid()}'


def _build(compiler: str) -> Tuple[Optional[Path], str]:
    """Compile the source into the cache (reused when present); (path, '') or (None, why not)."""
    source = _SOURCE.read_bytes()
    errors = []
    for extra in _VARIANTS:
        flags = _FLAGS + extra
        key = hashlib.sha256(b'\0'.join([source, compiler.encode(), ' '.join(flags).encode(),
                                         platform.machine().encode(), _cpu_signature().encode()])).hexdigest()[:16]
        target = _cache_dir() / f'depthwise-{key}.so'
        if target.exists():
            return target, ''
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename: ranks of one job building at once never load a
            # half-written file.
            fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
            os.close(fd)
            run = subprocess.run([compiler, *flags, str(_SOURCE), '-o', tmp], capture_output=True, text=True,
                                 timeout=120)
            if run.returncode == 0:
                os.replace(tmp, target)
                return target, ''
            os.unlink(tmp)
            last_line = (run.stderr.strip().splitlines() or [f'exit code {run.returncode}'])[-1]
            errors.append(f"{' '.join(extra) or 'no extra flags'}: {last_line}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f'{type(e).__name__}: {e}')
            break
    return None, '; '.join(errors)


def _load():
    global _lib, _reason, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get('VAN_NATIVE_KERNELS', '1') == '0':
            _reason = 'VAN_NATIVE_KERNELS=0'
            return None
        if not sys.platform.startswith('linux'):
            _reason = f'built on Linux only, not {sys.platform}'
            return None
        compiler = os.environ.get('CC') or 'cc'
        if shutil.which(compiler) is None:
            _reason = f'no C compiler {compiler!r} on PATH (install gcc or set CC)'
        else:
            path, why = _build(compiler)
            if path is None:
                _reason = f'building {_SOURCE.name} with {compiler} failed ({why})'
            else:
                try:
                    lib = ctypes.CDLL(str(path))
                    p, i = ctypes.c_void_p, ctypes.c_int
                    lib.van_dw_forward.argtypes = [p, p, p, p, p] + [i] * 7
                    lib.van_dw_forward.restype = None
                    lib.van_dw_weight_grad.argtypes = [p, p, p, p, p] + [i] * 7
                    lib.van_dw_weight_grad.restype = None
                    lib.van_gelu_backward.argtypes = [p, p, p, ctypes.c_long, i]
                    lib.van_gelu_backward.restype = None
                    _lib = lib
                except (OSError, AttributeError) as e:
                    _reason = f'loading {path} failed ({e})'
        if _lib is None:  # the user did not switch them off: say why they are missing, once
            warnings.warn(f'VAN native depthwise kernels are off: {_reason}. Training still works, '
                          'with PyTorch\'s kernels, more slowly on CPU.', RuntimeWarning, stacklevel=3)
        return _lib


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why `available()` is False, or None."""
    available()
    return _reason if _lib is None else None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels can take x: a float32 CPU map with channels a multiple of 8, outside autocast."""
    return (not _suspended and x.device.type == 'cpu' and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[1] % 8 == 0 and not compat.autocast_enabled('cpu') and available())


@contextlib.contextmanager
def disabled():
    """Inside this block the fast path takes PyTorch's route (tools/benchmark.py compares the two)."""
    global _suspended
    before, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = before


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def conv_forward(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                 with_gelu: bool = False):
    """'same' stride-1 depthwise conv of x (N, C, H, W) with tap-major weights taps (K*K, C), channels_last.

    With `with_gelu`, returns (conv, GELU(conv)) from one pass.
    """
    # Every tensor handed over by pointer stays bound to a name until the call returns.
    x, taps = _nhwc(x), taps.contiguous()
    bias = None if bias is None else bias.contiguous()
    n, c, h, w = x.shape
    k = int(round(taps.shape[0] ** 0.5))
    y = torch.empty_like(x, memory_format=torch.channels_last)
    act = torch.empty_like(y) if with_gelu else None
    _lib.van_dw_forward(_ptr(x), _ptr(taps), _ptr(bias), _ptr(y), _ptr(act), n, h, w, c, k, dilation,
                        torch.get_num_threads())
    return (y, act) if with_gelu else y


def gelu_backward(pre: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * GELU'(pre) (erf form) for channels_last maps; channels_last out."""
    pre, grad = _nhwc(pre), _nhwc(grad)
    out = torch.empty_like(pre, memory_format=torch.channels_last)
    _lib.van_gelu_backward(_ptr(pre), _ptr(grad), _ptr(out), pre.numel(), torch.get_num_threads())
    return out


def conv_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int, with_bias: bool):
    """(weight grad as taps (K*K, C), bias grad (C) or None) of the conv of x, given dL/dy = grad."""
    x, grad = _nhwc(x), _nhwc(grad)
    n, c, h, w = x.shape
    threads = torch.get_num_threads()
    taps = kernel_size * kernel_size
    grad_taps = x.new_empty((taps, c))
    grad_bias = x.new_empty((c,)) if with_bias else None
    scratch = x.new_empty((threads * (taps + 1) * c,))
    _lib.van_dw_weight_grad(_ptr(x), _ptr(grad), _ptr(grad_taps), _ptr(grad_bias), _ptr(scratch),
                            n, h, w, c, kernel_size, dilation, threads)
    return grad_taps, grad_bias

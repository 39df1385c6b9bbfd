"""Stand-ins for torch_npu, HCCL and Ascend's apex that enforce their documented rules on CPU tensors.

No NPU is available to the tests, so the NPU path runs on CPU tensors while every device decision
is taken as on an NPU (fixture `npu`). The stand-ins refuse exactly what the real packages refuse,
as their sources state (Ascend/pytorch v2.1.0-v2.7.1, Ascend/apex):

- torch_npu.optim.NpuFusedAdamW (torch_npu/optim/npu_fused_optim_base.py, npu_fused_adamw.py): sets
  `is_fused_optimizer`; zero_grad(set_to_none=True) raises ValueError; parameters must be float32/16.
- torch_npu.npu.amp.GradScaler (torch_npu/npu/amp/grad_scaler.py): takes `dynamic` instead of a device;
  with dynamic=False step() steps even on overflow; its state holds 'dynamic' and loading a state
  without it raises KeyError.
- HCCL all_reduce (torch_npu/csrc/distributed/ProcessGroupHCCL.cpp checkSupportedDataType): only
  int8/16/32/64, float16/32 and bfloat16; anything else raises "HCCL allreduce: Unsupported data type".
- Tensor.to on NPU (torch_npu Tensor.to docs): memory_format only contiguous_format or preserve_format.
- apex (patch/npu.patch _process_optimizer; src/apex/optimizers/npu_fused_adamw.py): apex's
  NpuFusedAdamW sets `is_npu_fused_optimizer` and raises in step() unless amp.initialize saw it; with
  combine_grad=True (or apex's fused optimizer) zero_grad is replaced by a function taking no
  arguments. Real apex silently gives wrong results when handed torch_npu's fused optimizer with
  combine_grad=True (two combined gradient buffers, a stale one unscaled); the stand-in raises there
  so that a test sees it.

The fixtures are made available to every test module by conftest.py.
"""
import contextlib
import sys
import types

import pytest
import torch
import torch.distributed as dist

from models import compat
from utils import device as device_module

HCCL_ALL_REDUCE_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                                    torch.float32, torch.bfloat16})
HCCL_DTYPE_NAMES = {torch.float64: 'fp64', torch.bool: 'bool', torch.uint8: 'uint8', torch.complex64: 'complex64'}
HCCL_PEERS = 2  # the stand-in process group holds this many ranks with equal tensors


class NpuFusedAdamW(torch.optim.AdamW):
    """torch_npu.optim.NpuFusedAdamW's rules around torch's AdamW arithmetic."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=False)
        self.is_fused_optimizer = True

    def zero_grad(self, set_to_none=False):
        if set_to_none:
            raise ValueError('set_to_none is not supported in fused optimizers')
        super().zero_grad(set_to_none=False)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group['params']:
                if param.grad is not None and param.dtype not in (torch.float32, torch.float16):
                    raise TypeError(f"Fused optimizer's parameters must be either float32 or float16, "
                                    f'but received {param.dtype}')
        return super().step(closure)


class NpuGradScaler(compat.grad_scaler_classes()[0]):
    """torch_npu.npu.amp.GradScaler's interface and state on CPU tensors (torch's CPU scaler: torch >= 2.3;
    before it, torch.cuda.amp's, which disables itself without CUDA: tests that scale skip there)."""

    def __init__(self, init_scale=2. ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 dynamic=True, enabled=True):
        device = () if compat.cpu_float16_reason() else ('cpu',)
        super().__init__(*device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)
        self._dynamic = dynamic

    def step(self, optimizer, *args, **kwargs):
        if self._dynamic:
            return super().step(optimizer, *args, **kwargs)
        state = self._per_optimizer_states[id(optimizer)]
        if state['stage'].name == 'READY':
            self.unscale_(optimizer)
        state['stage'] = type(state['stage']).STEPPED
        return optimizer.step(*args, **kwargs)  # a static scale never skips a step

    def update(self, new_scale=None):
        if self._dynamic or new_scale is not None:
            return super().update(new_scale)
        self._per_optimizer_states.clear()  # the scale stays as it is

    def state_dict(self):
        state = super().state_dict()
        state['dynamic'] = self._dynamic
        return state

    def load_state_dict(self, state_dict):
        if len(state_dict) == 0:
            raise RuntimeError('The source state dict is empty, possibly because it was saved from a disabled '
                               'instance of GradScaler.')
        super().load_state_dict(state_dict)
        self._dynamic = state_dict['dynamic']


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """An importable torch_npu with the fused optimizer and the loss scaler (no device type)."""
    amp = _module('torch_npu.npu.amp', GradScaler=NpuGradScaler)
    npu = _module('torch_npu.npu', amp=amp)
    optim = _module('torch_npu.optim', NpuFusedAdamW=NpuFusedAdamW)
    torch_npu = _module('torch_npu', npu=npu, optim=optim)
    for module in (torch_npu, npu, amp, optim):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return torch_npu


def _hccl_dtype_check(tensor):
    if tensor.dtype not in HCCL_ALL_REDUCE_DTYPES:
        name = HCCL_DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        raise RuntimeError(f'HCCL allreduce: Unsupported data type {name}')


@pytest.fixture
def hccl(monkeypatch):
    """An initialised process group whose all_reduce follows HCCL: it refuses the dtypes HCCL refuses,
    and a SUM comes back as if HCCL_PEERS ranks had contributed the same tensor (MIN/MAX unchanged)."""
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    real_all_reduce = dist.all_reduce

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        _hccl_dtype_check(tensor)
        work = real_all_reduce(tensor, op=op, group=group, async_op=async_op)
        if op == dist.ReduceOp.SUM:
            tensor.mul_(HCCL_PEERS)
        return work

    monkeypatch.setattr(dist, 'all_reduce', all_reduce)
    try:
        yield HCCL_PEERS
    finally:
        if dist.is_initialized():  # main.main destroys it itself at exit
            compat.destroy_process_group()  # torch's own can deadlock after a collective before torch 2.8


def _contiguous_formats_only(real_to):
    def to(self, *args, **kwargs):
        memory_format = kwargs.get('memory_format', torch.preserve_format)
        if memory_format not in (torch.contiguous_format, torch.preserve_format):
            raise RuntimeError(f'NPU Tensor.to supports only contiguous_format and preserve_format, got {memory_format}')
        return real_to(self, *args, **kwargs)
    return to


@pytest.fixture
def npu(monkeypatch, fake_torch_npu, hccl):
    """Every device decision taken as on an NPU, for CPU tensors: the 'cpu' entry of DEVICE_KINDS is
    the NPU's, torch_npu and HCCL are the stand-ins above, and Tensor.to refuses channels_last."""
    monkeypatch.setitem(device_module.DEVICE_KINDS, 'cpu', device_module.DEVICE_KINDS['npu'])
    monkeypatch.setattr(torch.Tensor, 'to', _contiguous_formats_only(torch.Tensor.to))
    monkeypatch.setattr(torch.Tensor, 'pin_memory', _npu_pinning(torch.Tensor.pin_memory))
    return fake_torch_npu


def _npu_pinning(real_pin_memory):
    """torch_npu registers 'npu' as a device name, so DataLoader's pin_memory_device='npu' (torch < 2.9 passes it
    to Tensor.pin_memory) pins host memory for the NPU; without an NPU the stand-in leaves the CPU tensor as is."""
    def pin_memory(self, device=None):
        if device is not None and str(device).split(':')[0] == 'npu':
            return self
        return real_pin_memory(self) if device is None else real_pin_memory(self, device)
    return pin_memory


class ApexNpuFusedAdamW(torch.optim.AdamW):
    """apex.optimizers.NpuFusedAdamW: only runs after amp.initialize."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        self.is_npu_fused_optimizer = True
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=False)

    @torch.no_grad()
    def step(self, closure=None):
        if not hasattr(self, '_amp_stash'):
            raise RuntimeError('apex.optimizers.NpuFusedAdamW should be used with AMP.')
        return super().step(closure)


@pytest.fixture
def fake_apex(monkeypatch):
    """A stand-in `apex` package with the amp API main.py uses; records how it was called."""
    calls = {}
    apex = types.ModuleType('apex')
    amp = types.ModuleType('apex.amp')
    optimizers = _module('apex.optimizers', NpuFusedAdamW=ApexNpuFusedAdamW)

    def initialize(model, optimizer, opt_level='O1', loss_scale=None, combine_grad=None, **kwargs):
        if hasattr(optimizer, '_amp_stash'):
            raise RuntimeError('A given optimizer should only be passed through amp.initialize once.')
        calls['initialize'] = dict(opt_level=opt_level, loss_scale=loss_scale, **kwargs)
        if combine_grad is not None:
            calls['initialize']['combine_grad'] = combine_grad
        apex_fused = getattr(optimizer, 'is_npu_fused_optimizer', False) is True
        if combine_grad and getattr(optimizer, 'is_fused_optimizer', False) and not apex_fused:
            raise AssertionError("stand-in: torch_npu's fused optimizer under combine_grad=True; real apex would "
                                 'unscale a stale combined gradient buffer (silent accuracy error)')
        optimizer._amp_stash = types.SimpleNamespace()
        if combine_grad or apex_fused:
            def zero_grad(self):  # new_zero_grad_accelerate_no_master_weights: no arguments
                for group in self.param_groups:
                    for param in group['params']:
                        if param.grad is not None:
                            param.grad.zero_()
            optimizer.zero_grad = types.MethodType(zero_grad, optimizer)
        return model, optimizer

    @contextlib.contextmanager
    def scale_loss(loss, optimizer):
        calls['scaled'] = calls.get('scaled', 0) + 1
        yield loss * 8.0  # a real loss scale: gradients come out 8x larger than the loss's

    amp.initialize = initialize
    amp.scale_loss = scale_loss
    amp.master_params = lambda optimizer: [p for g in optimizer.param_groups for p in g['params']]
    amp.state_dict = lambda: {'loss_scaler0': {'loss_scale': 8.0}}
    amp.load_state_dict = lambda state: calls.setdefault('loaded', state)
    apex.amp = amp
    apex.optimizers = optimizers
    monkeypatch.setitem(sys.modules, 'apex', apex)
    monkeypatch.setitem(sys.modules, 'apex.amp', amp)
    monkeypatch.setitem(sys.modules, 'apex.optimizers', optimizers)
    return calls

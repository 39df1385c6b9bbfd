"""models/compat.py: the version gates say what an older stack lacks and how to fix it."""
import sys
import types

import pytest
import torch
from torch.torch_version import TorchVersion

from models import compat


def test_the_installed_stack_works():
    assert compat.stack_problems() == []
    assert 'torch ' + torch.__version__ in compat.describe()


def test_numpy_2_with_a_torch_built_for_numpy_1_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(compat, 'TORCH', TorchVersion('2.1.2'))
    monkeypatch.setitem(sys.modules, 'numpy', types.SimpleNamespace(__version__='2.0.2'))
    assert any('NumPy 2.0.2' in p and 'pip install "numpy<2"' in p for p in compat.stack_problems())
    monkeypatch.setattr(compat, 'TORCH', TorchVersion('2.3.1'))  # the first torch built against NumPy 2
    assert compat.stack_problems() == []


def test_a_timm_without_the_optimizer_registry_is_named_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm', types.SimpleNamespace(__version__='1.0.9'))
    assert compat.stack_problems() == ['timm 1.0.9 is older than 1.0.12: pip install "timm>=1.0.12,<1.1"']


def test_an_unworkable_stack_stops_with_error_lines_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(compat, 'stack_problems', lambda: ['first problem', 'second problem'])
    with pytest.raises(SystemExit) as stopped:
        compat.require_working_stack()
    assert stopped.value.code == 2
    assert capsys.readouterr().err == 'error: first problem\nerror: second problem\n'


def test_gates_follow_the_torch_release(monkeypatch):
    monkeypatch.setattr(compat, 'TORCH', TorchVersion('2.1.2'))
    assert compat.onnx_export_kwargs() == {}
    assert 'torch >= 2.4' in compat.custom_ops_reason()
    assert not compat.dataloader_pins_for_current_accelerator()
    with pytest.raises(compat.UnsupportedError, match='--amp-dtype bfloat16'):
        compat.grad_scaler('cpu')
    monkeypatch.setattr(compat, 'TORCH', TorchVersion('2.9.0'))
    assert compat.onnx_export_kwargs() == {'dynamo': False}
    assert compat.custom_ops_reason() == '' and compat.cpu_float16_reason() == ''
    assert compat.dataloader_pins_for_current_accelerator()


def test_autocast_state_and_dispatch_mode_are_read_on_every_release():
    assert not compat.autocast_enabled('cpu') and not compat.in_dispatch_mode() and not compat.is_compiling()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert compat.autocast_enabled('cpu') and compat.autocast_dtype('cpu') == torch.bfloat16
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):
        assert compat.in_dispatch_mode()


def test_custom_fwd_bwd_replay_the_forwards_autocast_state_in_backward():
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        @compat.custom_fwd('cpu')
        def forward(ctx, x):
            return x * 2

        @staticmethod
        @compat.custom_bwd('cpu')
        def backward(ctx, grad):
            seen['autocast'] = (compat.autocast_enabled('cpu'), compat.autocast_dtype('cpu'))
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = Probe.apply(x)
    y.sum().backward()  # outside autocast: the backward still runs under the forward's state
    assert seen['autocast'] == (True, torch.bfloat16)

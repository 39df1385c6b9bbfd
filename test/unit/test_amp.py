"""AMP: bfloat16 autocast on CPU, apex vs native selection (apex faked), one training code path."""
import logging
import sys
import types

import pytest
import torch
from torch.torch_version import TorchVersion

from models import compat
from utils import amp as amp_module
from utils.amp import create_precision, resolve_amp_backend
from utils.errors import AmpError
from utils.device import DistEnv
from utils.engine import TrainSettings, TrainingParts, train_one_epoch


needs_cpu_grad_scaler = pytest.mark.skipif(bool(compat.cpu_float16_reason()), reason=compat.cpu_float16_reason())

# torch.device('npu') only exists once torch_npu is imported; create_precision only reads .type.
NPU = types.SimpleNamespace(type='npu')


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def tiny_loader(steps=3, batch=4):
    torch.manual_seed(1)
    data = [(torch.randn(batch, 3, 8, 8), torch.randint(0, 3, (batch,))) for _ in range(steps)]

    class Loader(list):
        batch_size = batch
    return Loader(data)


def test_cpu_amp_is_bfloat16_autocast_without_scaler():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, torch.device('cpu'), enabled=True)
    assert precision.backend == 'native' and precision.dtype == torch.bfloat16
    assert precision.checkpoint_key is None and precision.state_dict() is None
    with precision.autocast():
        out = model(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.bfloat16


def test_bfloat16_training_loop_updates_weights_and_logs(caplog):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, precision = create_precision(model, optimizer, torch.device('cpu'), enabled=True)
    before = model[-1].weight.detach().clone()
    logger = logging.getLogger('test-amp')
    with caplog.at_level(logging.INFO, logger='test-amp'):
        parts = TrainingParts(model, tiny_loader(), torch.nn.CrossEntropyLoss(), optimizer, precision)
        stats = train_one_epoch(parts, TrainSettings(log_interval=2), 0, DistEnv(torch.device('cpu')), logger)
    assert not torch.equal(before, model[-1].weight)
    assert model[-1].weight.dtype == torch.float32  # autocast keeps fp32 master weights
    assert stats['num_updates'] == 3 and stats['loss'] > 0
    assert 'Train: 0 [   2/   3' in caplog.text and 'Train: 0 [   3/   3' in caplog.text
    assert 'Epoch 0 FPS:' in caplog.text


@needs_cpu_grad_scaler
def test_float16_native_uses_a_grad_scaler_saved_as_amp_scaler():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, torch.device('cpu'), enabled=True,
                                       amp_dtype='float16', loss_scale=1024.0)
    assert precision.dtype == torch.float16 and precision.checkpoint_key == 'amp_scaler'
    assert precision.state_dict()['scale'] == 1024.0
    before = model[-1].weight.detach().clone()
    with precision.autocast():
        overflowing = model(torch.randn(2, 3, 8, 8)).float().sum() * float('inf')
    precision.backward_step(overflowing, optimizer)
    assert torch.equal(before, model[-1].weight), 'an overflowing step must be skipped'
    assert precision.state_dict()['scale'] == 1024.0, 'a fixed --loss-scale must not back off'


@needs_cpu_grad_scaler
def test_dynamic_loss_scale_backs_off_on_overflow():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, torch.device('cpu'), enabled=True, amp_dtype='float16')
    start = precision.state_dict()['scale']
    with precision.autocast():
        overflowing = model(torch.randn(2, 3, 8, 8)).float().sum() * float('inf')
    precision.backward_step(overflowing, optimizer)
    assert precision.state_dict()['scale'] < start


def test_cpu_float16_before_torch_2_3_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(compat, 'TORCH', TorchVersion('2.1.2'))
    model = tiny_model()
    with pytest.raises(AmpError, match='needs torch >= 2.3.*--amp-dtype bfloat16'):
        create_precision(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device('cpu'), enabled=True,
                         amp_dtype='float16')
    # bfloat16, the CPU default, needs no scaler and runs there.
    assert create_precision(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device('cpu'),
                            enabled=True)[2].dtype == torch.bfloat16


def test_without_amp_the_same_object_runs_fp32():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, torch.device('cpu'), enabled=False)
    assert precision.backend == 'none'
    with precision.autocast():
        assert model(torch.randn(2, 3, 8, 8)).dtype == torch.float32


@pytest.mark.parametrize('requested, device, apex_present, expected', [
    ('auto', 'npu', True, 'apex'),
    ('auto', 'npu', False, 'native'),
    ('auto', 'cuda', True, 'native'),
    ('auto', 'cpu', True, 'native'),
    ('apex', 'cuda', True, 'apex'),
    ('native', 'npu', True, 'native'),
])
def test_backend_selection(requested, device, apex_present, expected):
    assert resolve_amp_backend(requested, device, apex_present) == expected


@pytest.mark.parametrize('device, apex_present', [('cuda', False), ('cpu', True)])
def test_asking_for_apex_where_it_cannot_run_is_a_clear_error(device, apex_present):
    with pytest.raises(AmpError, match='apex'):
        resolve_amp_backend('apex', device, apex_present)


def test_real_apex_absent_here_or_without_amp(monkeypatch):
    # NVIDIA's current apex (no amp) and the unrelated PyPI 'apex' count as absent.
    monkeypatch.setitem(sys.modules, 'apex', types.ModuleType('apex'))
    monkeypatch.setitem(sys.modules, 'apex.amp', None)
    assert amp_module.find_apex_amp() is None


def test_fake_apex_on_npu_is_initialised_with_combine_grad_and_drives_the_step(fake_apex):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, precision = create_precision(model, optimizer, NPU, enabled=True,
                                                   backend='auto', opt_level='O1', loss_scale='dynamic')
    assert precision.backend == 'apex' and precision.checkpoint_key == 'amp'
    assert fake_apex['initialize'] == dict(opt_level='O1', loss_scale='dynamic', combine_grad=True)
    before = model[-1].weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0]))
    precision.backward_step(loss, optimizer, clip_grad=1.0, parameters=model.parameters())
    assert fake_apex['scaled'] == 1 and not torch.equal(before, model[-1].weight)
    assert precision.state_dict() == {'loss_scaler0': {'loss_scale': 8.0}}
    precision.load_state_dict({'x': 1})
    assert fake_apex['loaded'] == {'x': 1}


def test_fake_apex_on_gpu_when_asked_o2_without_combine_grad(fake_apex):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    create_precision(model, optimizer, torch.device('cuda'), enabled=True, backend='apex', opt_level='O2',
                     loss_scale=128.0)
    assert fake_apex['initialize'] == dict(opt_level='O2', loss_scale=128.0)


def test_fake_apex_present_but_native_asked_uses_autocast(fake_apex):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, torch.device('cpu'), enabled=True, backend='native')
    assert precision.backend == 'native' and 'initialize' not in fake_apex


def test_o2_with_native_autocast_is_refused():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(AmpError, match='O2'):
        create_precision(model, optimizer, torch.device('cpu'), enabled=True, opt_level='O2')

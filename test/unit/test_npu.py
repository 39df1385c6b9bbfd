"""The NPU path through the torch_npu / HCCL / apex stand-ins (test/unit/npu_fakes.py).

The training step, evaluation, checkpointing and main.py run on CPU tensors while each device decision
is the NPU's (fixture `npu`), so every rule the stand-ins enforce is met by the real code path.
"""
import functools
import logging
import types

import pytest
import torch

import main
from models import compat
from npu_fakes import ApexNpuFusedAdamW, HCCL_PEERS, NpuFusedAdamW, NpuGradScaler
from utils import device as device_module
from utils.amp import amp_backend_for, create_precision
from utils.errors import AmpError
from utils.checkpoint import RunCheckpoints, read_training_checkpoint, training_state
from utils.resume import restore_training
from utils.data import build_loaders
from utils.device import DistEnv, check_memory_format, pin_memory_settings
from utils.engine import TrainSettings, TrainingParts, evaluate, fit, train_one_epoch
from utils.optim import create_optimizer, create_scheduler

CPU = torch.device('cpu')
# Decisions only read .type: the NPU without its tensors (torch.device('npu') needs torch_npu).
NPU = types.SimpleNamespace(type='npu')
LOGGER = logging.getLogger('test-npu')
TWO_RANKS = DistEnv(CPU, rank=0, world_size=HCCL_PEERS)


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


class Loader(list):
    batch_size = 4


def batches(steps=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Loader((torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
                  for _ in range(steps))


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def changed(before, model):
    return all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --- the stand-ins refuse what the real packages refuse ---------------------------------------------

def test_stand_ins_enforce_the_documented_rules(npu, fake_apex):
    model = tiny_model()
    with pytest.raises(ValueError, match='set_to_none is not supported in fused optimizers'):
        NpuFusedAdamW(model.parameters()).zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match='should be used with AMP'):
        ApexNpuFusedAdamW(model.parameters()).step()
    with pytest.raises(RuntimeError, match='HCCL allreduce: Unsupported data type fp64'):
        torch.distributed.all_reduce(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match='contiguous_format and preserve_format'):
        torch.zeros(1, 3, 2, 2).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    import apex.amp
    apex.amp.initialize(model, optimizer, opt_level='O1', combine_grad=True)
    with pytest.raises(TypeError):
        optimizer.zero_grad(set_to_none=True)
    with pytest.raises(KeyError, match='dynamic'):
        NpuGradScaler().load_state_dict({'scale': 8.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                                         'growth_interval': 2000, '_growth_tracker': 0})


# torch_npu's scaler stands in on torch's CPU GradScaler, which torch < 2.3 lacks.
needs_cpu_grad_scaler = pytest.mark.skipif(bool(compat.cpu_float16_reason()), reason=compat.cpu_float16_reason())


# --- 1. the zero_grad call each optimizer supports ------------------------------------------------

def test_training_step_runs_with_torch_npus_fused_optimizer(hccl):
    model = tiny_model()
    optimizer = NpuFusedAdamW(model.parameters(), lr=0.01)
    _, _, precision = create_precision(model, optimizer, CPU, enabled=False)
    before = weights(model)
    stats = train_one_epoch(TrainingParts(model, batches(), torch.nn.CrossEntropyLoss(), optimizer, precision),
                            TrainSettings(log_interval=2), 0, TWO_RANKS, LOGGER)
    assert stats['num_updates'] == 3 and changed(before, model)


def test_training_step_runs_with_apex_combined_gradients(fake_apex):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, precision = create_precision(model, optimizer, NPU, enabled=True)
    assert fake_apex['initialize']['combine_grad'] is True
    before = weights(model)
    stats = train_one_epoch(TrainingParts(model, batches(), torch.nn.CrossEntropyLoss(), optimizer, precision),
                            TrainSettings(log_interval=2), 0, DistEnv(CPU), LOGGER)
    assert stats['num_updates'] == 3 and changed(before, model)


# --- 2. each fused optimizer with its own AMP stack -----------------------------------------------

@pytest.mark.parametrize('amp_backend, expected', [
    ('apex', ApexNpuFusedAdamW), ('native', NpuFusedAdamW), ('none', NpuFusedAdamW)])
def test_the_fused_adamw_matches_the_amp_backend(fake_torch_npu, fake_apex, amp_backend, expected):
    optimizer = create_optimizer(tiny_model(), NPU, 'adamw', amp_backend=amp_backend)
    assert type(optimizer) is expected
    assert {g['weight_decay'] for g in optimizer.param_groups} == {0.05, 0.0}  # no decay on biases


def test_apex_fused_adamw_is_not_chosen_without_apex_amp(fake_apex):
    # Only Ascend's apex installed (no torch_npu optimizer): fp32 and native AMP get torch's AdamW.
    for amp_backend in ('none', 'native'):
        assert type(create_optimizer(tiny_model(), NPU, 'adamw', amp_backend=amp_backend)) is torch.optim.AdamW


def test_auto_amp_on_npu_pairs_apex_with_apex_fused_adamw_and_trains(npu, fake_apex):
    model = tiny_model()
    backend = amp_backend_for(True, 'auto', CPU)
    optimizer = create_optimizer(model, CPU, 'adamw', lr=0.01, amp_backend=backend)
    model, optimizer, precision = create_precision(model, optimizer, CPU, enabled=True)
    assert backend == 'apex' and precision.backend == 'apex' and type(optimizer) is ApexNpuFusedAdamW
    before = weights(model)
    train_one_epoch(TrainingParts(model, batches(), torch.nn.CrossEntropyLoss(), optimizer, precision),
                    TrainSettings(), 0, TWO_RANKS, LOGGER)
    assert changed(before, model)


def test_torch_npus_fused_optimizer_is_never_handed_to_apex_combine_grad(fake_torch_npu, fake_apex):
    model = tiny_model()
    with pytest.raises(AmpError, match="torch_npu's NpuFusedAdamW cannot go through apex"):
        create_precision(model, NpuFusedAdamW(model.parameters()), NPU, enabled=True)
    assert 'initialize' not in fake_apex


@pytest.mark.parametrize('enabled, backend', [(False, 'auto'), (True, 'native')])
def test_apex_fused_adamw_without_apex_amp_is_refused(fake_apex, enabled, backend):
    model = tiny_model()
    with pytest.raises(AmpError, match="apex's ApexNpuFusedAdamW only runs under apex"):
        create_precision(model, ApexNpuFusedAdamW(model.parameters()), NPU, enabled=enabled, backend=backend)


# --- 3. distributed evaluation reduces only what HCCL reduces -------------------------------------

def test_distributed_evaluation_reduces_int64_counts_and_float32_sums(hccl):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 7)
    loader = batches(5)
    alone = evaluate(model, loader, CPU, DistEnv(CPU), LOGGER)
    shared = evaluate(model, loader, CPU, TWO_RANKS, LOGGER)
    # Both stand-in ranks evaluated the same images: twice the images, the same averages.
    assert shared['images'] == HCCL_PEERS * alone['images'] == HCCL_PEERS * 20
    assert shared['top1'] == alone['top1'] and shared['top5'] == alone['top5']
    assert shared['loss'] == pytest.approx(alone['loss'], rel=1e-6)


# --- 4. torch_npu's loss scaler, kept in checkpoints ----------------------------------------------

def test_native_float16_amp_on_npu_uses_torch_npus_scaler(fake_torch_npu):
    model = tiny_model()
    _, _, precision = create_precision(model, torch.optim.SGD(model.parameters(), lr=0.1), NPU, enabled=True)
    assert precision.dtype == torch.float16 and isinstance(precision._scaler, NpuGradScaler)
    assert precision.state_dict()['dynamic'] is True


@needs_cpu_grad_scaler
def test_fixed_loss_scale_on_npu_skips_overflowing_steps_and_keeps_the_scale(fake_torch_npu):
    # torch_npu's scaler with dynamic=False would step on overflow: the fixed scale must stay dynamic.
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, NPU, enabled=True, loss_scale=1024.0)
    before = weights(model)
    overflowing = model(torch.randn(2, 6)).sum() * float('inf')
    precision.backward_step(overflowing, optimizer)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert precision.state_dict()['scale'] == 1024.0


class Points(torch.utils.data.Dataset):
    """24 random 6-d points of 3 classes, as the Samples build_loaders' collate expects."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(24, 6, generator=generator), torch.randint(0, 3, (24,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        from utils.images import Sample
        _, index = index if isinstance(index, tuple) else (None, index)  # training order tags (epoch, index)
        return Sample(self.x[index], self.y[index])


def _npu_training(loss_scale='dynamic'):
    model = tiny_model()
    optimizer = create_optimizer(model, CPU, 'adamw', lr=0.01, amp_backend=amp_backend_for(True, 'auto', CPU))
    model, optimizer, precision = create_precision(model, optimizer, CPU, enabled=True, loss_scale=loss_scale)
    scheduler, epochs = create_scheduler(optimizer, epochs=1, cooldown_epochs=0, warmup_epochs=0)
    return model, optimizer, precision, scheduler, epochs


@needs_cpu_grad_scaler
def test_fit_on_npu_saves_and_restores_torch_npus_scaler_state(npu, tmp_path):
    model, optimizer, precision, scheduler, epochs = _npu_training()
    assert type(optimizer) is NpuFusedAdamW and isinstance(precision._scaler, NpuGradScaler)
    pin_memory, pin_memory_device = pin_memory_settings(CPU, False)
    train_loader, val_loader = build_loaders(Points(), Points(), 4, 8, 0, 0, HCCL_PEERS, 0, pin_memory,
                                             pin_memory_device)
    saver = RunCheckpoints(str(tmp_path), 1)
    state = functools.partial(training_state, model, optimizer, scheduler, precision, None, 'mlp', {}, {})
    parts = TrainingParts(model, train_loader, torch.nn.CrossEntropyLoss(), optimizer, precision, scheduler,
                          val_loader, saver=saver, training_state=state)
    fit(parts, TrainSettings(epochs=epochs), TWO_RANKS, LOGGER, str(tmp_path))
    checkpoint = read_training_checkpoint(str(tmp_path / 'last.pth.tar'))
    saved = checkpoint['amp_scaler']
    assert saved['dynamic'] is True and saved['scale'] == precision.state_dict()['scale']

    resumed_model, resumed_optimizer, resumed_precision, resumed_scheduler, _ = _npu_training()
    restore_training(checkpoint, 'last.pth.tar', TrainingParts(resumed_model, None, None, resumed_optimizer,
                                                               resumed_precision, resumed_scheduler), {}, LOGGER)
    assert resumed_precision.state_dict() == precision.state_dict()


@needs_cpu_grad_scaler
def test_a_scaler_state_without_dynamic_still_resumes_on_npu(fake_torch_npu):
    # Written by torch.amp.GradScaler('npu') (before this fix) or on a GPU.
    model = tiny_model()
    _, _, precision = create_precision(model, torch.optim.SGD(model.parameters(), lr=0.1), NPU, enabled=True)
    old = compat.grad_scaler('cpu', init_scale=512.0).state_dict()
    precision.load_state_dict(old)
    assert precision.state_dict()['scale'] == 512.0 and precision.state_dict()['dynamic'] is True


# --- 6, 7. pinned batches, no channels_last -------------------------------------------------------

def test_npu_pins_batches_and_names_the_device_where_torch_needs_it(npu, monkeypatch):
    assert pin_memory_settings(NPU, False)[0] is True
    monkeypatch.setattr(compat, 'dataloader_pins_for_current_accelerator', lambda: False)
    assert pin_memory_settings(NPU, False) == (True, 'npu')
    _, val_loader = build_loaders(None, Points(), 4, 8, 0, 0, 1, 0, True, 'npu')
    assert val_loader.pin_memory and val_loader.pin_memory_device == 'npu'
    monkeypatch.setattr(compat, 'dataloader_pins_for_current_accelerator', lambda: True)
    assert pin_memory_settings(NPU, False) == (True, '')  # newer torch pins for the current accelerator


def test_cpu_and_gpu_keep_pinning_off_unless_asked():
    for device in (CPU, types.SimpleNamespace(type='cuda')):
        assert pin_memory_settings(device, False) == (False, '')
        assert pin_memory_settings(device, True) == (True, '')


def test_channels_last_is_refused_on_npu_only():
    with pytest.raises(device_module.DeviceError, match='--channels-last'):
        check_memory_format(NPU, True)
    check_memory_format(NPU, False)
    for device_type in ('cpu', 'cuda'):
        check_memory_format(types.SimpleNamespace(type=device_type), True)


# --- main.py through the stand-ins ----------------------------------------------------------------

SMALL = ['--img-size', '32', '-b', '4', '-j', '0', '--epochs', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0',
         '--max-steps-per-epoch', '1', '--mixup', '0', '--cutmix', '0', '--device', 'cpu']


def test_main_on_npu_refuses_channels_last_before_creating_anything(npu, shapes_dataset, tmp_path, capsys):
    code = main.main(['--data_path', str(shapes_dataset), *SMALL, '--channels-last', '--output', str(tmp_path)])
    assert code == 2
    assert '--channels-last' in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_main_on_npu_trains_with_apex_its_fused_adamw_and_pinned_batches(npu, fake_apex, shapes_dataset, tmp_path,
                                                                        capsys, monkeypatch):
    loaders = []

    def recording_build_loaders(*args):
        loaders.append(build_loaders(*args))
        return loaders[-1]
    monkeypatch.setattr(main, 'build_loaders', recording_build_loaders)
    code = main.main(['--data_path', str(shapes_dataset), *SMALL, '--amp', '--output', str(tmp_path),
                      '--experiment', 'npu'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'Precision(backend=apex, dtype=torch.float16, no scaler), optimizer ApexNpuFusedAdamW' in out
    assert fake_apex['initialize']['combine_grad'] is True and fake_apex['scaled'] == 1
    assert all(loader.pin_memory for loader in loaders[0])  # without --pin-mem
    checkpoint = read_training_checkpoint(str(tmp_path / 'npu' / 'last.pth.tar'))
    assert checkpoint['amp'] == {'loss_scaler0': {'loss_scale': 8.0}}

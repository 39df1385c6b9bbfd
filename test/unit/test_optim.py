"""Optimizer groups, the learning rate per global batch and the reference learning-rate schedule."""
import math

import pytest
import torch

import models  # noqa: F401
import timm
from utils import optim as optim_module
from utils.optim import create_optimizer, create_scheduler, effective_lr


def reference_lr(epoch, base=1e-3, epochs=300, warmup=5, warmup_lr=1e-6, min_lr=1e-6):
    """The reference's schedule (timm 0.4.12 CosineLRScheduler, warmup not prefixed, cooldown at min_lr)."""
    if epoch < warmup:
        return warmup_lr + epoch * (base - warmup_lr) / warmup
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def test_no_weight_decay_on_biases_and_1d_parameters():
    model = timm.create_model('van_b0', num_classes=4)
    optimizer = create_optimizer(model, torch.device('cpu'))
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0.05 for p in g['params']}
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0.0 for p in g['params']}
    for name, param in model.named_parameters():
        expected_no_decay = param.ndim <= 1 or name.endswith('.bias')
        assert (id(param) in no_decay) == expected_no_decay, name
        assert (id(param) in decay) != expected_no_decay, name
    assert all(g['lr'] == 1e-3 for g in optimizer.param_groups)


def test_cuda_adamw_is_fused(monkeypatch):
    captured = {}
    monkeypatch.setattr(optim_module, 'create_optimizer_v2', lambda model, **kw: captured.update(kw))
    create_optimizer(torch.nn.Linear(2, 2), torch.device('cuda'))
    assert captured['fused'] is True and captured['opt'] == 'adamw'
    captured.clear()
    create_optimizer(torch.nn.Linear(2, 2), torch.device('cpu'), opt='sgd')
    assert 'fused' not in captured and captured['opt'] == 'sgd'


def test_schedule_matches_the_reference_per_epoch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler, total = create_scheduler(optimizer)
    assert total == 310
    assert optimizer.param_groups[0]['lr'] == pytest.approx(1e-6)  # epoch 0 starts at the warmup lr
    for epoch in range(1, total):
        scheduler.step(epoch)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(reference_lr(epoch), rel=1e-9, abs=1e-12), epoch
        scheduler.step_update(epoch * 100)  # per-step calls do nothing in per-epoch mode
        assert optimizer.param_groups[0]['lr'] == pytest.approx(reference_lr(epoch), rel=1e-9, abs=1e-12), epoch


def test_schedule_per_update_option():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler, total = create_scheduler(optimizer, epochs=20, warmup_epochs=2, cooldown_epochs=1,
                                        step_per_update=True, updates_per_epoch=10)
    assert total == 21
    scheduler.step_update(5)  # half-way through the first warmup epoch
    assert optimizer.param_groups[0]['lr'] == pytest.approx(reference_lr(0.5, epochs=20, warmup=2))
    scheduler.step_update(100)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(reference_lr(10, epochs=20, warmup=2))


@pytest.mark.parametrize('processes, batch, expected', [(1, 128, 1.25e-4), (2, 128, 2.5e-4), (8, 128, 1e-3),
                                                        (16, 128, 2e-3), (8, 32, 2.5e-4)])
def test_lr_scales_linearly_with_the_global_batch(processes, batch, expected):
    assert effective_lr(None, processes * batch) == pytest.approx(expected, rel=1e-12)
    assert effective_lr(None, 8 * 128) == 1e-3  # exactly the reference's value at its 8 x 128


def test_lr_sqrt_scaling_and_explicit_lr():
    assert effective_lr(None, 256, lr_base_scale='sqrt') == pytest.approx(1e-3 * 0.5)
    assert effective_lr(None, 4096, lr_base=2e-3, lr_base_size=1024, lr_base_scale='sqrt') == pytest.approx(4e-3)
    assert effective_lr(5e-4, 128) == 5e-4 and effective_lr(5e-4, 1 << 20, lr_base_scale='sqrt') == 5e-4
    with pytest.raises(ValueError, match='linear, sqrt'):
        effective_lr(None, 128, lr_base_scale='log')
    with pytest.raises(ValueError, match='must be positive'):
        effective_lr(None, 128, lr_base_size=0)

"""Checkpoints: atomic writes, best-N history, safe reading, choosing the checkpoint to resume."""
import os
import pickle
import re

import pytest
import torch

from utils.errors import CheckpointError, CheckpointWriteError
from utils.checkpoint import (RunCheckpoints, atomic_save, find_resume_checkpoint, read_file,
                              read_training_checkpoint)


def state(value=0.0):
    return dict(arch='van_b0', state_dict={'w': torch.full((2,), value)}, optimizer={'state': {}, 'param_groups': []},
                version=2, args={'lr': 1e-3}, class_to_idx={'a': 0})


def test_atomic_save_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'x.pth.tar'
    atomic_save({'a': torch.ones(3)}, str(path))
    atomic_save({'a': torch.zeros(3)}, str(path))
    assert torch.equal(read_file(str(path))['a'], torch.zeros(3))
    assert os.listdir(tmp_path) == ['x.pth.tar']


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth.tar'
    atomic_save({'epoch': 1}, str(path))

    def crash(*args, **kwargs):
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(CheckpointWriteError, match='disk full'):
        atomic_save({'epoch': 2}, str(path))
    assert read_file(str(path)) == {'epoch': 1}


def test_saver_keeps_the_best_n_epochs_last_and_best(tmp_path):
    saver = RunCheckpoints(str(tmp_path), max_history=2)
    for epoch, metric in enumerate([10.0, 30.0, 20.0, 5.0, 40.0]):
        best = saver.save(state(epoch), epoch, metric)
    assert best == (40.0, 4)
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*')) == ['checkpoint-1.pth.tar', 'checkpoint-4.pth.tar']
    last = read_training_checkpoint(str(tmp_path / 'last.pth.tar'))
    assert last['epoch'] == 4 and last['metric'] == 40.0 and last['best_epoch'] == 4
    assert read_file(str(tmp_path / 'model_best.pth.tar'))['epoch'] == 4
    # A saver rebuilt from the checkpoint (as --resume does) continues the same bookkeeping.
    resumed = RunCheckpoints(str(tmp_path), 2, history=last['checkpoint_history'],
                              best=(last['best_metric'], last['best_epoch']))
    assert resumed.save(state(), 5, 35.0) == (40.0, 4)
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*')) == ['checkpoint-4.pth.tar', 'checkpoint-5.pth.tar']


def test_checkpoint_hist_zero_writes_no_history(tmp_path):
    RunCheckpoints(str(tmp_path), max_history=0).save(state(), 0, 1.0)
    assert not list(tmp_path.glob('checkpoint-*')) and (tmp_path / 'last.pth.tar').exists()


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    saver = RunCheckpoints(str(tmp_path), max_history=5)
    for epoch in range(3):
        saver.save(state(epoch), epoch, float(epoch))
    (tmp_path / 'last.pth.tar').write_bytes(b'truncated')  # a crash mid-copy outside our atomic writes
    (tmp_path / 'checkpoint-9.pth.tar.tmp1').write_bytes(b'partial')
    path, checkpoint = find_resume_checkpoint(str(tmp_path))
    assert checkpoint['epoch'] == 2 and not path.endswith('last.pth.tar')
    assert find_resume_checkpoint(str(tmp_path / 'empty')) is None


class Evil:
    def __reduce__(self):
        return (print, ('pwned',))


def test_files_needing_arbitrary_code_are_refused(tmp_path):
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'x': Evil()}, path)
    with pytest.raises(CheckpointError, match='evil.pth.tar'):
        read_file(str(path))


def test_reading_missing_or_foreign_files_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        read_file(str(tmp_path / 'nope.pth'))
    foreign = tmp_path / 'foreign.pth'
    foreign.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match='foreign.pth'):
        read_file(str(foreign))
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': {}}, weights)
    with pytest.raises(CheckpointError, match='--pretrained'):
        read_training_checkpoint(str(weights))


def test_saver_refuses_a_state_with_nan_or_inf_and_keeps_the_previous_files(tmp_path):
    from utils.errors import NonFiniteLossError
    saver = RunCheckpoints(str(tmp_path), max_history=5)
    saver.save(state(1.0), 0, 10.0)
    poisoned = dict(state(1.0), state_dict={'w': torch.ones(2), 'bn.running_var': torch.tensor([1.0, float('inf')])})
    with pytest.raises(NonFiniteLossError, match=r'not saving epoch 1: 1 tensors hold NaN or inf \(bn\.running_var\)'):
        saver.save(poisoned, 1, 99.0)  # a better metric must not make it the best either
    with_ema = dict(state(1.0), state_dict_ema={'w': torch.tensor([float('nan'), 0.0])})
    with pytest.raises(NonFiniteLossError, match='EMA w'):
        saver.save_recovery(with_ema, 1, {'epoch': 1, 'steps_done': 1})
    assert saver.best == (10.0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert read_training_checkpoint(str(tmp_path / 'last.pth.tar'))['epoch'] == 0


def _good_checkpoint():
    return dict(state(), epoch=3, scheduler={}, metric=50.0, best_metric=60.0, best_epoch=2,
                checkpoint_history=[[60.0, 2], [50.0, 3]])


@pytest.mark.parametrize('key, value, message', [
    ('epoch', '3', 'epoch should be an epoch number, not str'),
    ('epoch', 2.5, 'epoch should be an epoch number'),
    ('epoch', None, 'epoch is missing'),
    ('state_dict', [1, 2], 'state_dict should be a dict of weight tensors, not list'),
    ('state_dict', {'w': [1.0]}, 'state_dict should be a dict of weight tensors'),
    ('optimizer', 'adamw', "optimizer should be an optimizer state"),
    ('optimizer', {'state': {}, 'param_groups': 'all'}, 'optimizer should be an optimizer state'),
    ('scheduler', [1], 'scheduler should be a scheduler state dict'),
    ('class_to_idx', ['a', 'b'], 'class_to_idx should be a dict of class name: index'),
    ('best_metric', 'high', 'best_metric should be a number'),
    ('checkpoint_history', [[1.0]], 'checkpoint_history should be a list of [metric, epoch] pairs'),
    ('recovery', {'epoch': 1}, 'recovery should be a recovery record'),
    ('args', 'lr=0.1', 'args should be the options of the run'),
])
def test_checkpoint_with_the_right_keys_but_wrong_contents_is_refused_naming_the_key(tmp_path, key, value, message):
    path = tmp_path / 'last.pth.tar'
    torch.save(dict(_good_checkpoint(), **{key: value}), path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_training_checkpoint(str(path))


def test_resume_auto_refuses_a_run_dir_whose_checkpoints_are_all_unreadable(tmp_path):
    (tmp_path / 'last.pth.tar').write_bytes(b'truncated')
    torch.save(dict(_good_checkpoint(), epoch='1'), tmp_path / 'checkpoint-1.pth.tar')
    with pytest.raises(CheckpointError, match=r'no checkpoint in .* can be read.*left as they are.*last\.pth\.tar.*'
                                              r'checkpoint-1\.pth\.tar.*epoch should be'):
        find_resume_checkpoint(str(tmp_path))
    assert find_resume_checkpoint(str(tmp_path / 'empty')) is None  # no checkpoint at all: a new run


def _sgd_and_adamw_states():
    from timm.optim import create_optimizer_v2
    layer = torch.nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    states = {}
    for name in ('sgd', 'adamw'):
        optimizer = create_optimizer_v2(layer, name, lr=0.1)
        optimizer.step()
        states[name] = optimizer.state_dict()
    return layer, states


@pytest.mark.parametrize('saved, resumed', [('sgd', 'adamw'), ('adamw', 'sgd')])
def test_an_optimizer_state_of_another_optimizer_is_one_clear_error(saved, resumed):
    import logging
    from timm.optim import create_optimizer_v2
    from utils.amp import create_precision
    from utils.engine import TrainingParts
    from utils.resume import restore_training
    layer, states = _sgd_and_adamw_states()
    optimizer = create_optimizer_v2(layer, resumed, lr=0.1)
    _, _, precision = create_precision(layer, optimizer, torch.device('cpu'), enabled=False)
    checkpoint = dict(epoch=0, state_dict=layer.state_dict(), optimizer=states[saved], args={'opt': saved})
    with pytest.raises(CheckpointError, match=f'optimizer state in .* does not fit .*written with --opt {saved}'):
        restore_training(checkpoint, 'x.pth.tar', TrainingParts(layer, None, None, optimizer, precision), None,
                         logging.getLogger('test'))


def test_resuming_with_model_ema_from_a_checkpoint_without_one_starts_the_average_from_its_weights():
    import logging
    from timm.utils import ModelEmaV3
    from utils.amp import create_precision
    from utils.engine import TrainingParts
    from utils.resume import restore_training
    torch.manual_seed(0)
    saved = torch.nn.Linear(2, 2)
    model = torch.nn.Linear(2, 2)  # another initialisation
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, torch.device('cpu'), enabled=False)
    checkpoint = dict(epoch=0, state_dict=saved.state_dict(), optimizer=optimizer.state_dict())
    restore_training(checkpoint, 'x.pth.tar', TrainingParts(model, None, None, optimizer, precision, model_ema=ema),
                     None, logging.getLogger('test'))
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in saved.state_dict().items())

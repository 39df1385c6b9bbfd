"""The loops called directly: non-finite loss stops the run, evaluation counts and top-k."""
import logging

import pytest
import torch

from utils.amp import create_precision
from utils.device import DistEnv
from utils.engine import NonFiniteGuard, TrainSettings, TrainingParts, evaluate, train_one_epoch
from utils.errors import NonFiniteLossError

CPU = torch.device('cpu')
LOGGER = logging.getLogger('test-engine')


class Loader(list):
    batch_size = 4


def batches(steps, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Loader((torch.randn(4, 6, generator=generator), torch.randint(0, classes, (4,), generator=generator))
                  for _ in range(steps))


def test_a_loss_that_stays_nan_stops_the_run_with_a_clear_message():
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, CPU, enabled=False)

    def nan_loss(output, target):
        return torch.nn.functional.cross_entropy(output, target) * float('nan')
    with pytest.raises(NonFiniteLossError, match='loss is not finite at epoch 0 step 1'):
        train_one_epoch(TrainingParts(model, batches(6), nan_loss, optimizer, precision), TrainSettings(log_interval=2),
                        0, DistEnv(CPU), LOGGER)


def test_a_single_non_finite_step_does_not_stop_a_run_whose_scaler_skips_it():
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, CPU, enabled=False)
    calls = []

    def sometimes_inf(output, target):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(output, target)
        # Non-finite value in the first step only; adding a constant keeps the gradients finite.
        return loss + float('inf') if len(calls) == 1 else loss
    # Without a float16 scaler the run would stop here (issue 6); the scaler skips such steps.
    stats = train_one_epoch(TrainingParts(model, batches(4), sometimes_inf, optimizer, precision),
                            TrainSettings(log_interval=2, max_steps=3), 0, DistEnv(CPU), LOGGER,
                            nonfinite_guard=NonFiniteGuard(scaler_skips_steps=True))
    assert stats['num_updates'] == 3


def test_max_steps_caps_the_epoch_and_fps_is_reported(caplog):
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, precision = create_precision(model, optimizer, CPU, enabled=False)
    with caplog.at_level(logging.INFO, logger='test-engine'):
        stats = train_one_epoch(TrainingParts(model, batches(10), torch.nn.CrossEntropyLoss(), optimizer, precision),
                                TrainSettings(log_interval=3, max_steps=7), 4, DistEnv(CPU), LOGGER, num_updates=70)
    assert stats['num_updates'] == 77 and stats['fps'] > 0
    # The results file's losses are those of the log lines, in order.
    logged = [float(line.split('Loss: ')[1].split()[0]) for line in caplog.messages if line.startswith('Train')]
    assert [round(loss, 4) for loss in stats['logged_losses']] == logged
    assert [line.split(']')[0] for line in caplog.messages if line.startswith('Train')] == \
        ['Train: 4 [   3/   7 ( 43%)', 'Train: 4 [   6/   7 ( 86%)', 'Train: 4 [   7/   7 (100%)']
    assert f"Epoch 4 FPS:{stats['fps']:.2f}" in caplog.text


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 7)
    loader = batches(5, classes=7, seed=1)
    metrics = evaluate(model, loader, CPU, DistEnv(CPU), LOGGER, log_interval=2)
    images = torch.cat([x for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    with torch.no_grad():
        output = model(images)
    assert metrics['images'] == 20
    assert metrics['loss'] == pytest.approx(torch.nn.functional.cross_entropy(output, targets).item(), rel=1e-6)
    assert metrics['top1'] == pytest.approx(100 * (output.argmax(1) == targets).float().mean().item())
    top5 = output.topk(5, 1).indices.eq(targets[:, None]).any(1).float().mean().item()
    assert metrics['top5'] == pytest.approx(100 * top5)


def test_evaluate_with_fewer_than_five_classes_uses_all_of_them():
    metrics = evaluate(torch.nn.Linear(6, 3), batches(2), CPU, DistEnv(CPU), LOGGER)
    assert metrics['top5'] == 100.0


class Points(torch.utils.data.Dataset):
    """24 random 6-d points of 3 classes, as the Samples that build_loaders' collate expects."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(24, 6, generator=generator), torch.randint(0, 3, (24,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        from utils.images import Sample
        _, index = index if isinstance(index, tuple) else (None, index)  # training order tags (epoch, index)
        return Sample(self.x[index], self.y[index])


def _fit(run_dir, checkpoint=None, sigterm_at_step=None):
    """Two epochs of 6 steps with a per-step warmup and cosine schedule, from scratch or from `checkpoint`."""
    import functools
    import os
    import signal
    from utils.checkpoint import RunCheckpoints, training_state
    from utils.resume import ResumePoint, restore_training
    from utils.data import build_loaders
    from utils.engine import fit
    from utils.optim import create_scheduler

    run_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model, optimizer, precision = create_precision(model, optimizer, CPU, enabled=False)
    train_loader, val_loader = build_loaders(Points(), Points(), 4, 8, 0, 0, 1, seed=0, pin_memory=False)
    scheduler, epochs = create_scheduler(optimizer, epochs=2, cooldown_epochs=0, warmup_epochs=1, warmup_lr=0.01,
                                         min_lr=0.01, step_per_update=True, updates_per_epoch=len(train_loader))
    resume = ResumePoint()
    if checkpoint is not None:
        resume = restore_training(checkpoint, 'recovery.pth.tar',
                                  TrainingParts(model, None, None, optimizer, precision, scheduler), {}, LOGGER)
    steps = []

    def criterion(output, target):
        steps.append(1)
        if len(steps) == sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption arriving during this step
        return torch.nn.functional.cross_entropy(output, target)

    saver = RunCheckpoints(str(run_dir), 1, resume.history, resume.best)
    state = functools.partial(training_state, model, optimizer, scheduler, precision, None, 'linear', {}, {})
    parts = TrainingParts(model, train_loader, criterion, optimizer, precision, scheduler, val_loader, saver=saver,
                          training_state=state)
    best = fit(parts, TrainSettings(epochs=epochs), DistEnv(CPU), LOGGER, str(run_dir), resume)
    return best, model.state_dict()


def test_fit_stopped_by_sigterm_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    from utils.checkpoint import read_training_checkpoint
    from utils.resume import Preempted
    best, expected = _fit(tmp_path / 'full')
    assert best[1] in (0, 1) and (tmp_path / 'full' / 'last.pth.tar').exists()

    with pytest.raises(Preempted, match='stopped by SIGTERM in epoch 0 after step 2'):
        _fit(tmp_path / 'cut', sigterm_at_step=2)
    checkpoint = read_training_checkpoint(str(tmp_path / 'cut' / 'recovery.pth.tar'))
    assert checkpoint['recovery']['steps_done'] == 2 and checkpoint['epoch'] == -1
    # The learning rate changes every step: the resumed steps must continue both the data order and the schedule.
    _, resumed = _fit(tmp_path / 'cut', checkpoint=checkpoint)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert not (tmp_path / 'cut' / 'recovery.pth.tar').exists()  # superseded by the epoch checkpoints


def test_with_model_ema_the_ema_evaluation_picks_the_best_checkpoint(tmp_path, monkeypatch, caplog):
    """As the reference (timm 0.4 train.py) with --model-ema: the EMA weights' top-1 ranks the checkpoints,
    is the returned best and the summary's metric, and the checkpoints keep both weights."""
    import csv
    import functools
    from timm.utils import ModelEmaV3
    from utils import engine
    from utils.checkpoint import RunCheckpoints, read_training_checkpoint, training_state
    from utils.data import build_loaders
    from utils.optim import create_scheduler

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, precision = create_precision(model, optimizer, CPU, enabled=False)
    model_ema = ModelEmaV3(model, decay=0.5)
    train_loader, val_loader = build_loaders(Points(), Points(), 4, 8, 0, 0, 1, seed=0, pin_memory=False)
    scheduler, epochs = create_scheduler(optimizer, epochs=2, cooldown_epochs=0, warmup_epochs=0)
    # Scripted top-1 per epoch: the regular weights are best in epoch 0, the EMA weights in epoch 1.
    top1 = {model: [50.0, 40.0], model_ema.module: [10.0, 60.0]}
    evaluated = []

    def scripted_evaluate(evaluated_model, loader, **kwargs):
        epoch = sum(m is evaluated_model for m in evaluated)
        evaluated.append(evaluated_model)
        return dict(loss=1.0, top1=top1[evaluated_model][epoch], top5=100.0, images=24, skipped=0)
    monkeypatch.setattr(engine, 'evaluate', scripted_evaluate)

    saver = RunCheckpoints(str(tmp_path), max_history=1)
    state = functools.partial(training_state, model, optimizer, scheduler, precision, model_ema, 'linear', {}, {})
    with caplog.at_level(logging.INFO, logger='test-engine'):
        parts = engine.TrainingParts(model, train_loader, torch.nn.CrossEntropyLoss(), optimizer, precision, scheduler,
                                     val_loader, model_ema=model_ema, saver=saver, training_state=state)
        best = engine.fit(parts, engine.TrainSettings(epochs=epochs), DistEnv(CPU), LOGGER, str(tmp_path))
    assert evaluated == [model, model_ema.module] * 2
    assert best == (60.0, 1)
    best_file = read_training_checkpoint(str(tmp_path / 'model_best.pth.tar'))
    assert (best_file['epoch'], best_file['metric'], best_file['best_metric']) == (1, 60.0, 60.0)
    assert set(best_file['state_dict_ema']) == set(best_file['state_dict']) == {'weight', 'bias'}
    assert not torch.equal(best_file['state_dict_ema']['weight'], best_file['state_dict']['weight'])
    assert [p.name for p in tmp_path.glob('checkpoint-*.pth.tar')] == ['checkpoint-1.pth.tar']  # ranked by EMA
    with open(tmp_path / 'summary.csv', newline='') as f:
        assert [row['eval_top1'] for row in csv.DictReader(f)] == ['10.0000', '60.0000']
    assert "the EMA weights' Acc@1 ranks the checkpoints" in caplog.text


def _fit_bn(run_dir, criterion, model_ema=None, tensorboard=None, recovery_interval=0, epochs=2):
    """`epochs` epochs of 6 steps of a small BatchNorm network, saving into run_dir; `criterion(output, target,
    step)` may tamper with the model (it is called inside the forward pass of step `step`, counted from 1)."""
    import functools
    from utils.checkpoint import RunCheckpoints, training_state
    from utils.data import build_loaders
    from utils.engine import fit
    from utils.optim import create_scheduler
    from utils.reporting import RunReport

    run_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, precision = create_precision(model, optimizer, CPU, enabled=False)
    train_loader, val_loader = build_loaders(Points(), Points(), 4, 8, 0, 0, 1, seed=0, pin_memory=False)
    scheduler, _ = create_scheduler(optimizer, epochs=epochs, cooldown_epochs=0, warmup_epochs=0)
    steps = []

    def counted(output, target):
        steps.append(1)
        return criterion(model, output, target, len(steps))

    saver = RunCheckpoints(str(run_dir), 5)
    state = functools.partial(training_state, model, optimizer, scheduler, precision, model_ema, 'bn', {}, {})
    parts = TrainingParts(model, train_loader, counted, optimizer, precision, scheduler, val_loader, model_ema=model_ema,
                          saver=saver, training_state=state, report=RunReport.for_run(str(run_dir), True, LOGGER, tensorboard))
    return fit(parts, TrainSettings(epochs=epochs, recovery_interval=recovery_interval), DistEnv(CPU), LOGGER,
               str(run_dir))


def _statistics_overflow_at(bad_step):
    """A criterion whose loss stays finite while the BatchNorm statistics overflow at `bad_step`, as when the
    float16 scaler skips a step whose forward pass already updated them."""
    def criterion(model, output, target, step):
        if step == bad_step:  # new tensors: the ones of this forward pass are saved for its backward
            model[1].running_var = torch.full((6,), float('inf'))
            model[1].running_mean = torch.full((6,), float('nan'))
        return torch.nn.functional.cross_entropy(output, target)
    return criterion


def test_a_state_with_non_finite_statistics_is_never_saved_and_the_run_stops(tmp_path, caplog):
    from utils.checkpoint import read_training_checkpoint
    with caplog.at_level(logging.ERROR, logger='test-engine'):
        with pytest.raises(NonFiniteLossError, match=r'after epoch 1 holds NaN or inf in 2 tensors \(model: 2 tensors '
                                                     r'\(1\.running_mean, 1\.running_var\)\)'):
            _fit_bn(tmp_path, _statistics_overflow_at(9))  # in epoch 1 (6 steps per epoch)
    assert 'not saving the state after epoch 1: 2 tensors hold NaN or inf' in caplog.text
    for name in ('last.pth.tar', 'model_best.pth.tar'):  # epoch 0 stays the newest and best
        checkpoint = read_training_checkpoint(str(tmp_path / name))
        assert checkpoint['epoch'] == 0 and all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values()
                                                if t.is_floating_point())
    assert not (tmp_path / 'checkpoint-1.pth.tar').exists()


def test_non_finite_ema_weights_and_recovery_points_are_never_saved(tmp_path):
    from timm.utils import ModelEmaV3

    def poison_ema(model, output, target, step):
        if step == 3:
            ema.module[2].weight.data.fill_(float('nan'))
        return torch.nn.functional.cross_entropy(output, target)
    torch.manual_seed(0)
    ema = ModelEmaV3(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)),
                     decay=0.5)
    with pytest.raises(NonFiniteLossError, match=r'in epoch 0 after step 3 holds NaN or inf in 1 tensors \(EMA: 1 '):
        _fit_bn(tmp_path, poison_ema, model_ema=ema, recovery_interval=1)
    # the recovery points of steps 1 and 2 were good; step 3's is not written over them
    from utils.checkpoint import read_training_checkpoint
    assert read_training_checkpoint(str(tmp_path / 'recovery.pth.tar'))['recovery']['steps_done'] == 2


def test_a_full_disk_for_the_summary_keeps_the_checkpoint_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import builtins
    import errno
    import csv
    import utils.reporting
    from utils.checkpoint import read_training_checkpoint
    failures = []

    def full_disk_for_the_summary_once(path, *args, **kwargs):
        if str(path).endswith('summary.csv.tmp') and not failures:
            failures.append(path)
            raise OSError(errno.ENOSPC, 'No space left on device')
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(utils.reporting, 'open', full_disk_for_the_summary_once, raising=False)

    class FullDiskTensorBoard:
        def add_scalar(self, *args):
            raise OSError(errno.ENOSPC, 'No space left on device')

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, 'No space left on device')

    from utils.reporting import TensorBoardWriter
    with caplog.at_level(logging.INFO, logger='test-engine'):
        _fit_bn(tmp_path, _statistics_overflow_at(None),
                tensorboard=TensorBoardWriter(FullDiskTensorBoard(), LOGGER))
    assert failures, 'the fake full disk was not hit'
    assert read_training_checkpoint(str(tmp_path / 'last.pth.tar'))['epoch'] == 1
    assert (tmp_path / 'checkpoint-0.pth.tar').exists()
    assert 'summary.csv: No space left on device; its rows for epoch(s) 0 are written with the next epoch' in caplog.text
    assert caplog.text.count('TensorBoard logs stopped: No space left on device') == 1
    with open(tmp_path / 'summary.csv') as f:
        assert [row['epoch'] for row in csv.DictReader(f)] == ['0', '1']  # epoch 0's row came with epoch 1's


def test_evaluate_parts_runs_the_bare_evaluation_model_or_the_ema_weights(caplog):
    from timm.utils import ModelEmaV3
    from utils.engine import evaluate_parts
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    model_ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        model_ema.module.weight.mul_(-1.0)  # other predictions than the model's

    def never(*args):
        raise AssertionError('the training wrapper (DDP) must not evaluate')
    train_model = torch.nn.Module()
    train_model.forward = never
    _, optimizer, precision = create_precision(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU, enabled=False)
    parts = TrainingParts(model, None, None, optimizer, precision, val_loader=batches(3), train_model=train_model,
                          model_ema=model_ema)
    settings = TrainSettings(log_interval=2)
    with caplog.at_level(logging.INFO, logger='test-engine'):
        metrics = evaluate_parts(parts, settings, DistEnv(CPU), LOGGER)
        ema_metrics = evaluate_parts(parts, settings, DistEnv(CPU), LOGGER, ema=True)
    lines = list(caplog.messages)
    assert metrics == evaluate(model, batches(3), CPU, DistEnv(CPU), LOGGER)
    assert ema_metrics == evaluate(model_ema.module, batches(3), CPU, DistEnv(CPU), LOGGER)
    assert metrics != ema_metrics
    assert len(lines) == 6 and not any(m.startswith('EMA ') for m in lines[:3])
    assert all(m.startswith('EMA ') for m in lines[3:]) and lines[5].startswith('EMA * Acc@1 ')

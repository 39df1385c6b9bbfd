"""main.py as users run it: training learns, resume is exact, torchrun, --eval, config, errors, logs."""
import csv
import json
import os
import re
import shutil
import socket
import sys

import pytest
import torch
import yaml

import main
import models
from processes import run_watched
from utils import options
from models.weights import safe_load

# Small and fast: 32x32 images, batch 8, no augmentation that would slow learning on 48 images.
# --lr-base-size 8: the recipe's lr 1e-3 belongs to a global batch of 8 here (1024 in the recipe).
FAST = ['--model', 'van_b0', '--img-size', '32', '-b', '8', '--warmup-epochs', '0', '--cooldown-epochs', '0',
        '--log-interval', '2', '-j', '0', '--lr-base-size', '8']
EASY = ['--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--color-jitter', '0']

TRAIN_LINE = re.compile(r'^Train: (\d+) \[\s*(\d+)/\s*(\d+) \(\s*\d+%\)\]  Loss: ([\d.]+) \(([\d.]+)\)  '
                        r'Time: [\d.]+s,\s+[\d.]+/s  LR: \d\.\d{3}e[-+]\d\d  Data: [\d.]+ \([\d.]+\)$', re.M)
FPS_LINE = re.compile(r'^Epoch (\d+) FPS:([\d.]+)$', re.M)
TEST_LINE = re.compile(r'^Test: \[\s*\d+/\s*\d+\]  Loss: [\d.]+ \([\d.]+\)  Acc@1: [\d.]+ \([\d.]+\)  '
                       r'Acc@5: [\d.]+ \([\d.]+\)$', re.M)
EVAL_END = re.compile(r'^\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) Loss ([\d.]+) \(images (\d+)\)$', re.M)
BEST_LINE = re.compile(r'^\*\*\* Best metric: ([\d.]+) \(epoch (\d+)\)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_main(args, env, cwd, launcher=(), timeout=600):
    command = [*(launcher or [sys.executable]), 'main.py', *map(str, args)]
    return run_watched(command, deadline_s=timeout, cwd=cwd, env=env)  # kills torchrun's workers too on a hang


def assert_ok(result):
    assert result.returncode == 0, f'exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}'


@pytest.fixture(scope='module')
def trained_run(shapes_dataset, tmp_path_factory, repo_root):
    """3 short epochs on the shapes dataset; shared by the tests that inspect a finished run."""
    env = dict(os.environ, OMP_NUM_THREADS='2', PYTHONUNBUFFERED='1')
    out = tmp_path_factory.mktemp('out')
    result = run_main(['--data_path', shapes_dataset, *FAST, *EASY, '--epochs', '3', '--output', out,
                       '--experiment', 'learn'], env, repo_root)
    assert_ok(result)
    return out / 'learn', result.stdout


@pytest.mark.slow
def test_short_run_learns_far_above_chance(trained_run):
    run_dir, log = trained_run
    final = [float(m.group(1)) for m in EVAL_END.finditer(log)][-1]
    assert final >= 70.0, f'4 classes (chance 25%), expected >= 70% after 3 epochs, got {final}\n{log}'


@pytest.mark.slow
def test_logs_have_the_modelzoo_lines(trained_run):
    run_dir, log = trained_run
    train = TRAIN_LINE.findall(log)
    # 48 images / batch 8 = 6 steps per epoch, logged at steps 2, 4, 6 of each of 3 epochs
    assert [(int(e), int(s)) for e, s, *_ in train] == [(e, s) for e in range(3) for s in (2, 4, 6)]
    assert all(int(total) == 6 for _, _, total, *_ in train)
    fps = FPS_LINE.findall(log)
    assert [int(e) for e, _ in fps] == [0, 1, 2] and all(float(v) > 0 for _, v in fps)
    assert len(TEST_LINE.findall(log)) >= 3
    ends = EVAL_END.findall(log)
    assert len(ends) == 3 and all(int(images) == 19 for *_, images in ends)
    best = BEST_LINE.findall(log)
    assert len(best) == 1
    top1s = [float(t) for t, *_ in ends]
    assert float(best[0][0]) == pytest.approx(max(top1s), abs=1e-3)
    assert top1s[int(best[0][1])] == pytest.approx(max(top1s), abs=1e-3)
    # the log file holds the same lines
    assert len(TRAIN_LINE.findall(re.sub(r'^\S+ \S+ ', '', (run_dir / 'log.txt').read_text(), flags=re.M))) == 9


@pytest.mark.slow
def test_the_results_file_and_the_modelzoo_report_say_what_the_log_says(trained_run):
    """The launch scripts once read the log (the last FPS line, every Train line's loss, the best line);
    the report they now make from results.json must read the same."""
    from utils.modelzoo import loss_lines, summary_fields
    run_dir, log = trained_run
    results = json.loads((run_dir / 'results.json').read_text())
    assert (results['mode'], results['finished'], results['world_size'], results['batch_size']) == ('train', True, 1, 8)
    assert [e['epoch'] for e in results['epochs']] == [0, 1, 2] and results['start_epoch'] == 0
    assert [f"{e['fps']:.2f}" for e in results['epochs']] == [fps for _, fps in FPS_LINE.findall(log)]
    assert [f"{e['eval_top1']:.3f}" for e in results['epochs']] == [top1 for top1, *_ in EVAL_END.findall(log)]
    assert loss_lines(results) == [loss for *_, loss, _ in TRAIN_LINE.findall(log)]
    (best, best_epoch), = BEST_LINE.findall(log)
    assert (f"{results['best']['top1']:.3f}", results['best']['epoch']) == (best, int(best_epoch))
    fields = dict(summary_fields(results, 'acc', 'VAN_Classification', 8, 1))
    assert fields['ActualFPS'] == FPS_LINE.findall(log)[-1][1]
    assert fields['ActualLoss'] == TRAIN_LINE.findall(log)[-1][3]
    assert fields['TrainAccuracy'] == best
    with open(run_dir / 'summary.csv', newline='') as f:  # one list of columns: the same numbers as summary.csv
        for row, epoch in zip(csv.DictReader(f), results['epochs']):
            assert float(row['eval_top1']) == pytest.approx(epoch['eval_top1'], abs=1e-4)
            assert float(row['train_loss']) == pytest.approx(epoch['train_loss'], abs=1e-6)


@pytest.mark.slow
def test_run_dir_has_summary_args_and_checkpoints(trained_run):
    run_dir, log = trained_run
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['epoch', 'train_loss', 'lr', 'eval_loss', 'eval_top1', 'eval_top5']
    assert [r[0] for r in rows[1:]] == ['0', '1', '2']
    assert float(rows[-1][4]) == pytest.approx(float(EVAL_END.findall(log)[-1][0]), abs=1e-3)
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert args['epochs'] == 3 and args['img_size'] == 32 and args['model'] == 'van_b0'
    assert (args['lr'], args['drop_path']) == (1e-3, 0.1)  # what the run used, not the unset options
    checkpoint = safe_load(run_dir / 'last.pth.tar')
    for key in ('epoch', 'arch', 'state_dict', 'optimizer', 'scheduler', 'version', 'args', 'metric',
                'class_to_idx'):
        assert key in checkpoint, key
    assert checkpoint['epoch'] == 2 and checkpoint['arch'] == 'van_b0'
    assert isinstance(checkpoint['args'], dict) and checkpoint['args']['batch_size'] == 8
    assert (checkpoint['args']['lr'], checkpoint['args']['drop_path']) == (1e-3, 0.1)
    assert checkpoint['class_to_idx'] == {'circle_red': 0, 'cross_yellow': 1, 'square_green': 2, 'triangle_blue': 3}
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    assert {p.name for p in run_dir.glob('checkpoint-*.pth.tar')} == {'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar',
                                                                     'checkpoint-2.pth.tar'}
    assert (run_dir / 'model_best.pth.tar').is_file()
    assert not list(run_dir.glob('*.tmp*')), 'temporary files left behind'


@pytest.mark.slow
def test_eval_from_checkpoint_reports_the_saved_accuracy(trained_run, shapes_dataset, subprocess_env, repo_root):
    run_dir, _ = trained_run
    checkpoint = safe_load(run_dir / 'last.pth.tar')
    results_file = run_dir.parent / 'eval_results.json'
    result = run_main(['--data_path', shapes_dataset, '--img-size', '32', '-b', '8', '-j', '0', '--eval',
                       '--resume', run_dir / 'last.pth.tar', '--results', results_file], subprocess_env, repo_root)
    assert_ok(result)
    (top1, _, loss, images), = EVAL_END.findall(result.stdout)
    assert int(images) == 19
    assert float(top1) == pytest.approx(checkpoint['metric'], abs=1e-3)
    assert 'Train:' not in result.stdout
    # The report of an evaluation says what its last line says.
    from utils.modelzoo import summary_fields
    results = json.loads(results_file.read_text())
    assert (results['mode'], results['finished'], results['evaluation']['images']) == ('eval', True, 19)
    fields = dict(summary_fields(results, 'eval', 'VAN_Classification', 8, 1))
    assert (fields['TrainAccuracy'], fields['ActualLoss']) == (top1, loss)


@pytest.mark.slow
def test_resume_after_epoch_1_gives_the_same_weights_as_an_uninterrupted_run(
        shapes_dataset, tmp_path, subprocess_env, repo_root):
    # Full augmentation (RandAugment, erasing, mixup/cutmix, drop path) so every random stream matters.
    common = ['--data_path', shapes_dataset, '--model', 'van_b0', '--img-size', '32', '-b', '8',
              '--epochs', '2', '--warmup-epochs', '1', '--cooldown-epochs', '0', '--max-steps-per-epoch', '2',
              '--output', tmp_path, '--log-interval', '1']
    assert_ok(run_main([*common, '--experiment', 'whole', '-j', '0'], subprocess_env, repo_root))
    # A run that stopped after its first epoch: only that epoch's checkpoint, plus debris of a crash
    # (a half-written temporary file and a truncated checkpoint) that auto-resume must skip.
    stopped = tmp_path / 'stopped'
    stopped.mkdir()
    shutil.copy(tmp_path / 'whole' / 'checkpoint-0.pth.tar', stopped / 'last.pth.tar')
    (stopped / 'last.pth.tar.tmp123').write_bytes(b'partial')
    (stopped / 'checkpoint-7.pth.tar').write_bytes((tmp_path / 'whole' / 'last.pth.tar').read_bytes()[:1000])
    # Resume with another worker count: augmentation must not depend on it.
    result = run_main([*common, '--experiment', 'stopped', '--resume', 'auto', '-j', '1'], subprocess_env, repo_root)
    assert_ok(result)
    assert 'Train: 0 ' not in result.stdout and 'Train: 1 ' in result.stdout
    whole = safe_load(tmp_path / 'whole' / 'last.pth.tar')
    resumed = safe_load(stopped / 'last.pth.tar')
    assert resumed['epoch'] == whole['epoch'] == 1
    for name, tensor in whole['state_dict'].items():
        assert torch.equal(tensor, resumed['state_dict'][name]), name
    assert whole['optimizer']['state'][0]['step'] == resumed['optimizer']['state'][0]['step']
    with open(stopped / 'summary.csv') as f:
        assert [row['epoch'] for row in csv.DictReader(f)] == ['1']


@pytest.mark.slow
def test_torchrun_two_processes_count_every_val_image_once(shapes_dataset, tmp_path, subprocess_env, repo_root):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                '--master_port', str(free_port())]
    result = run_main(['--data_path', shapes_dataset, *FAST, '--epochs', '1', '--max-steps-per-epoch', '2',
                       '--output', tmp_path, '--experiment', 'ddp', '--log-interval', '1'],
                      subprocess_env, repo_root, launcher=torchrun)
    assert_ok(result)
    assert 'world size 2, global batch 16 (2 x 8), lr 0.002 (--lr-base 0.001 x 16 / 8)' in result.stdout
    (_, _, _, images), = EVAL_END.findall(result.stdout)
    assert int(images) == 19  # odd: a padded sampler would report 20
    assert len(TRAIN_LINE.findall(result.stdout)) == 2, 'rank 0 only logs'
    assert 'Train: 0 [   2/   2' in result.stdout  # 48 images / 2 ranks / batch 8 = 3, capped to 2
    checkpoint = safe_load(tmp_path / 'ddp' / 'last.pth.tar')
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    results = json.loads((tmp_path / 'ddp' / 'results.json').read_text())  # written by rank 0
    assert (results['world_size'], results['batch_size'], results['finished']) == (2, 8, True)
    assert [f'{loss:.4f}' for loss in results['train_losses']] == [m[3] for m in TRAIN_LINE.findall(result.stdout)]

    # Every rank reports the same numbers, and they equal a single-process evaluation.
    single, double = tmp_path / 'single', tmp_path / 'double'
    single.mkdir(), double.mkdir()
    worker = str(repo_root / 'test' / 'unit' / 'dist_eval_worker.py')
    for nproc, out in ((1, single), (2, double)):
        launch = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                  '--master_port', str(free_port()), worker, str(shapes_dataset), str(out)]
        done = run_watched(launch, deadline_s=300, env=subprocess_env)
        assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((double / f'rank{r}.json').read_text()) for r in (0, 1)]
    reference = json.loads((single / 'rank0.json').read_text())
    assert sorted(r['local_images'] for r in ranks) == [9, 10]
    for metrics in ranks:
        assert metrics['images'] == 19
        for key in ('loss', 'top1', 'top5'):
            assert metrics[key] == ranks[0][key]
            assert metrics[key] == pytest.approx(reference[key], rel=1e-6)


@pytest.mark.slow
def test_missing_data_folder_is_one_clear_error_in_a_subprocess(tmp_path, subprocess_env, repo_root):
    result = run_main(['--data_path', tmp_path / 'nowhere', '--output', tmp_path], subprocess_env, repo_root)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert 'nowhere' in result.stderr and 'does not exist' in result.stderr


def test_missing_data_folder_exits_2_with_message(tmp_path, capsys):
    assert main.main(['--data_path', str(tmp_path / 'missing'), '--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'missing' in err and 'does not exist' in err


def test_mismatched_classes_exits_2_naming_them(make_dataset, tmp_path, capsys):
    counts = {'train': {'circle_red': 8, 'square_green': 8, 'cross_yellow': 8},
              'val': {'circle_red': 2, 'square_green': 2, 'triangle_blue': 2}}
    root = make_dataset(counts)
    code = main.main(['--data_path', str(root), '--output', str(tmp_path), *FAST, '--epochs', '1'])
    err = capsys.readouterr().err
    assert code == 2
    assert 'same class folders' in err and 'cross_yellow' in err and 'triangle_blue' in err


def test_bad_checkpoint_exits_2(shapes_dataset, tmp_path, capsys):
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(b'not a checkpoint')
    code = main.main(['--data_path', str(shapes_dataset), *FAST, '--eval', '--resume', str(bad)])
    assert code == 2
    assert 'bad.pth.tar' in capsys.readouterr().err


def test_weights_only_file_is_not_a_resume_checkpoint(shapes_dataset, tmp_path, capsys):
    path = tmp_path / 'weights.pth'
    torch.save({'state_dict': {}}, path)
    code = main.main(['--data_path', str(shapes_dataset), *FAST, '--epochs', '1', '--resume', str(path),
                      '--output', str(tmp_path)])
    assert code == 2
    assert '--pretrained' in capsys.readouterr().err


def test_yaml_config_sets_options_and_the_command_line_wins(tmp_path):
    config = tmp_path / 'cfg.yaml'
    config.write_text('model: van_b2\nbatch-size: 64\nlr: 0.002\ndrop_path: 0.2\namp: true\n')
    args = main.parse_args(['--data_path', 'd', '-c', str(config), '--lr', '0.003'])
    assert (args.model, args.batch_size, args.lr, args.drop_path, args.amp) == ('van_b2', 64, 0.003, 0.2, True)
    assert args.epochs == 300 and args.aa == 'rand-m9-mstd0.5-inc1'  # untouched recipe defaults


def test_yaml_config_with_an_unknown_key_fails(tmp_path, capsys):
    config = tmp_path / 'cfg.yaml'
    config.write_text('batch_sise: 64\n')
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(['--data_path', 'd', '-c', str(config)])
    assert exit_info.value.code == 2
    assert 'batch_sise' in capsys.readouterr().err


def test_defaults_are_the_reference_recipe():
    args = main.parse_args(['--data_path', 'd'])
    assert (args.opt, args.weight_decay, args.epochs, args.cooldown_epochs) == ('adamw', 0.05, 300, 10)
    assert (args.warmup_epochs, args.warmup_lr, args.min_lr) == (5, 1e-6, 1e-6)
    assert (args.aa, args.reprob, args.remode, args.mixup, args.cutmix) == ('rand-m9-mstd0.5-inc1', 0.25, 'pixel', 0.8, 1.0)
    assert (args.smoothing, args.color_jitter, args.seed, args.batch_size) == (0.1, 0.4, 42, 128)
    main.resolve_recipe(args, world_size=8)  # the reference's 8 processes x 128
    assert (args.lr, args.drop_path) == (1e-3, 0.1)
    assert not args.amp and not args.model_ema and not args.compile and not args.channels_last
    assert main.parse_args(['d']).data_path == 'd'  # timm/reference-style positional root


@pytest.mark.parametrize('world_size, argv, lr, source', [
    (1, [], 1.25e-4, '--lr-base 0.001 x 128 / 1024'),
    (2, [], 2.5e-4, '--lr-base 0.001 x 256 / 1024'),
    (8, [], 1e-3, '--lr-base 0.001 x 1024 / 1024'),   # the reference: exactly its 1e-3
    (8, ['-b', '64'], 5e-4, '--lr-base 0.001 x 512 / 1024'),
    (2, ['--lr-base-scale', 'sqrt'], 5e-4, '--lr-base 0.001 x sqrt(256 / 1024)'),
    (4, ['--lr-base', '4e-3', '--lr-base-size', '4096'], 5e-4, '--lr-base 0.004 x 512 / 4096'),
    (1, ['--lr', '1e-3'], 1e-3, 'given'),
    (8, ['--lr', '3e-4'], 3e-4, 'given'),
])
def test_lr_follows_the_global_batch_unless_given(world_size, argv, lr, source):
    args = main.parse_args(['--data_path', 'd', *argv])
    line = main.resolve_recipe(args, world_size)
    assert args.lr == pytest.approx(lr, rel=1e-12)
    global_batch = args.batch_size * world_size
    assert f'world size {world_size}, global batch {global_batch} ({world_size} x {args.batch_size}), ' \
           f'lr {lr:.6g} ({source})' in line


@pytest.mark.parametrize('model, argv, rate, source', [
    ('van_b0', [], 0.1, 'van_b0 recipe'), ('van_b1', [], 0.1, 'van_b1 recipe'),
    ('van_b2', [], 0.1, 'van_b2 recipe'), ('van_b3', [], 0.2, 'van_b3 recipe'),
    ('van_large', [], 0.2, 'van_large recipe'),  # older names: their variant's value
    ('van_b3', ['--drop-path', '0.05'], 0.05, 'given'), ('van_b0', ['--drop-path', '0'], 0.0, 'given'),
])
def test_drop_path_per_variant_reaches_the_model(model, argv, rate, source):
    args = main.parse_args(['--data_path', 'd', '--model', model, *argv])
    assert f'drop path {rate:g} ({source})' in main.resolve_recipe(args, 1)
    with torch.device('meta'):  # shapes only: van_b3 builds without memory
        built = main.create_model(args, num_classes=10)
    rates = [m.drop_prob for m in built.modules() if type(m).__name__ == 'DropPath']
    depth = sum(models.VARIANTS[models.ALIASES.get(model, model)]['depths'])
    if rate == 0:
        assert rates == []
    else:
        # linear from 0 (first block, no DropPath) to the rate, used twice per block (attention and MLP)
        assert len(rates) == depth - 1 and max(rates) == pytest.approx(rate)


def test_timm_models_default_to_no_drop_path_and_every_variant_has_a_recipe_value():
    import timm
    with torch.device('meta'):
        assert not [m for m in timm.create_model('van_b3').modules() if type(m).__name__ == 'DropPath']
    assert set(models.RECIPE_DROP_PATH) == set(models.VARIANTS)
    assert [models.recipe_drop_path(n) for n in ('van_tiny', 'van_small', 'van_base', 'van_large')] == [0.1, 0.1, 0.1, 0.2]


def test_settings_line_comes_before_data_loading_and_an_unknown_model_is_refused(shapes_dataset, tmp_path, capsys):
    # --num-classes below the class-folder count stops the run right after the settings line, before
    # any model or data loader is built.
    argv = ['--data_path', str(shapes_dataset), '--num-classes', '2', '--output', str(tmp_path)]
    assert main.main([*argv, '--model', 'van_b3']) == 2
    out, err = capsys.readouterr()
    assert 'settings: model van_b3, world size 1, global batch 128 (1 x 128), lr 0.000125 ' \
           '(--lr-base 0.001 x 128 / 1024), drop path 0.2 (van_b3 recipe)' in out
    assert '--num-classes 2 is smaller' in err
    with pytest.raises(SystemExit) as stopped:  # an unknown model is refused while parsing
        main.main([*argv, '--model', 'van_b9'])
    assert stopped.value.code == 2 and "invalid choice: 'van_b9'" in capsys.readouterr().err


def test_a_resumed_run_compares_the_effective_lr_with_its_checkpoint():
    def saved(world_size, *argv):
        args = main.parse_args(['--data_path', 'd', *argv])
        main.resolve_recipe(args, world_size)
        return options.schedule_options(options.plain_args(args))
    # The same command keeps its schedule; the checkpoint holds the effective lr, never None.
    assert saved(8) == saved(8) and saved(8)['lr'] == 1e-3
    assert saved(8) == saved(8, '--lr', '1e-3') == saved(4, '-b', '256')  # same lr, however reached
    assert saved(2) != saved(8)  # another global batch, another learning rate: the new schedule applies


@pytest.mark.parametrize('argv, message', [
    (['--eval'], '--eval needs'),
    (['-b', '7'], 'even --batch-size'),
    (['--amp-backend', 'apex'], 'only apply with --amp'),
    (['--amp', '--opt-level', 'O2', '--amp-backend', 'native'], 'O1 only'),
    (['--amp', '--loss-scale', 'big'], '--loss-scale'),
    (['--epochs', '0'], 'argument --epochs: expected an integer >= 1'),
    (['--lr-base-size', '0'], 'argument --lr-base-size: expected an integer >= 1'),
    (['--lr-base-scale', 'log'], 'invalid choice'),
    ([], 'dataset root is required'),
])
def test_invalid_combinations_fail_at_start(argv, message, capsys):
    full = argv if argv == [] else ['--data_path', 'd', *argv]
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(full)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_amp_ema_channels_last_per_update_run_then_eval_with_pretrained(shapes_dataset, tmp_path, capsys):
    # bfloat16 is slow on CPUs without native bf16 units: one step of batch 4 is enough here.
    small = ['--data_path', str(shapes_dataset), '--img-size', '32', '-b', '4', '-j', '0', '--amp']
    code = main.main([*small, '--warmup-epochs', '0', '--cooldown-epochs', '0', '--epochs', '1',
                      '--max-steps-per-epoch', '1', '--model-ema', '--channels-last', '--sched-on-updates',
                      '--output', str(tmp_path), '--experiment', 'combo'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'backend=native, dtype=torch.bfloat16' in out
    ema_top1, = re.findall(r'^EMA \* Acc@1 ([\d.]+) Acc@5 [\d.]+ Loss [\d.]+ \(images 19\)$', out, re.M)
    (train_top1, *_), = EVAL_END.findall(out)  # the regular weights' evaluation
    checkpoint = safe_load(tmp_path / 'combo' / 'last.pth.tar')
    assert set(checkpoint['state_dict_ema']) == set(checkpoint['state_dict'])
    assert 'amp_scaler' not in checkpoint  # bfloat16 needs no loss scaling
    # As the reference: the EMA weights' evaluation is the run's metric, and the log says so.
    assert checkpoint['metric'] == pytest.approx(float(ema_top1), abs=1e-3)
    assert "best metric: the EMA weights'" in out
    assert BEST_LINE.search(out).group(1) == ema_top1

    # The launch scripts evaluate with --pretrained: the models package reads the training checkpoint's
    # regular weights (state_dict).
    code = main.main([*small, '--eval', '--pretrained', str(tmp_path / 'combo' / 'last.pth.tar')])
    out = capsys.readouterr().out
    assert code == 0
    (top1, _, _, images), = EVAL_END.findall(out)
    assert int(images) == 19 and float(top1) == pytest.approx(float(train_top1), abs=1e-3)


def test_eval_resume_auto_without_a_checkpoint_says_where_it_looked(shapes_dataset, tmp_path, capsys):
    code = main.main(['--data_path', str(shapes_dataset), *FAST, '--eval', '--resume', 'auto',
                      '--output', str(tmp_path), '--experiment', 'never-trained'])
    assert code == 2
    assert 'no checkpoint to evaluate' in capsys.readouterr().err


def test_train_folder_without_classes_exits_2(tmp_path, capsys):
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    (tmp_path / 'data' / 'val').mkdir()
    assert main.main(['--data_path', str(tmp_path / 'data'), '--output', str(tmp_path)]) == 2
    assert 'no class folders' in capsys.readouterr().err


def test_eval_with_weights_of_another_class_count_is_refused(shapes_dataset, tmp_path, capsys):
    # A fresh random head would "evaluate" at chance level: the user must hear that the file does not fit.
    import timm
    weights = tmp_path / 'ten_classes.pth.tar'
    torch.save({'state_dict': timm.create_model('van_b0', num_classes=10).state_dict()}, weights)
    code = main.main(['--data_path', str(shapes_dataset), *FAST, '--eval', '--pretrained', str(weights)])
    err = capsys.readouterr().err
    assert code == 2
    assert 'ten_classes.pth.tar' in err and '10 classes' in err


@pytest.mark.parametrize('argv, message', [
    (['--lr', '-1'], 'argument --lr: expected a number > 0'),
    (['--lr', 'nan'], 'argument --lr'),
    (['--warmup-lr', 'nan'], 'argument --warmup-lr'),
    (['--drop-path', '2'], 'argument --drop-path'),
    (['--smoothing', '1.5'], 'argument --smoothing'),
    (['--std', '0', '0', '0'], 'argument --std: expected a number > 0'),
    (['--recount', '-1'], 'argument --recount'),
    (['--weight-decay', '-0.1'], 'argument --weight-decay'),
    (['--mixup-prob', '2'], 'argument --mixup-prob'),
    (['--model-ema-decay', '1.5'], 'argument --model-ema-decay'),
    (['--crop-pct', '0'], 'argument --crop-pct'),
    (['--clip-grad', '-1'], 'argument --clip-grad'),
    (['--img-size', '-5'], 'argument --img-size'),
    (['--seed', '-3'], 'argument --seed'),
    (['--loss-scale', 'inf', '--amp'], '--loss-scale'),
    (['--sched', 'bogus'], "Unknown scheduler 'bogus'"),
    (['--opt', 'adamx'], "'adamx' is not an optimizer timm knows; did you mean adamax"),
    (['--aa', 'rand-x9'], 'not an auto-augment policy'),
    (['--interpolation', 'cubic'], "'cubic' is not an interpolation"),
    (['--train-interpolation', 'cubic'], "'cubic' is not an interpolation"),
    (['--remode', 'noise'], 'argument --remode'),
    (['--model', 'van_b9'], 'argument --model'),
    (['--sched', 'plateau', '--sched-on-updates'], 'Plateau LR only supports step per epoch'),
    (['--opt-betas', '0.9'], "optimizer 'adamw' cannot be used with these settings (--opt-betas [0.9])"),
    (['--scale', '0.9', '0.1'], '--scale takes a range'),
])
def test_invalid_values_fail_at_start_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(['--data_path', 'd', *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('text, message', [
    ('batch_size: [8, 16]\n', 'batch_size (--batch-size): expected one value'),
    ('batch-size: 8.5\n', 'batch_size (--batch-size): expected an integer >= 1'),
    ('epochs: 1.5\n', 'epochs (--epochs): expected an integer'),
    ('clip_mode: bogus\n', "clip_mode (--clip-mode): invalid choice: 'bogus'"),
    ('amp: "false"\n', "amp (--amp): expected true or false, got 'false'"),
    ('amp: 1\n', 'amp (--amp): expected true or false'),
    ('lr: -1\n', 'lr (--lr): expected a number > 0'),
    ('lr: true\n', 'lr (--lr)'),
    ('mean: 0.5\n', 'mean (--mean): expected a list of 3 values'),
    ('std: [1, 1]\n', 'std (--std): expected 3 values'),
    ('opt: bogus\n', "opt (--opt): 'bogus' is not an optimizer"),
    ('epochs: null\n', 'epochs (--epochs): needs a value'),
    ('model: {name: van_b0}\n', 'model (--model): expected one value'),
    ('- lr\n', 'must be a mapping'),
    ('lr: [0.1\n', 'is not valid YAML'),
])
def test_config_values_follow_the_command_line_rules(tmp_path, text, message, capsys):
    config = tmp_path / 'cfg.yaml'
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(['--data_path', 'd', '-c', str(config)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_that_is_binary_is_one_message(tmp_path, capsys):
    config = tmp_path / 'weights.pth'
    torch.save({'w': torch.randn(64)}, config)
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(['--data_path', 'd', '-c', str(config)])
    assert exit_info.value.code == 2
    assert 'weights.pth' in capsys.readouterr().err


def test_config_values_are_converted_like_the_command_line(tmp_path):
    config = tmp_path / 'cfg.yaml'
    # YAML 1.1 reads 1e-3 (no dot) as a string: the option's own type reads it as the command line would.
    config.write_text('lr: 1e-3\nmean: [0, 0.5, 1]\nscale: [0.5, 1]\namp: false\nnum_classes: null\nmodel_ema: on\n')
    args = main.parse_args(['--data_path', 'd', '-c', str(config)])
    assert args.lr == 1e-3 and args.mean == [0.0, 0.5, 1.0] and args.scale == [0.5, 1.0]
    assert args.amp is False and args.num_classes is None and args.model_ema is True


@pytest.mark.slow
def test_wrong_option_values_in_a_subprocess_are_one_line_without_traceback(tmp_path, subprocess_env, repo_root):
    config = tmp_path / 'cfg.yaml'
    config.write_text('batch_size: [8, 16]\n')
    for argv in (['-c', config], ['--opt', 'nonsense'], ['--std', '0', '0', '0']):
        result = run_main(['--data_path', tmp_path, *argv], subprocess_env, repo_root, timeout=120)
        assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith('main.py: error: ')


ONE_STEP = [*FAST, *EASY, '--max-steps-per-epoch', '1']


@pytest.mark.slow
def test_resuming_an_sgd_run_without_repeating_opt_continues_with_sgd(shapes_dataset, tmp_path, capsys):
    common = ['--data_path', str(shapes_dataset), *ONE_STEP, '--output', str(tmp_path), '--experiment', 'sgd']
    assert main.main([*common, '--epochs', '1', '--opt', 'sgd', '--momentum', '0.8']) == 0
    capsys.readouterr()
    assert main.main([*common, '--epochs', '2', '--resume', 'auto']) == 0
    out = capsys.readouterr().out
    assert '--opt sgd (not adamw), --momentum 0.8 (not 0.9)' in out and 'optimizer SGD' in out
    checkpoint = safe_load(tmp_path / 'sgd' / 'last.pth.tar')
    assert checkpoint['epoch'] == 1 and checkpoint['args']['opt'] == 'sgd'
    assert checkpoint['optimizer']['param_groups'][0]['momentum'] == 0.8
    assert yaml.safe_load((tmp_path / 'sgd' / 'args.yaml').read_text())['opt'] == 'sgd'


def test_resume_auto_when_every_checkpoint_is_corrupt_stops_and_keeps_them(shapes_dataset, tmp_path, capsys):
    run_dir = tmp_path / 'broken'
    run_dir.mkdir()
    (run_dir / 'last.pth.tar').write_bytes(b'PK\x03\x04 cut off by a full disk')
    (run_dir / 'checkpoint-4.pth.tar').write_bytes(b'\x80\x02 garbage')
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code = main.main(['--data_path', str(shapes_dataset), *ONE_STEP, '--epochs', '1', '--output', str(tmp_path),
                      '--experiment', 'broken', '--resume', 'auto'])
    err = capsys.readouterr().err
    assert code == 2, err
    assert 'no checkpoint in' in err and 'last.pth.tar' in err and 'checkpoint-4.pth.tar' in err
    assert {p.name: p.read_bytes() for p in run_dir.glob('*.pth.tar')} == before


@pytest.mark.slow
@pytest.mark.parametrize('train_per_class', [3, 13])  # 12 images now (shrunk below the point), or 52 (grown)
def test_a_recovery_point_in_a_training_set_that_changed_size_is_refused(shapes_dataset, make_dataset, tmp_path,
                                                                          capsys, train_per_class):
    common = [*ONE_STEP, '--output', str(tmp_path), '--experiment', 'run']
    assert main.main(['--data_path', str(shapes_dataset), *common, '--epochs', '2']) == 0
    run_dir = tmp_path / 'run'
    checkpoint = safe_load(run_dir / 'last.pth.tar')  # epoch 1 done; then stopped after 4 steps of epoch 2
    checkpoint['recovery'] = dict(epoch=2, steps_done=4, samples_seen=32, num_updates=2, rng=[])
    checkpoint.setdefault('train_samples', 48)
    torch.save(checkpoint, run_dir / 'recovery.pth.tar')
    capsys.readouterr()
    changed = make_dataset({'train': {name: train_per_class for name in ('circle_red', 'square_green',
                                                                           'triangle_blue', 'cross_yellow')},
                            'val': {'circle_red': 1, 'square_green': 1, 'triangle_blue': 1, 'cross_yellow': 1}})
    code = main.main(['--data_path', str(changed), *common, '--epochs', '3', '--resume', 'auto'])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f'stopped after 32 images of epoch 2 of a training set of 48 images, but the training set now holds ' \
           f'{4 * train_per_class}' in err
    assert f'--resume {run_dir / "last.pth.tar"}' in err


@pytest.mark.slow
def test_eval_of_pretrained_weights_whose_classes_are_numbered_differently(trained_run, shapes_dataset, tmp_path,
                                                                           capsys):
    run_dir, _ = trained_run
    checkpoint = safe_load(run_dir / 'last.pth.tar')
    # The same weights as saved by a run whose class folders sorted the other way round.
    names = sorted(checkpoint['class_to_idx'], key=checkpoint['class_to_idx'].get)[::-1]
    rows = [checkpoint['class_to_idx'][name] for name in names]
    state_dict = dict(checkpoint['state_dict'], **{k: checkpoint['state_dict'][k][rows] for k in ('head.weight',
                                                                                               'head.bias')})
    reordered = tmp_path / 'reordered.pth.tar'
    torch.save({'state_dict': state_dict, 'class_to_idx': {name: i for i, name in enumerate(names)}}, reordered)
    code = main.main(['--data_path', str(shapes_dataset), '--img-size', '32', '-b', '8', '-j', '0', '--eval',
                      '--pretrained', str(reordered)])
    out = capsys.readouterr().out
    assert code == 0
    assert 'reordered by class name' in out
    (top1, _, _, images), = EVAL_END.findall(out)
    assert float(top1) == pytest.approx(checkpoint['metric'], abs=1e-3)

    other = tmp_path / 'other.pth.tar'
    # The --resume path (a whole training checkpoint) maps them for evaluation too, and refuses to train on.
    torch.save(dict(checkpoint, state_dict=state_dict, class_to_idx={name: i for i, name in enumerate(names)}),
               reordered)
    code = main.main(['--data_path', str(shapes_dataset), '--img-size', '32', '-b', '8', '-j', '0', '--eval',
                      '--resume', str(reordered)])
    out = capsys.readouterr().out
    assert code == 0 and 'reordered by class name' in out
    assert float(EVAL_END.findall(out)[0][0]) == pytest.approx(checkpoint['metric'], abs=1e-3)
    code = main.main(['--data_path', str(shapes_dataset), *FAST, '--epochs', '5', '--resume', str(reordered),
                      '--output', str(tmp_path), '--experiment', 'continued'])
    assert code == 2 and 'numbers its classes in another order than the dataset' in capsys.readouterr().err

    renamed = {('circle_blue' if name == 'circle_red' else name): i for name, i in checkpoint['class_to_idx'].items()}
    torch.save({'state_dict': checkpoint['state_dict'], 'class_to_idx': renamed}, other)
    code = main.main(['--data_path', str(shapes_dataset), '--img-size', '32', '-b', '8', '-j', '0', '--eval',
                      '--pretrained', str(other)])
    err = capsys.readouterr().err
    assert code == 2 and 'only in the dataset: circle_red; only in the weights: circle_blue' in err

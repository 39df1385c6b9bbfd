"""tools/gpu_report.py (driven by tools/gpu_benchmark.sh) and utils/step_profile.py, on CPU: the plan, the
command lines it builds, the one-line stop without a GPU, the deadline, the JSON and tables, the kernel
classes, and (slow) a dry run end to end."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from utils import step_profile


def _load(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', REPO_ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_report = _load('gpu_report')
benchmark = _load('benchmark')


def test_plan_covers_every_question_of_the_issue():
    steps = gpu_report.plan(gpu_report.Settings())
    configs = [s.bench for s in steps if s.bench]
    assert {c.channels_last for c in configs} == {False, True}
    assert {c.dtype for c in configs} == {'float16', 'bfloat16'}
    assert {c.cudnn_benchmark for c in configs} == {False, True}
    assert any(c.compile for c in configs) and any(c.large_batch for c in configs)
    assert {'plain', 'fast', 'polyphase', 'triton'} <= {i for c in configs for i in c.impls}
    assert any(c.profile and not c.channels_last for c in configs) and any(c.profile and c.channels_last for c in configs)
    assert steps[0].name == gpu_report.REFERENCE_STEP and 'plain' in steps[0].bench.impls
    assert [s.main_run for s in steps if s.main_run] == ['reference', 'best']
    names = [s.name for s in steps]
    assert names.index('data') < names.index('main-reference')
    with pytest.raises(gpu_report.SetupError, match='unknown step nope; the steps are reference'):
        gpu_report.select_steps(steps, 'reference,nope')
    assert [s.name for s in gpu_report.select_steps(steps, 'data, reference')] == ['reference', 'data']


def test_command_lines_are_accepted_by_benchmark_and_main(tmp_path):
    import main as main_py
    settings = gpu_report.Settings()
    for step in gpu_report.plan(settings):
        if step.bench:
            argv = gpu_report.benchmark_argv('python', settings, step.bench, tmp_path / 'x.json')
            args = benchmark.get_parser().parse_args(argv[2:])
            assert args.channels_last == step.bench.channels_last and args.compile == step.bench.compile
            assert args.cudnn_benchmark == step.bench.cudnn_benchmark and args.profile == step.bench.profile
    best = dict(dtype='bfloat16', channels_last=True, cudnn_benchmark=True, compile=True, impl='triton')
    options = gpu_report.main_options(best)
    assert options == ['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--cudnn-benchmark', '--compile',
                       '--lka-impl', 'triton']
    assert gpu_report.main_options(None) == ['--amp']
    assert gpu_report.main_options(None, amp=False) == []
    argv = gpu_report.main_argv('python', settings, tmp_path / 'data', tmp_path / 'out', 'main-best', options)
    args = main_py.parse_args(argv[2:])
    assert (args.lka_impl, args.amp_dtype, args.cudnn_benchmark, args.channels_last, args.compile) == (
        'triton', 'bfloat16', True, True, True)
    assert args.max_steps_per_epoch == settings.main_steps and args.pin_mem


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the machine without a GPU')
def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path, capsys):
    assert gpu_report.main(['--out', str(tmp_path / 'out'), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: no CUDA device is visible to torch') and '--dry-run' in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_child_limit_stop_line_and_failure(tmp_path):
    python = sys.executable
    status, seconds = gpu_report.run_child([python, '-c', 'import time; print("started", flush=True); time.sleep(60)'],
                                           2, tmp_path / 'slow.log', dict(os.environ), echo=False)
    assert status == 'timed out after 2 s' and seconds < 20
    assert 'started' in (tmp_path / 'slow.log').read_text()
    status, seconds = gpu_report.run_child(
        [python, '-c', 'import time; print("Epoch 0 FPS:12.50", flush=True); time.sleep(60)'], 30,
        tmp_path / 'fps.log', dict(os.environ), stop_after=r'Epoch \d+ FPS:', echo=False)
    assert status == 'ok' and seconds < 20
    status, _ = gpu_report.run_child([python, '-c', 'raise SystemExit(3)'], 30, tmp_path / 'fail.log',
                                     dict(os.environ), echo=False)
    assert status == 'failed (exit 3)'


def test_spent_budget_skips_steps_but_writes_the_report(tmp_path):
    steps = gpu_report.plan(gpu_report.DRY_RUN)
    code = gpu_report.run_plan(steps, gpu_report.DRY_RUN, dict(torch='x', device='cpu'), tmp_path, budget_s=5,
                               python=sys.executable, dry_run=True, echo=False)
    assert code == 0
    report = json.loads((tmp_path / 'report.json').read_text())
    assert [s['status'] for s in report['steps']] == ['skipped: budget used up'] * len(steps)
    assert '## Steps' in (tmp_path / 'report.md').read_text()


def _row(step, impl, mode, rate, **kw):
    row = dict(step=step, batch=128, channels_last=False, dtype='float16', cudnn_benchmark=False, compile=False,
               impl=impl, mode=mode, images_per_s=rate, step_ms=1.0, vs_plain=1.0)
    row.update(kw)
    return row


def test_report_ratios_targets_and_tables(tmp_path):
    rows = [_row('reference', 'plain', 'train', 800.0), _row('reference', 'plain', 'infer', 2800.0),
            _row('cl', 'triton', 'train', 2000.0, channels_last=True, dtype='bfloat16', vs_plain=1.6),
            _row('cl', 'triton', 'infer', 3000.0, channels_last=True, dtype='bfloat16'),
            _row('big', 'triton', 'train', 9000.0, batch=256)]  # another batch: not the target's
    profile = dict(rows[0], classes=[{'class': 'depthwise forward', 'ms': 12.5, 'share': 0.25,
                                      'top': [('conv_depthwise2d_forward_kernel', 12.5)]}])
    report = dict(settings=dict(model='van_b2', img_size=224, batch=128), environment=dict(torch='2.x', gpu='H200'),
                  started='now', dry_run=False, steps=[dict(name='reference', status='ok', seconds=30.0, question='q')],
                  rows=rows, profiles=[profile],
                  main_runs=[dict(name='main-reference', options=['--amp'], fps=750.0),
                             dict(name='main-best', options=['--amp', '--channels-last'], fps=2600.0)])
    json_path, md_path = gpu_report.write_report(report, tmp_path)
    saved = json.loads(json_path.read_text())
    met = {t['id']: (t['measured'], t['met']) for t in saved['targets']}
    assert met['main_fps'] == (2600.0, True)
    assert met['train_ratio'] == (2.5, True)
    assert met['infer_ratio'][0] == pytest.approx(3000 / 2800) and met['infer_ratio'][1] is False
    table = md_path.read_text()
    assert '| cl | 128 | channels_last | bfloat16 | off | no | triton | 2000.0 | 2.50x | 1.60x | 3000.0 | 1.07x |' in table
    assert '| depthwise forward | 12.50 | 25.0% | conv_depthwise2d_forward_kernel 12.50 |' in table
    assert '| main-best | `--amp --channels-last` | 2600.00 |' in table


@pytest.mark.parametrize('kernel,ops,weight,expected', [
    ('conv_depthwise2d_forward_kernel', ['aten::_conv_depthwise2d', 'aten::convolution'], (64, 1, 7, 7),
     step_profile.DEPTHWISE_FORWARD),
    ('conv_depthwise2d_grad_weight_kernel', ['aten::convolution_backward', 'ConvolutionBackward0'], (64, 1, 5, 5),
     step_profile.DEPTHWISE_WEIGHT_GRAD),
    ('conv_depthwise2d_backward_kernel', ['aten::convolution_backward'], (64, 1, 5, 5), step_profile.DEPTHWISE_INPUT_GRAD),
    ('sm90_xmma_dgrad_implicit_gemm_f16f16', ['aten::convolution_backward'], (64, 1, 3, 3),
     step_profile.DEPTHWISE_INPUT_GRAD),
    ('cudnn::wgrad_alg0_engine', ['aten::convolution_backward'], (64, 1, 3, 3), step_profile.DEPTHWISE_WEIGHT_GRAD),
    ('some_cudnn_kernel', ['aten::convolution_backward'], (64, 1, 3, 3), step_profile.DEPTHWISE_BACKWARD),
    ('sm90_xmma_fprop_implicit_gemm', ['aten::cudnn_convolution', 'aten::convolution'], (512, 64, 1, 1),
     step_profile.POINTWISE),
    ('sm90_xmma_fprop_implicit_gemm', ['aten::cudnn_convolution'], (64, 3, 7, 7), step_profile.DENSE_CONV),
    ('_conv_kernel', ['van_triton::dwconv', 'aten::something'], None, step_profile.DEPTHWISE_FORWARD),
    ('_conv_kernel', ['van_triton::dwconv_input_grad'], None, step_profile.DEPTHWISE_INPUT_GRAD),
    ('_conv_kernel', ['van_triton::dwconv_gelu_grad'], None, step_profile.DEPTHWISE_INPUT_GRAD),
    ('_weight_grad_kernel', ['van_triton::dwconv_weight_grad'], None, step_profile.DEPTHWISE_WEIGHT_GRAD),
    ('multi_tensor_apply_kernel', ['aten::_fused_adamw_', 'Optimizer.step#AdamW.step'], None, step_profile.OPTIMIZER),
    ('batch_norm_collect_statistics_kernel', ['aten::native_batch_norm'], None, step_profile.BATCH_NORM),
    ('triton_per_fused__native_batch_norm_legit_functional_1', ['CompiledFunction'], None, step_profile.BATCH_NORM),
    ('triton_poi_fused_add_gelu_mul_2', ['CompiledFunction'], None, step_profile.ELEMENTWISE),
    ('sm90_xmma_gemm_f16f16', ['aten::addmm', 'aten::linear'], None, step_profile.POINTWISE),
])
def test_kernel_classes(kernel, ops, weight, expected):
    assert step_profile.classify(kernel, ops, weight) == expected


def test_cpu_profile_of_a_training_step_is_split_into_classes():
    from models import VAN
    model = VAN(embed_dims=(16, 32, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), num_classes=4,
                lka_impl='plain')
    optimizer = torch.optim.AdamW(model.parameters())
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def step():
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    table = step_profile.breakdown(step_profile.profile_step(step, torch.device('cpu')))
    classes = {row['class'] for row in table}
    assert {step_profile.DEPTHWISE_FORWARD, step_profile.POINTWISE, step_profile.BATCH_NORM,
            step_profile.OPTIMIZER, step_profile.DENSE_CONV} <= classes
    assert sum(row['share'] for row in table) == pytest.approx(1.0)
    assert [row['ms'] for row in table] == sorted((row['ms'] for row in table), reverse=True)


@pytest.mark.slow
def test_dry_run_end_to_end_through_the_shell_script(tmp_path):
    """The driver script on CPU: benchmark rows, a profile, the synthetic data and main.py with the best row's
    options (a subset of the plan, to keep CI short; --list names them all)."""
    env = dict(os.environ, PYTHON=sys.executable)
    out = tmp_path / 'report'
    result = subprocess.run(['bash', 'tools/gpu_benchmark.sh', str(out), '--dry-run', '--quiet',
                             '--steps', 'reference,profile-reference,data,main-best'],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / 'report.json').read_text())
    assert [s['status'] for s in report['steps']] == ['ok'] * 4
    assert {(r['impl'], r['mode']) for r in report['rows'] if r['step'] == 'reference'} == {
        (impl, mode) for impl in ('plain', 'fast', 'polyphase') for mode in ('train', 'infer')}
    assert report['profiles'] and report['profiles'][0]['classes']
    (run,) = report['main_runs']
    assert run['fps'] > 0 and '--lka-impl' in run['options']
    assert 'DRY RUN' in (out / 'report.md').read_text()

"""utils/modelzoo.py: the ModelZoo summary, loss file and Final result block, made from a results file, are
field by field what test/common.sh made from main.py's log before (test/unit/golden/modelzoo)."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from utils import modelzoo
from utils.reporting import RunResults, epoch_record, read_results

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / 'golden' / 'modelzoo'

# The runs behind the golden files: what main.py's results file holds for the run whose log the stand-in
# trainer printed (test_launch_scripts.TRAIN_LOG / EVAL_LOG), at full precision: the log rounds them.
TRAINING = dict(
    losses=[2.310004, 2.249962, 1.900031, 1.543209],  # "Loss: 2.3100 ... 1.5432"
    epochs=[dict(fps=60.2471, loss=2.28, lr=1e-6, eval=dict(loss=2.15, top1=18.5, top5=58.0)),  # "FPS:60.25"
            dict(fps=63.9962, loss=1.7, lr=5e-4, eval=dict(loss=1.45, top1=55.27779, top5=94.167))],  # "FPS:64.00"
    best=(55.27779, 1))  # "*** Best metric: 55.278 (epoch 1)"
ODD_TRAINING = dict(TRAINING, losses=[2.31, 2.25, 1.9, 0.000712],  # "Loss: 0.0007"
                    epochs=[TRAINING['epochs'][0], dict(TRAINING['epochs'][1], fps=61.37218)])  # "FPS:61.37"
EVALUATION = dict(top1=83.49998, top5=98.9, loss=0.6104, images=360, skipped=0)  # "* Acc@1 83.500 ... Loss 0.610"
ODD_EVALUATION = dict(EVALUATION, top1=99.99911, loss=12.34571)  # "* Acc@1 99.999 ... Loss 12.346"

# golden folder: (kind, batch per device, ranks, run)
CASES = {
    'perf_1p': ('perf', 128, 1, TRAINING), 'perf_2p': ('perf', 128, 2, TRAINING),
    'perf_3p_odd': ('perf', 96, 3, ODD_TRAINING), 'acc_1p': ('acc', 32, 1, TRAINING),
    'acc_16p': ('acc', 128, 16, TRAINING), 'eval_1p': ('eval', 128, 1, EVALUATION),
    'eval_2p': ('eval', 128, 2, EVALUATION), 'eval_odd': ('eval', 7, 1, ODD_EVALUATION),
}


def write_results(path, kind, batch, ranks, run) -> Path:
    """The results file main.py writes for `run`, through the writer main.py uses."""
    results = RunResults(str(path), 'eval' if kind == 'eval' else 'train', 'van_base', ranks, batch)
    if kind == 'eval':
        results.set_evaluation(run)
        return path
    results.add_losses(run['losses'][:2])
    results.add_epoch(epoch_record(0, run['epochs'][0], run['epochs'][0]['eval']), (run['epochs'][0]['eval']['top1'], 0))
    results.add_losses(run['losses'][2:])
    results.add_epoch(epoch_record(1, run['epochs'][1], run['epochs'][1]['eval']), run['best'])
    results.finish()
    return path


def fields(path):
    return [tuple(line.split(' = ', 1)) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize('case', sorted(CASES))
def test_the_report_is_field_by_field_what_the_log_parsing_wrote(case, tmp_path, capsys):
    kind, batch, ranks, run = CASES[case]
    results = write_results(tmp_path / 'results.json', kind, batch, ranks, run)
    out = tmp_path / 'out'
    out.mkdir()
    summary = modelzoo.write_report(str(results), str(out), kind, 'VAN_Classification', batch, ranks, e2e_seconds=0)
    golden = GOLDEN / case
    (golden_summary,) = golden.glob('VAN_*.log')
    assert Path(summary).name == golden_summary.name
    expected = [(key, platform.machine() if key == 'DeviceType' else value) for key, value in fields(golden_summary)]
    assert dict(fields(golden_summary))['DeviceType'] == 'x86_64'  # the machine the golden files were made on
    assert fields(summary) == expected
    golden_losses = list(golden.glob('*_loss.txt'))
    assert sorted(p.name for p in out.glob('*_loss.txt')) == [p.name for p in golden_losses]
    for loss_file in golden_losses:
        assert (out / loss_file.name).read_text() == loss_file.read_text()
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == (golden / 'final_result.txt').read_text().splitlines()
    assert printed[-1] == f'Summary: {summary}'


def test_e2e_time_is_the_launchers_else_the_results_files(tmp_path):
    results = read_results(write_results(tmp_path / 'r.json', 'perf', 8, 1, TRAINING))
    assert dict(modelzoo.summary_fields(results, 'perf', 'Net', 8, 1, e2e_seconds=41.6))['E2ETrainingTime'] == '42'
    results['e2e_seconds'] = 7.2
    assert dict(modelzoo.summary_fields(results, 'perf', 'Net', 8, 1))['E2ETrainingTime'] == '7'


@pytest.mark.parametrize('kind, change, message', [
    ('perf', dict(epochs=[]), 'no finished epoch: training did not finish an epoch'),
    ('acc', dict(best=None), 'no best top-1: validation did not run'),
    ('eval', dict(evaluation=None), 'no evaluation result: the evaluation did not finish'),
])
def test_a_run_that_lacks_what_its_kind_reports_writes_no_summary(kind, change, message, tmp_path, capsys):
    path = write_results(tmp_path / 'results.json', kind, 8, 1, EVALUATION if kind == 'eval' else TRAINING)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    code = modelzoo.main(['report', '--results', str(path), '--out-dir', str(tmp_path), '--network', 'Net',
                          '--batch-size', '8', '--rank-size', '1', '--kind', kind])
    assert code == 1
    assert capsys.readouterr().err == f'error: {path}: {message} (no summary written)\n'
    assert not list(tmp_path.glob('Net_*'))


def test_a_missing_or_foreign_results_file_is_one_message(tmp_path, capsys):
    for path, what in ((tmp_path / 'absent.json', 'cannot read the results file'),
                       (tmp_path / 'other.json', 'is not a results file')):
        if path.name == 'other.json':
            path.write_text('{"epochs": []}')
        assert modelzoo.main(['report', '--results', str(path), '--out-dir', str(tmp_path), '--network', 'Net',
                              '--batch-size', '8', '--rank-size', '1', '--kind', 'perf']) == 1
        assert what in capsys.readouterr().err


def test_case_names_of_each_kind():
    assert modelzoo.case_name('VAN_Classification', 128, 8, 'perf') == 'VAN_Classification_bs128_8p_perf'
    assert modelzoo.case_name('VAN_Classification', 16, 2, 'acc') == 'VAN_Classification_bs16_2p_acc'
    assert modelzoo.case_name('VAN_Classification', 16, 2, 'eval') == 'VAN_Classification_bs16_2p_acc'
    with pytest.raises(ValueError):
        modelzoo.case_name('VAN_Classification', 16, 2, 'train')


@pytest.mark.parametrize('case', sorted(CASES))
def test_the_ci_check_accepts_every_golden_summary(case, tmp_path):
    kind, batch, ranks, _ = CASES[case]
    (golden_summary,) = (GOLDEN / case).glob('VAN_*.log')
    summary = tmp_path / golden_summary.name
    summary.write_text(golden_summary.read_text().replace('x86_64', platform.machine()))
    assert modelzoo.check_summary(str(summary), kind, batch, ranks)['CaseName'] == summary.stem


@pytest.mark.parametrize('edit, message', [
    (lambda s: s.replace('ActualFPS = 64.00', 'ActualFPS = 32.00'), 'TrainingTime'),
    (lambda s: s.replace('RankSize = 1', 'RankSize = 2'), 'RankSize'),
    (lambda s: s.replace('ActualLoss = 1.5432\n', ''), 'fields'),
    (lambda s: s.replace('ActualLoss = 1.5432', 'ActualLoss = nan'), 'non-finite'),
])
def test_the_ci_check_rejects_a_wrong_summary(edit, message, tmp_path):
    golden = (GOLDEN / 'perf_1p' / 'VAN_Classification_bs128_1p_perf.log').read_text()
    summary = tmp_path / 'VAN_Classification_bs128_1p_perf.log'
    summary.write_text(edit(golden.replace('x86_64', platform.machine())))
    with pytest.raises(AssertionError, match=message):
        modelzoo.check_summary(str(summary), 'perf', 128, 1)


def test_the_command_line_runs_without_torch_in_a_fresh_interpreter(tmp_path):
    # The launch scripts call it once per run: it must start fast and need nothing heavy.
    results = write_results(tmp_path / 'results.json', 'perf', 4, 2, TRAINING)
    argv = ['modelzoo', 'report', '--results', str(results), '--out-dir', str(tmp_path), '--network', 'N',
            '--batch-size', '4', '--rank-size', '2', '--kind', 'perf']
    code = f'import sys, runpy; sys.argv = {argv!r}\ntry:\n    runpy.run_module("utils.modelzoo", run_name="__main__")\n' \
           'except SystemExit:\n    pass\nassert "torch" not in sys.modules, "utils.modelzoo imported torch"\n'
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'Final Performance images/sec : 64.00' in result.stdout and (tmp_path / 'N_bs4_2p_perf.log').is_file()

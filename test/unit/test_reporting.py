"""utils/reporting.py: the end of a training run (RunReport.finish): results file, curves and the last log lines."""
import json
import logging

from utils.reporting import RunReport, RunResults

LOGGER = logging.getLogger('test-reporting')


def finish(tmp_path, caplog, is_main, best, ema_file=None):
    results = RunResults(str(tmp_path / 'results.json') if is_main else None, 'train', 'van_b0', 2, 4, LOGGER)
    report = RunReport.for_run(str(tmp_path), is_main, LOGGER, results=results)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='test-reporting'):
        report.finish(best, str(tmp_path), LOGGER, ema_file=ema_file)
    return caplog.messages


def test_rank_0_finishes_the_results_file_draws_curves_and_ends_with_the_best_metric(tmp_path, caplog):
    lines = finish(tmp_path, caplog, True, (55.27779, 1), ema_file='model_best.pth.tar')
    assert 'curves.png' in lines[0] or lines[0].startswith('training curves: ')
    assert lines[1].startswith("best metric: the EMA weights' (state_dict_ema in model_best.pth.tar;")
    assert lines[2:] == ['*** Best metric: 55.278 (epoch 1)']
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['finished'] and results['best'] == dict(top1=55.27779, epoch=1)


def test_other_ranks_only_log_the_best_metric_and_write_nothing(tmp_path, caplog):
    assert finish(tmp_path, caplog, False, (40.0, 0)) == ['*** Best metric: 40.000 (epoch 0)']
    assert list(tmp_path.iterdir()) == []


def test_without_a_best_metric_there_is_no_best_line(tmp_path, caplog):
    lines = finish(tmp_path, caplog, True, None, ema_file='model_best.pth.tar')
    assert len(lines) == 1 and 'Best metric' not in lines[0] and 'best metric' not in lines[0]
    assert json.loads((tmp_path / 'results.json').read_text())['best'] is None

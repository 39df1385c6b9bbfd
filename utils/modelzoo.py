"""The Ascend ModelZoo report of a launch-script run (test/*.sh), made from main.py's results file.

ModelZoo automation reads, in test/output/<device id>/:
  <CaseName>.log               "key = value" lines, in this order: Network, RankSize, BatchSize,
                               DeviceType, CaseName, ActualFPS and TrainingTime (training runs),
                               TrainAccuracy (acc and eval runs), ActualLoss, E2ETrainingTime
  train_<CaseName>_loss.txt    the loss of every logged training line, one a line (training runs)
and the "Final result" block on stdout. The numbers come from the results file (utils.reporting,
--results), written as main.py's log lines show them: FPS with 2 decimals, training losses with 4,
accuracies and the evaluation loss with 3. So the log's format can change without touching the
report, and the report is what the log says. The fields, per kind of run:
  perf  ActualFPS (the last epoch's), TrainingTime (ms per step: batch x ranks x 1000 / ActualFPS,
        the FPS as reported), ActualLoss (the last logged training loss)
  acc   as perf, plus TrainAccuracy: the best top-1 of the run
  eval  TrainAccuracy: the evaluation's top-1; ActualLoss: its loss
CaseName is <Network>_bs<batch per device>_<ranks>p_<perf|acc> (evaluation is an acc case).
E2ETrainingTime is the launcher's wall time in seconds (interpreter and torchrun start included),
the results file's own e2e_seconds when not given.

The launch scripts call it through its command line (utils.launcher names the case and gives the
arguments), as does .ci/run to check a summary:
    python -m utils.modelzoo report --results R.json --out-dir DIR --network N --batch-size B --rank-size R
                                    --kind perf|acc|eval [--e2e-time SECONDS]
    python -m utils.modelzoo check SUMMARY.log --batch-size B --rank-size R --kind perf|acc|eval
A run that did not produce what its kind reports (no finished epoch, no validation) is one `error:`
line and exit status 1, and no summary is written.
"""
import argparse
import math
import os
import platform
import sys
from typing import List, Optional, Sequence, Tuple

from utils.reporting import read_results

KINDS = ('perf', 'acc', 'eval')
FIXED_FIELDS = ('Network', 'RankSize', 'BatchSize', 'DeviceType', 'CaseName')
FINAL_RESULT = '------------------ Final result ------------------'
# How the values are written: as main.py's log lines show them.
FPS_FORMAT, TRAIN_LOSS_FORMAT, ACCURACY_FORMAT, EVAL_LOSS_FORMAT, STEP_TIME_FORMAT = \
    '{:.2f}', '{:.4f}', '{:.3f}', '{:.3f}', '{:.2f}'


class ReportError(Exception):
    """The results file does not hold what this kind of run reports; the message says what is missing."""


def case_name(network: str, batch_size: int, rank_size: int, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {", ".join(KINDS)}, not {kind!r}')
    return f'{network}_bs{batch_size}_{rank_size}p_{"perf" if kind == "perf" else "acc"}'


def field_names(kind: str) -> List[str]:
    """The summary's keys, in order, for a kind of run."""
    measured = {'perf': ['ActualFPS', 'TrainingTime'], 'acc': ['ActualFPS', 'TrainingTime', 'TrainAccuracy'],
                'eval': ['TrainAccuracy']}[kind]
    return [*FIXED_FIELDS, *measured, 'ActualLoss', 'E2ETrainingTime']


def loss_lines(results: dict) -> List[str]:
    """The training losses as the loss file holds them."""
    return [TRAIN_LOSS_FORMAT.format(loss) for loss in results['train_losses']]


def summary_fields(results: dict, kind: str, network: str, batch_size: int, rank_size: int,
                   e2e_seconds: Optional[float] = None, device_type: Optional[str] = None) -> List[Tuple[str, str]]:
    """(key, value) pairs of the summary, in field_names order; ReportError when the run lacks a value."""
    values = {'Network': network, 'RankSize': str(rank_size), 'BatchSize': str(batch_size),
              'DeviceType': device_type or platform.machine(), 'CaseName': case_name(network, batch_size, rank_size, kind)}
    if kind == 'eval':
        evaluation = results.get('evaluation')
        if not evaluation:
            raise ReportError('no evaluation result: the evaluation did not finish')
        values['TrainAccuracy'] = ACCURACY_FORMAT.format(evaluation['top1'])
        values['ActualLoss'] = EVAL_LOSS_FORMAT.format(evaluation['loss'])
    else:
        epochs = [e for e in results.get('epochs') or [] if e.get('fps') is not None]
        if not epochs or not results.get('train_losses'):
            raise ReportError('no finished epoch: training did not finish an epoch')
        fps = FPS_FORMAT.format(epochs[-1]['fps'])
        values['ActualFPS'] = fps
        values['TrainingTime'] = STEP_TIME_FORMAT.format(batch_size * rank_size * 1000 / float(fps))
        values['ActualLoss'] = loss_lines(results)[-1]
        if kind == 'acc':
            if not results.get('best'):
                raise ReportError('no best top-1: validation did not run')
            values['TrainAccuracy'] = ACCURACY_FORMAT.format(results['best']['top1'])
    seconds = results.get('e2e_seconds') if e2e_seconds is None else e2e_seconds
    values['E2ETrainingTime'] = str(int(round(seconds or 0)))
    return [(key, values[key]) for key in field_names(kind)]


def final_result(fields: Sequence[Tuple[str, str]]) -> List[str]:
    """The "Final result" block the launch scripts print."""
    values = dict(fields)
    lines = [FINAL_RESULT]
    if 'ActualFPS' in values:
        lines.append(f'Final Performance images/sec : {values["ActualFPS"]}')
    if 'TrainAccuracy' in values:
        lines.append(f'Final Train Accuracy : {values["TrainAccuracy"]}')
    lines.append(f'E2E Training Duration sec : {values["E2ETrainingTime"]}')
    return lines


def write_report(results_path: str, out_dir: str, kind: str, network: str, batch_size: int, rank_size: int,
                 e2e_seconds: Optional[float] = None) -> str:
    """Print the Final result block and write the summary (and for training the loss file) into out_dir;
    returns the summary's path. ReportError (nothing written) when the run lacks a value."""
    try:
        results = read_results(results_path)
    except ValueError as error:
        raise ReportError(f'{error}; main.py did not finish') from None
    try:
        fields = summary_fields(results, kind, network, batch_size, rank_size, e2e_seconds)
    except ReportError as error:
        raise ReportError(f'{results_path}: {error}') from None
    name = dict(fields)['CaseName']
    print('\n'.join(final_result(fields)))
    if kind != 'eval':
        _write_lines(os.path.join(out_dir, f'train_{name}_loss.txt'), loss_lines(results))
    summary = os.path.join(out_dir, f'{name}.log')
    _write_lines(summary, [f'{key} = {value}' for key, value in fields])
    print(f'Summary: {summary}')
    return summary


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, 'w') as f:
        f.write(''.join(line + '\n' for line in lines))


def check_summary(path: str, kind: str, batch_size: int, rank_size: int) -> dict:
    """The summary's fields after checking every one (CI): the order, the case, finite values in sane ranges
    and TrainingTime agreeing with ActualFPS. AssertionError naming the file and the field otherwise."""
    with open(path) as f:
        fields = dict(line.split(' = ', 1) for line in f.read().splitlines())
    assert list(fields) == field_names(kind), f'{path}: fields {list(fields)}, expected {field_names(kind)}'
    expected = {'RankSize': str(rank_size), 'BatchSize': str(batch_size), 'DeviceType': platform.machine(),
                'CaseName': case_name(fields['Network'], batch_size, rank_size, kind)}
    for key, value in expected.items():
        assert fields[key] == value, f'{path}: {key} = {fields[key]!r}, expected {value!r}'
    number = {k: float(v) for k, v in fields.items() if k not in FIXED_FIELDS}
    assert all(math.isfinite(v) for v in number.values()), f'{path}: non-finite value in {number}'
    if kind != 'eval':
        assert number['ActualFPS'] > 0 and number['TrainingTime'] > 0, f'{path}: {number}'
        step_ms = batch_size * rank_size * 1000 / number['ActualFPS']
        assert abs(number['TrainingTime'] - step_ms) < 0.01 * step_ms + 0.01, f'{path}: TrainingTime {number}'
    if kind != 'perf':
        assert 0 <= number['TrainAccuracy'] <= 100, f'{path}: TrainAccuracy {number}'
    assert 0 < number['ActualLoss'] < 50, f'{path}: ActualLoss {number}'
    assert 0 <= number['E2ETrainingTime'] < 3600, f'{path}: E2ETrainingTime {number}'
    return fields


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m utils.modelzoo', description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    report = commands.add_parser('report', help='print the Final result block, write the summary and loss file')
    check = commands.add_parser('check', help='check every field of a summary (CI)')
    check.add_argument('summary')
    report.add_argument('--results', required=True)
    report.add_argument('--out-dir', required=True)
    report.add_argument('--e2e-time', type=float, default=None, help='seconds (default: the results file\'s)')
    report.add_argument('--network', required=True)
    for command in (report, check):
        command.add_argument('--batch-size', type=int, required=True)
        command.add_argument('--rank-size', type=int, required=True)
        command.add_argument('--kind', choices=KINDS, required=True)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == 'report':
        try:
            write_report(args.results, args.out_dir, args.kind, args.network, args.batch_size, args.rank_size,
                         args.e2e_time)
        except ReportError as error:
            print(f'error: {error} (no summary written)', file=sys.stderr)
            return 1
    else:
        fields = check_summary(args.summary, args.kind, args.batch_size, args.rank_size)
        print(f'summary ok: {args.summary}: ' + ', '.join(f'{k}={v}' for k, v in fields.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())

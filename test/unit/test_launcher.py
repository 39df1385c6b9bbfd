"""utils/launcher.py: the launch scripts' own options, their rules and the shell code test/common.sh evals.

The scripts themselves (through test/common.sh) are tested in test_launch_scripts.py; these tests call the
parser directly and check what bash makes of its output."""
import subprocess
import sys
from pathlib import Path

import pytest

from utils.errors import LaunchOptionError, UserError
from utils.launcher import SCRIPT_OPTIONS, VARIABLES, launch_plan, main, parse_script_args, shell_code, usage

REPO = Path(__file__).resolve().parents[2]
# test/common.sh's defaults, with an 8p script's values of the torchrun options.
DEFAULTS = dict(Network='VAN_Classification', model='van_base', batch_size='128', amp='1', epochs='1',
                cooldown_epochs='', device='auto', device_id='', nproc='8', nnodes='1', node_rank='0', master_addr='',
                master_port='29500', data_path='', pth_path='', output_root='', experiment='')


def plan(args, mode='1p', kind='perf', environ=None, **kwargs):
    return launch_plan(mode, kind, args, DEFAULTS, caller_dir='/caller', environ=environ or {}, **kwargs)


def test_the_defaults_cover_every_variable_and_every_option_sets_one():
    assert set(DEFAULTS) == set(VARIABLES)
    assert set(SCRIPT_OPTIONS.values()) < set(VARIABLES)


def test_without_arguments_the_defaults_are_the_plan():
    values = plan([])
    assert {k: values[k] for k in VARIABLES} == DEFAULTS
    assert values['extra_args'] == [] and values['rank_size'] == '1'
    assert values['CaseName'] == 'VAN_Classification_bs128_1p_perf'
    assert values['modelzoo_case'] == ['--network', 'VAN_Classification', '--batch-size', '128', '--rank-size', '1',
                                       '--kind', 'perf']


def test_positional_dir_and_file_are_data_and_weights_made_absolute_against_the_callers_directory():
    values = plan(['data/digits', 'w.pth'], kind='eval')
    assert (values['data_path'], values['pth_path']) == ('/caller/data/digits', '/caller/w.pth')
    values = plan(['/data/imagenet'])
    assert (values['data_path'], values['pth_path']) == ('/data/imagenet', '')  # FILE is optional
    # a positional path comes first and wins over the option after it
    assert plan(['a', '--data_path=b', '--output=out'])['data_path'] == '/caller/a'
    assert plan(['--data_path=b', '--output=out'])['output_root'] == '/caller/out'


@pytest.mark.parametrize('args', [
    ['--model=van_b0', '--batch-size=32'], ['--model', 'van_b0', '--batch-size', '32'], ['--model', 'van_b0', '-b32'],
    ['--model=van_b0', '-b', '32'], ['--model=van_b0', '--batch_size', '32'],
])
def test_name_equals_value_name_space_value_and_short_b_all_set_the_option(args):
    values = plan(args)
    assert (values['model'], values['batch_size'], values['extra_args']) == ('van_b0', '32', [])
    assert values['CaseName'] == 'VAN_Classification_bs32_1p_perf'


def test_aliases_set_the_same_variable():
    for option in ('--pth_path', '--pth-path', '--ckpt_path', '--pretrained'):
        assert plan([f'{option}=/w.pth'])['pth_path'] == '/w.pth'
    values = plan(['--data-path', '/d', '--device-id', '3'])
    assert (values['data_path'], values['device_id']) == ('/d', '3')
    assert plan(['--nproc_per_node=2', '--node-rank=1', '--nnodes=2', '--master-addr=n0'], mode='8p')['rank_size'] == '4'


def test_other_options_pass_through_unchanged_with_their_bare_values():
    args = ['--scale', '0.5', '1', '--lr=2e-3', '--channels-last', '--mean', '0.5', '0.5', '0.5', '--workers=3',
            '-j', '2', '--img-size', '64', '--data_path=d']
    values = plan(args)
    assert values['extra_args'] == args[:-1] and values['data_path'] == '/caller/d'
    # an option with its value after '=' takes no bare word: the word after it is out of place
    with pytest.raises(LaunchOptionError, match="unexpected argument 'stray'"):
        plan(['--lr=2e-3', 'stray'])


def test_amp_and_no_amp_switch_amp_last_one_wins():
    assert plan(['--no-amp'])['amp'] == '0'
    assert plan(['--no-amp', '--amp'])['amp'] == '1'
    assert plan(['--amp', '--no-amp'])['extra_args'] == []


def test_1p_takes_the_device_id_from_the_environment_unless_given():
    assert plan([], environ={'ASCEND_DEVICE_ID': '3'})['device_id'] == '3'
    assert plan(['--device_id=5'], environ={'ASCEND_DEVICE_ID': '3'})['device_id'] == '5'
    assert plan([])['device_id'] == ''


def test_8p_counts_processes_times_nodes_and_leaves_the_environments_device_id_alone():
    values = plan([], mode='8p', environ={'ASCEND_DEVICE_ID': '3'})
    assert (values['device_id'], values['rank_size'], values['CaseName']) == ('', '8', 'VAN_Classification_bs128_8p_perf')
    values = plan(['--nproc=2', '--nnodes=2', '--node_rank=1', '--master_addr=node0', '--master_port=29600'], mode='8p',
                  kind='acc')
    assert (values['nproc'], values['nnodes'], values['node_rank'], values['master_addr'], values['master_port']) == \
        ('2', '2', '1', 'node0', '29600')
    assert values['rank_size'] == '4' and values['CaseName'] == 'VAN_Classification_bs128_4p_acc'
    assert plan(['--nproc=08'], mode='8p')['nproc'] == '8'  # a decimal number, also for bash's arithmetic


@pytest.mark.parametrize('mode, kind, args, message', [
    ('1p', 'perf', ['--data_path='], '--data_path= is empty; give a value or leave the option out'),
    ('1p', 'perf', ['--data_path'], '--data_path needs a value'),
    ('1p', 'perf', ['--model', '--amp'], '--model needs a value'),
    ('1p', 'perf', ['--model', ''], '--model needs a value'),
    ('1p', 'perf', ['--amp=1'], '--amp takes no value (--amp or --no-amp turns AMP on or off)'),
    ('1p', 'perf', ['--no-amp='], '--no-amp takes no value'),
    ('1p', 'perf', ['--eval'], '--eval is chosen by the script: use train_eval_1p.sh / train_eval_8p.sh'),
    ('1p', 'perf', ['--data_path=d', 'stray'],
     "unexpected argument 'stray': positional DIR [FILE] must come before options (see --help)"),
    ('1p', 'perf', ['a', 'b', 'c'], 'too many positional arguments: a b c (expected DIR [FILE])'),
    ('1p', 'perf', ['--nproc=2'], '--nproc is for the 8p scripts; this 1p script runs one process'),
    ('1p', 'perf', ['--master-port', '1'], '--master-port is for the 8p scripts'),
    ('1p', 'perf', ['--device_id=x'], "--device_id must be an integer >= 0, got 'x'"),
    ('1p', 'perf', ['--device_id=-1'], "--device_id must be an integer >= 0, got '-1'"),
    ('1p', 'perf', ['--device_id', '-1'], '--device_id needs a value'),  # the next word looks like an option
    ('8p', 'perf', ['--device_id=1'], '--device_id is for the 1p scripts; 8p runs use local ranks 0..nproc-1'),
    ('8p', 'perf', ['--nproc=0'], "--nproc must be an integer >= 1, got '0'"),
    ('8p', 'perf', ['--nnodes=two'], "--nnodes must be an integer >= 1, got 'two'"),
    ('8p', 'perf', ['--node_rank=1.5'], "--node_rank must be an integer >= 0, got '1.5'"),
    ('8p', 'perf', ['--master_port=0'], "--master_port must be an integer >= 1, got '0'"),
    ('8p', 'perf', ['--nnodes=2', '--node_rank=2', '--master_addr=n0'], '--node_rank=2 must be below --nnodes=2'),
    ('8p', 'acc', ['--nnodes=2'], '--nnodes=2 needs --master_addr=<address of node 0>'),
    ('8p', 'eval', ['data'], '--pth_path=FILE is required: the checkpoint to evaluate'),
])
def test_each_rule_has_its_one_line_message(mode, kind, args, message):
    with pytest.raises(LaunchOptionError) as error:
        plan(args, mode=mode, kind=kind)
    assert str(error.value).startswith(message) and '\n' not in str(error.value)
    assert isinstance(error.value, UserError)


def test_a_fine_tuning_script_needs_the_weights_to_start_from():
    with pytest.raises(LaunchOptionError, match='^--pth_path=FILE is required: the checkpoint to start from$'):
        plan(['--data_path=d'], kind='acc', pth_required=True)
    assert plan(['d', 'w.pth'], kind='acc', pth_required=True)['pth_path'] == '/caller/w.pth'


def test_the_device_id_from_the_environment_is_checked_too():
    with pytest.raises(LaunchOptionError, match="--device_id must be an integer >= 0, got 'npu0'"):
        plan([], environ={'ASCEND_DEVICE_ID': 'npu0'})


def test_help_wins_over_what_follows_but_not_over_an_earlier_error():
    assert plan(['--help']) is None and plan(['--data_path=d', '-h', '--eval']) is None
    assert parse_script_args(['-h'], DEFAULTS) is None
    with pytest.raises(LaunchOptionError, match='--eval'):
        plan(['--eval', '--help'])


def test_the_options_are_read_over_the_given_defaults():
    values = launch_plan('1p', 'acc', [], dict(DEFAULTS, epochs='300', model='van_b0'), environ={})
    assert (values['epochs'], values['model']) == ('300', 'van_b0')


# --- the command line and the shell code bash evals -------------------------------------------------------

def run_cli(*args, defaults=DEFAULTS):
    command = [sys.executable, '-m', 'utils.launcher', *args[:2], '--script', 'train_x.sh', '--caller-dir', '/caller',
               *[f'{k}={v}' for k, v in defaults.items()], '--', *args[2:]]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def bash_values(shell, names):
    """What bash holds in `names` (arrays whole) after evaluating `shell`: one list per name."""
    script = shell + '\n' + ''.join(f'printf "%s\\0" "${{{name}[@]}}"; printf "\\1\\0"\n' for name in names)
    out = subprocess.run(['bash', '-c', script], capture_output=True, text=True, timeout=30, check=True).stdout
    return [[word for word in group.split('\0') if word] for group in out.split('\1\0')][:len(names)]


def test_bash_gets_every_value_exactly_even_with_quotes_spaces_and_dollars(tmp_path):
    marker = tmp_path / 'ran'
    tricky = ["it's a dir", '$(touch ' + str(marker) + ')', 'a"b', 'back\\slash', 'new\nline', '*', '`id`']
    result = run_cli('1p', 'acc', f'--data_path={tricky[0]}', f'--model={tricky[1]}', '--extra', *tricky[2:],
                     '--experiment', 'run 1')
    assert result.returncode == 0, result.stderr
    data_path, model, extra_args, experiment = bash_values(result.stdout, ['data_path', 'model', 'extra_args',
                                                                           'experiment'])
    assert data_path == ["/caller/it's a dir"] and model == [tricky[1]] and experiment == ['run 1']
    assert extra_args == ['--extra', *tricky[2:]]
    assert not marker.exists()  # quoted, never run


def test_the_shell_code_is_one_assignment_per_value():
    code = shell_code({'a': "x y", 'b': ['1', "it's"], 'c': ''})
    assert code.splitlines() == ["a='x y'", """b=(1 'it'"'"'s')""", "c=''"]
    assert bash_values(code, ['a', 'b']) == [['x y'], ['1', "it's"]]


def test_a_wrong_argument_is_one_error_line_and_status_2():
    result = run_cli('8p', 'perf', '--nnodes=2')
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr == 'error: --nnodes=2 needs --master_addr=<address of node 0>\n'


def test_help_is_shell_code_that_prints_the_usage_and_exits_0():
    result = run_cli('1p', 'eval', '--help')
    assert result.returncode == 0
    shown = subprocess.run(['bash', '-c', result.stdout + '\necho not reached'], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0 and shown.stdout == usage('train_x.sh') + '\n'
    assert shown.stdout.startswith('usage: bash test/train_x.sh [--data_path=DIR] [--pth_path=FILE|DIR]')


def test_the_launcher_refuses_defaults_that_miss_a_variable(capsys):
    with pytest.raises(SystemExit) as stop:
        main(['1p', 'perf', '--script', 's.sh', '--caller-dir', '/c', 'model=van_b0', '--'])
    assert stop.value.code == 2 and 'NAME=DEFAULT once for each of Network, model' in capsys.readouterr().err


def test_the_launcher_runs_without_torch_in_a_fresh_interpreter():
    # Every launch script starts with it: it must start fast and need nothing heavy.
    code = 'import sys, runpy; sys.argv = ["launcher", "1p", "perf", "--script", "s.sh", "--caller-dir", "/c", ' \
           f'*{[f"{k}={v}" for k, v in DEFAULTS.items()]!r}, "--"]\ntry:\n' \
           '    runpy.run_module("utils.launcher", run_name="__main__")\nexcept SystemExit:\n    pass\n' \
           'assert "torch" not in sys.modules, "utils.launcher imported torch"\n'
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "CaseName=VAN_Classification_bs128_1p_perf" in result.stdout.splitlines()

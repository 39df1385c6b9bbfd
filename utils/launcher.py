"""The launch scripts' own options (test/train_*.sh): which they read, their rules, and the values the
script runs with; test/common.sh hands its arguments here and evals the answer.

A launch script reads a few options itself and passes every other one to main.py unchanged, with the
bare words after it (some take several values: --scale 0.5 1). Its own options are SCRIPT_OPTIONS:
the data and weights paths, the device, what names the ModelZoo case (model, batch size) or the run
(epochs, output, experiment), and the torchrun layout of the 8p scripts. Their rules:
  - an option takes --name=value or --name value (-b32 too), and an empty value is refused;
  - positional DIR [FILE] (--data_path [--pth_path]) come before any option; paths are made absolute
    against the caller's directory (the script runs from the repo);
  - --amp / --no-amp take no value; --eval is the evaluation scripts' to choose;
  - a 1p script runs one process: the torchrun options are refused, --device_id (default
    $ASCEND_DEVICE_ID) must be an integer >= 0; an 8p script refuses --device_id, and takes
    --nproc, --nnodes, --master_port >= 1 and --node_rank >= 0 below --nnodes, with --master_addr
    when there are several nodes;
  - evaluation and fine-tuning (pth_required) start from the weights they are given: --pth_path.
Everything main.py takes (paths, values) main.py checks; these rules are only the script's own.

test/common.sh runs
    python -m utils.launcher <1p|8p> <perf|acc|eval> --script NAME --caller-dir DIR [--pth-required]
                             NAME=DEFAULT... -- SCRIPT ARGUMENTS...
with the default of every variable in VARIABLES, and evals what it prints: one shell assignment per
variable, plus extra_args (main.py's options), rank_size, CaseName and modelzoo_case (the arguments of
`python -m utils.modelzoo`); for --help, the usage and `exit 0`. A wrong argument is one `error:` line
on stderr and exit status 2, before anything has run.
"""
import argparse
import os
import re
import shlex
import sys
from typing import Dict, List, Mapping, Optional, Sequence

from utils.errors import LaunchOptionError
from utils.modelzoo import KINDS, case_name

__all__ = ['MODES', 'SCRIPT_OPTIONS', 'VARIABLES', 'usage', 'parse_script_args', 'launch_plan', 'shell_code']

MODES = ('1p', '8p')
# The options the script itself uses, and the variable each sets; all others go to main.py unchanged.
SCRIPT_OPTIONS = {
    '--data_path': 'data_path', '--data-path': 'data_path', '--pth_path': 'pth_path', '--pth-path': 'pth_path',
    '--ckpt_path': 'pth_path', '--pretrained': 'pth_path', '--device': 'device', '--device_id': 'device_id',
    '--device-id': 'device_id', '--model': 'model', '--batch-size': 'batch_size', '--batch_size': 'batch_size',
    '-b': 'batch_size', '--epochs': 'epochs', '--cooldown-epochs': 'cooldown_epochs', '--output': 'output_root',
    '--experiment': 'experiment', '--nproc': 'nproc', '--nproc_per_node': 'nproc', '--nnodes': 'nnodes',
    '--node_rank': 'node_rank', '--node-rank': 'node_rank', '--master_addr': 'master_addr',
    '--master-addr': 'master_addr', '--master_port': 'master_port', '--master-port': 'master_port',
}
MULTI_NODE_VARIABLES = ('nproc', 'nnodes', 'node_rank', 'master_addr', 'master_port')  # 8p only
# The launcher's variables, whose defaults test/common.sh (and the script) set: those of SCRIPT_OPTIONS,
# amp (1 or 0) and the ModelZoo network name.
VARIABLES = ('Network', 'model', 'batch_size', 'amp', 'epochs', 'cooldown_epochs', 'device', 'device_id', 'nproc',
             'nnodes', 'node_rank', 'master_addr', 'master_port', 'data_path', 'pth_path', 'output_root', 'experiment')
INTEGER_MINIMUMS_8P = (('--nproc', 'nproc', 1), ('--nnodes', 'nnodes', 1), ('--node_rank', 'node_rank', 0),
                       ('--master_port', 'master_port', 1))


def usage(script: str) -> str:
    return f"""\
usage: bash test/{script} [--data_path=DIR] [--pth_path=FILE|DIR] [--device=auto|npu|cuda|cpu]
       [--device_id=N (1p)] [--nproc=N --nnodes=N --node_rank=N --master_addr=HOST --master_port=N (8p)]
       [--workers=N] [--no-amp] [any main.py option, e.g. --model=van_b0 --batch-size=32 --img-size=64]
  Options take --name=value or --name value. Positional DIR [FILE] are --data_path [--pth_path].
  Without --data_path the demo dataset (scikit-learn digits, data/demo) is created and used."""


def _split_option(arg: str):
    """(name, value or None) of an option word; None for a positional word."""
    if arg.startswith('--') and '=' in arg:
        return tuple(arg.split('=', 1))
    if arg.startswith('-b') and len(arg) > 2:  # -b32
        return '-b', arg[2:]
    return (arg, None) if arg.startswith('-') else None


def parse_script_args(args: Sequence[str], defaults: Mapping[str, str]) -> Optional[dict]:
    """The script's arguments read over `defaults` (VARIABLES): a dict of the variables plus 'positional',
    'extra_args' (main.py's options with their bare values) and 'multi_node' (the torchrun options given);
    None for -h/--help. LaunchOptionError for an argument that breaks a rule of its own."""
    values = dict(defaults, positional=[], extra_args=[], multi_node=[])
    words, seen_option = list(args), False
    while words:
        arg = words.pop(0)
        if arg in ('-h', '--help'):
            return None
        option = _split_option(arg)
        if option is None:
            if seen_option:
                raise LaunchOptionError(f"unexpected argument '{arg}': positional DIR [FILE] must come before "
                                        'options (see --help)')
            values['positional'].append(arg)
            continue
        seen_option = True
        name, value = option
        if name in ('--amp', '--no-amp'):
            if value is not None:
                raise LaunchOptionError(f'{name} takes no value (--amp or --no-amp turns AMP on or off)')
            values['amp'] = '1' if name == '--amp' else '0'
            continue
        if name == '--eval':
            raise LaunchOptionError('--eval is chosen by the script: use train_eval_1p.sh / train_eval_8p.sh')
        variable = SCRIPT_OPTIONS.get(name)
        if variable is None:  # main.py's, with every bare word after it
            values['extra_args'].append(arg)
            while value is None and words and not words[0].startswith('-'):
                values['extra_args'].append(words.pop(0))
            continue
        if value is None:  # the value is the next word
            if not words or not words[0] or words[0].startswith('-'):
                raise LaunchOptionError(f'{name} needs a value')
            value = words.pop(0)
        if not value:
            raise LaunchOptionError(f'{name}= is empty; give a value or leave the option out')
        values[variable] = value
        if variable in MULTI_NODE_VARIABLES:
            values['multi_node'].append(name)
    return values


def _abspath(path: str, caller_dir: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.join(caller_dir, path)


def _integer(option: str, value: str, minimum: int) -> int:
    if not re.fullmatch('[0-9]+', value) or int(value) < minimum:
        raise LaunchOptionError(f"{option} must be an integer >= {minimum}, got '{value}'")
    return int(value)


def _check_processes(mode: str, values: dict, multi_node: List[str], environ: Mapping[str, str]) -> int:
    """Check the options of the processes (device id, or the torchrun layout) and return how many run."""
    if mode == '1p':
        if multi_node:
            raise LaunchOptionError(f'{multi_node[0]} is for the 8p scripts; this 1p script runs one process')
        values['device_id'] = values['device_id'] or environ.get('ASCEND_DEVICE_ID', '')
        if values['device_id']:
            _integer('--device_id', values['device_id'], 0)
        return 1
    if values['device_id']:
        raise LaunchOptionError('--device_id is for the 1p scripts; 8p runs use local ranks 0..nproc-1')
    for option, variable, minimum in INTEGER_MINIMUMS_8P:  # as decimal numbers, for bash's arithmetic too
        values[variable] = str(_integer(option, values[variable], minimum))
    nproc, nnodes, node_rank = (int(values[variable]) for variable in ('nproc', 'nnodes', 'node_rank'))
    if node_rank >= nnodes:
        raise LaunchOptionError(f'--node_rank={values["node_rank"]} must be below --nnodes={values["nnodes"]}')
    if nnodes != 1 and not values['master_addr']:
        raise LaunchOptionError(f'--nnodes={values["nnodes"]} needs --master_addr=<address of node 0>')
    return nproc * nnodes


def launch_plan(mode: str, kind: str, args: Sequence[str], defaults: Mapping[str, str], caller_dir: str = '.',
                pth_required: bool = False, environ: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The values a `mode` (1p/8p) script of `kind` (perf/acc/eval) runs with: VARIABLES (strings), extra_args,
    rank_size, CaseName and modelzoo_case; None for --help. LaunchOptionError when an argument breaks a rule."""
    if mode not in MODES or kind not in KINDS:
        raise ValueError(f'mode must be one of {MODES} and kind one of {KINDS}, not {mode!r}, {kind!r}')
    values = parse_script_args(args, defaults)
    if values is None:
        return None
    positional, multi_node = values.pop('positional'), values.pop('multi_node')
    if len(positional) > 2:
        raise LaunchOptionError(f'too many positional arguments: {" ".join(positional)} (expected DIR [FILE])')
    positional += [''] * (2 - len(positional))
    for variable, given in zip(('data_path', 'pth_path'), positional):
        values[variable] = _abspath(given or values[variable], caller_dir)
    values['output_root'] = _abspath(values['output_root'], caller_dir)
    rank_size = _check_processes(mode, values, multi_node, environ)
    if not values['pth_path'] and (kind == 'eval' or pth_required):
        raise LaunchOptionError('--pth_path=FILE is required: the checkpoint to '
                                + ('evaluate' if kind == 'eval' else 'start from'))
    values['rank_size'] = str(rank_size)
    values['CaseName'] = case_name(values['Network'], values['batch_size'], rank_size, kind)
    values['modelzoo_case'] = ['--network', values['Network'], '--batch-size', values['batch_size'],
                               '--rank-size', str(rank_size), '--kind', kind]
    return values


def shell_code(values: Mapping[str, object]) -> str:
    """Bash assignments of `values` (lists become arrays), every value quoted: safe to eval."""
    def quoted(value):
        return '(' + ' '.join(map(shlex.quote, value)) + ')' if isinstance(value, list) else shlex.quote(value)
    return '\n'.join(f'{name}={quoted(value)}' for name, value in values.items())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m utils.launcher', description=__doc__.split('\n\n')[0])
    parser.add_argument('mode', choices=MODES)
    parser.add_argument('kind', choices=KINDS)
    parser.add_argument('--script', required=True, help='the launch script\'s file name (for --help)')
    parser.add_argument('--caller-dir', required=True, help='where the script was called from (relative paths)')
    parser.add_argument('--pth-required', action='store_true', help='the script starts from --pth_path weights')
    parser.add_argument('defaults', nargs='*', metavar='NAME=DEFAULT', help=f'one for each of {", ".join(VARIABLES)}')
    return parser


def _defaults(parser: argparse.ArgumentParser, pairs: List[str]) -> Dict[str, str]:
    defaults = dict(pair.split('=', 1) for pair in pairs if '=' in pair)
    if len(defaults) != len(pairs) or set(defaults) != set(VARIABLES):
        parser.error(f'give NAME=DEFAULT once for each of {", ".join(VARIABLES)}, not {" ".join(pairs)}')
    return defaults


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index('--') if '--' in argv else len(argv)
    parser = _parser()
    settings = parser.parse_intermixed_args(argv[:split])
    try:
        values = launch_plan(settings.mode, settings.kind, argv[split + 1:], _defaults(parser, settings.defaults),
                             settings.caller_dir, settings.pth_required)
    except LaunchOptionError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f"printf '%s\\n' {shlex.quote(usage(settings.script))}; exit 0" if values is None else shell_code(values))
    return 0


if __name__ == '__main__':
    sys.exit(main())

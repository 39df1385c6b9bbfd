"""One prepared GPU measurement of VAN training speed (issue 17): every question in one run, JSON + tables.

    bash tools/gpu_benchmark.sh [OUT_DIR]                  # the thin driver (default OUT_DIR output/gpu_report)
    python tools/gpu_report.py --out OUT_DIR [--budget-s 470] [--steps NAME,...] [--list]
    python tools/gpu_report.py --dry-run --out /tmp/dry    # the same plan on CPU, van_b0 at 32 px (CI)

It answers, for van_b2 at 224 px and batch 128 (`--list` prints the plan):
- today's path and the ratio base: `plain` (the reference model), NCHW, float16 AMP, eager, cudnn.benchmark
  off - what main.py `--amp` runs - with `fast` (= plain on CUDA) and `polyphase` beside it;
- NCHW vs channels_last, float16 vs bfloat16, cudnn.benchmark on vs off, each LKA implementation
  (plain, polyphase, triton), training and inference;
- eager vs torch.compile (channels_last, bfloat16; plain and triton: a van_b2 compile takes 1-2 minutes);
- where a training step's time goes, by kernel class (utils/step_profile.py), for today's path and for
  the channels_last candidates;
- main.py's FPS on a synthetic ImageFolder, with today's options and with the fastest measured ones;
- batch 256; NCHW bfloat16 (every depthwise conv on PyTorch's own kernels).
Steps run in that order of priority, each in a child process (tools/benchmark.py or main.py) with its own
time limit, cut to what is left of the global budget (default 470 s, under 8 minutes); a step that fails or
runs out of time is recorded and the next one starts. OUT_DIR/report.json and OUT_DIR/report.md are
rewritten after every step, so an interrupted run keeps what it measured; OUT_DIR/logs/<step>.log holds
each child's output. Without a CUDA device or without triton it stops at once with one line (exit 2).
"""
import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_BUDGET_S = 470
# A step is not started with less time left than this: it could not even import torch and build its model.
MIN_STEP_S = 15
# Issue 17's targets: main.py images/s on one H200 (van_b2, batch 128, 224 px, AMP), and the best training
# step and inference against the reference model's (plain, NCHW, float16 AMP, eager) in the same run.
TARGET_MAIN_FPS = 2500
TARGET_TRAIN_RATIO = 1.5
TARGET_INFER_RATIO = 1.3
REFERENCE_STEP = 'reference'


class SetupError(RuntimeError):
    """Something the measurement needs is missing (no GPU, no triton): reported as one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = 'van_b2'
    batch: int = 128
    large_batch: int = 256
    img_size: int = 224
    device: str = 'cuda'
    warmup: int = 3
    repeats: int = 8
    compile_repeats: int = 5
    main_steps: int = 25  # main.py times all but the first 5 (utils/engine.py FPS_WARMUP_STEPS)
    workers: int = max(2, min(16, (os.cpu_count() or 4) - 2))
    image_side: int = 256  # synthetic JPEGs, randomly cropped to img_size by the training transform
    with_compile: bool = True
    amp: bool = True  # False: every step in float32, main.py without --amp
    limit_scale: float = 1.0  # multiplies every step's time limit
    child_env: Tuple[Tuple[str, str], ...] = ()


# The same plan on CPU at toy size: checks every step's plumbing end to end without a GPU. It runs in
# float32 (half-precision convs are slow on most CPUs), the Triton impl falls back to nn.Conv2d
# (TRITON_INTERPRET=0: the interpreter would take minutes), and a small shared CPU gets 3x the time limits.
DRY_RUN = Settings(model='van_b0', batch=4, large_batch=8, img_size=32, device='cpu', warmup=1, repeats=1,
                   compile_repeats=1, main_steps=6, workers=0, image_side=40, with_compile=False, amp=False,
                   limit_scale=3.0, child_env=(('TRITON_INTERPRET', '0'),))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One tools/benchmark.py run: all its implementations built in one process and timed interleaved."""
    channels_last: bool
    dtype: str
    cudnn_benchmark: bool
    impls: Tuple[str, ...]
    mode: str = 'both'
    compile: bool = False
    large_batch: bool = False
    profile: bool = False


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    question: str
    bench: Optional[BenchConfig] = None
    main_run: Optional[str] = None  # 'reference' or 'best'
    data: bool = False


def plan(settings: Settings) -> List[Step]:
    """The steps, most important first (the budget cuts the tail)."""
    gpu_impls = ('plain', 'polyphase', 'triton')
    steps = [
        Step(REFERENCE_STEP, 75, "today's main.py --amp path and the ratio base: NCHW, float16, eager, "
             'cudnn.benchmark off; fast (= plain on CUDA) and polyphase beside the reference model',
             BenchConfig(False, 'float16', False, ('plain', 'fast', 'polyphase'))),
        Step('cl-fp16-cudnnbench', 100, 'channels_last + cudnn.benchmark, float16: each LKA implementation',
             BenchConfig(True, 'float16', True, gpu_impls)),
        Step('cl-bf16-cudnnbench', 100, 'channels_last + cudnn.benchmark, bfloat16: each LKA implementation',
             BenchConfig(True, 'bfloat16', True, gpu_impls)),
        Step('cl-fp16', 75, 'what cudnn.benchmark changes: channels_last float16 with it off',
             BenchConfig(True, 'float16', False, ('plain', 'triton'), mode='train')),
        Step('compile-cl-bf16', 240, 'eager vs torch.compile (channels_last, bfloat16, cudnn.benchmark)',
             BenchConfig(True, 'bfloat16', True, ('plain', 'triton'), mode='train', compile=True)),
        Step('profile-reference', 60, "where today's training step spends its time, by kernel class",
             BenchConfig(False, 'float16', False, ('plain',), mode='train', profile=True)),
        Step('profile-cl-fp16', 75, 'the same for the channels_last candidates',
             BenchConfig(True, 'float16', True, gpu_impls, mode='train', profile=True)),
        Step('data', 60, 'synthetic ImageFolder for main.py', data=True),
        Step('main-reference', 100, "main.py FPS with today's options (--amp)", main_run='reference'),
        Step('main-best', 220, 'main.py FPS with the fastest measured training options', main_run='best'),
        Step('batch256', 75, f'batch {settings.large_batch}: channels_last float16, cudnn.benchmark',
             BenchConfig(True, 'float16', True, ('plain', 'triton'), mode='train', large_batch=True)),
        Step('nchw-bf16', 75, 'NCHW bfloat16: every depthwise conv on PyTorch\'s own kernels',
             BenchConfig(False, 'bfloat16', False, ('plain', 'polyphase'))),
    ]
    return steps


def select_steps(steps: Sequence[Step], names: Optional[str]) -> List[Step]:
    if not names:
        return list(steps)
    wanted = [n.strip() for n in names.split(',') if n.strip()]
    known = [s.name for s in steps]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SetupError(f'--steps: unknown step {", ".join(unknown)}; the steps are {", ".join(known)}')
    return [s for s in steps if s.name in wanted]


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------
def benchmark_argv(python: str, settings: Settings, config: BenchConfig, json_path: Path) -> List[str]:
    argv = [python, 'tools/benchmark.py', '--model', settings.model,
            '-b', str(settings.large_batch if config.large_batch else settings.batch),
            '--img-size', str(settings.img_size), '--device', settings.device,
            '--dtype', config.dtype if settings.amp else 'float32',
            '--impls', ','.join(config.impls), '--mode', config.mode, '--warmup', str(settings.warmup),
            '--repeats', str(settings.compile_repeats if config.compile else settings.repeats), '--json', str(json_path)]
    for flag, on in (('--channels-last', config.channels_last), ('--cudnn-benchmark', config.cudnn_benchmark),
                     ('--compile', config.compile), ('--profile', config.profile)):
        if on:
            argv.append(flag)
    return argv


def main_options(row: Optional[Dict], amp: bool = True) -> List[str]:
    """main.py flags for a measured row (None: today's defaults, --amp alone)."""
    if row is None:
        return ['--amp'] if amp else []
    options = [] if row['dtype'] == 'float32' else ['--amp', '--amp-dtype', row['dtype']]
    for flag, on in (('--channels-last', row['channels_last']), ('--cudnn-benchmark', row['cudnn_benchmark']),
                     ('--compile', row['compile'])):
        if on:
            options.append(flag)
    return options + ['--lka-impl', row['impl']]


def main_argv(python: str, settings: Settings, data_dir: Path, out_dir: Path, name: str,
              options: Sequence[str]) -> List[str]:
    argv = [python, 'main.py', '--data_path', str(data_dir), '--model', settings.model, '-b', str(settings.batch),
            '--img-size', str(settings.img_size), '--device', settings.device, '--epochs', '1',
            '--warmup-epochs', '0', '--cooldown-epochs', '0', '--max-steps-per-epoch', str(settings.main_steps),
            '-j', str(settings.workers), '--output', str(out_dir), '--experiment', name, '--log-interval', '5']
    if settings.device == 'cuda':
        argv.append('--pin-mem')
    return argv + list(options)


# ---------------------------------------------------------------------------------------------
# Running children under a deadline
# ---------------------------------------------------------------------------------------------
def run_child(argv: Sequence[str], limit_s: float, log_path: Path, env: Dict[str, str],
              stop_after: Optional[str] = None, echo: bool = True) -> Tuple[str, float]:
    """Run argv (own process group) for at most limit_s; its output goes to log_path (and stdout).
    Returns (status, seconds): 'ok', 'failed (exit N)' or 'timed out after N s'. A line matching
    `stop_after` ends the child at once (SIGKILL) with status 'ok': main.py's validation, checkpoint and
    SIGTERM recovery file are not what is measured."""
    start = time.monotonic()
    stopped = threading.Event()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, 'w') as log:
        log.write('$ ' + ' '.join(argv) + '\n')
        log.flush()
        child = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors='replace', start_new_session=True)

        def pump():
            for line in child.stdout:
                log.write(line)
                log.flush()
                if echo:
                    print('  | ' + line.rstrip(), flush=True)
                if stop_after and re.search(stop_after, line):
                    stopped.set()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        while child.poll() is None:
            if stopped.is_set():
                _end_group(child, signals=((signal.SIGKILL, 5),))
                break
            if time.monotonic() - start > limit_s:
                timed_out = True
                _end_group(child)
                break
            time.sleep(0.2)
        child.wait()
        reader.join(timeout=5)
    seconds = time.monotonic() - start
    if stopped.is_set():
        return 'ok', seconds
    if timed_out:
        return f'timed out after {limit_s:.0f} s', seconds
    return ('ok' if child.returncode == 0 else f'failed (exit {child.returncode})'), seconds


def _end_group(child: subprocess.Popen, signals=((signal.SIGTERM, 10), (signal.SIGKILL, 5))) -> None:
    """Signal the child's own process group (its data loader workers too): SIGTERM, then SIGKILL 10 s later."""
    for sig, wait in signals:
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------
def _write_images(job) -> None:
    import numpy as np
    from PIL import Image
    folder, label, first, count, side = job
    rng = np.random.default_rng(label * 1_000_003 + first)
    for i in range(first, first + count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        pixels[:, :, label % 3] //= 2  # a faint class signal
        Image.fromarray(pixels).save(Path(folder) / f'{i}.jpg', quality=90)


def write_synthetic_imagefolder(root: Path, train_per_class: int, val_per_class: int, side: int,
                                classes: int = 4, processes: int = 0) -> Path:
    """root/{train,val}/class<k>/<i>.jpg of random pixels (JPEG q90, like the earlier GPU runs); files
    already there are kept, so a rerun only tops it up."""
    jobs = []
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        for label in range(classes):
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True, exist_ok=True)
            have = len(list(folder.glob('*.jpg')))
            for first in range(have, per_class, 64):
                jobs.append((str(folder), label, first, min(64, per_class - first), side))
    if processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context('fork').Pool(processes) as pool:
            pool.map(_write_images, jobs)
    else:
        for job in jobs:
            _write_images(job)
    return root


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
def rows_from_benchmark(step: Step, settings: Settings, saved: Dict) -> Tuple[List[Dict], List[Dict]]:
    """(throughput rows, profiles) from one tools/benchmark.py JSON file."""
    config = step.bench
    rows, profiles = [], []
    for result in saved['results']:
        compiled = result['impl'].endswith('+compile')
        row = dict(step=step.name, batch=settings.large_batch if config.large_batch else settings.batch,
                   channels_last=config.channels_last, dtype=saved['args']['dtype'],
                   cudnn_benchmark=config.cudnn_benchmark,
                   compile=compiled, impl=result['impl'][:-len('+compile')] if compiled else result['impl'],
                   mode=result['mode'], images_per_s=result['images_per_s'], step_ms=result['step_ms'],
                   vs_plain=result['speedup'])
        rows.append(row)
        if 'profile' in result:
            profiles.append(dict(row, classes=result['profile']))
    return rows, profiles


def reference_rate(rows: Sequence[Dict], mode: str) -> Optional[float]:
    for row in rows:
        if row['step'] == REFERENCE_STEP and row['impl'] == 'plain' and row['mode'] == mode:
            return row['images_per_s']
    return None


def best_row(rows: Sequence[Dict], mode: str, batch: int) -> Optional[Dict]:
    candidates = [r for r in rows if r['mode'] == mode and r['batch'] == batch]
    return max(candidates, key=lambda r: r['images_per_s'], default=None)


def targets(report: Dict) -> List[Dict]:
    """Issue 17's targets against what this run measured (None where it was not measured)."""
    rows, batch = report['rows'], report['settings']['batch']
    out = []
    fps = {run['name']: run.get('fps') for run in report['main_runs']}
    best_fps = max((f for f in fps.values() if f), default=None)
    out.append(dict(id='main_fps', target=f'main.py FPS >= {TARGET_MAIN_FPS} (van_b2, batch 128, AMP; H200)',
                    measured=best_fps,
                    met=None if best_fps is None else best_fps >= TARGET_MAIN_FPS))
    for mode, ratio in (('train', TARGET_TRAIN_RATIO), ('infer', TARGET_INFER_RATIO)):
        reference, best = reference_rate(rows, mode), best_row(rows, mode, batch)
        value = best['images_per_s'] / reference if best and reference else None
        out.append(dict(id=f'{mode}_ratio', target=f'best {mode} / reference model {mode} >= {ratio}x (same run)',
                        measured=value,
                        met=None if value is None else value >= ratio,
                        best=None if best is None else describe(best)))
    return out


def describe(row: Dict) -> str:
    return (f'{row["impl"]}{"+compile" if row["compile"] else ""}, {"channels_last" if row["channels_last"] else "NCHW"}, '
            f'{row["dtype"]}, cudnn.benchmark {"on" if row["cudnn_benchmark"] else "off"}, batch {row["batch"]}')


def _fmt(value, pattern='{:.1f}') -> str:
    return '-' if value is None else pattern.format(value)


def render_markdown(report: Dict) -> str:
    env, rows = report['environment'], report['rows']
    lines = [f'# VAN GPU measurement ({report["settings"]["model"]}, {report["settings"]["img_size"]} px)', '',
             f'{env.get("gpu", env.get("device", "?"))}; torch {env.get("torch")}, CUDA {env.get("cuda")}, '
             f'driver {env.get("driver")}, cuDNN {env.get("cudnn")}, triton {env.get("triton")}, timm {env.get("timm")}, '
             f'{env.get("host_cpus")} CPUs; started {report["started"]}'
             + ('; DRY RUN on CPU (plumbing only, numbers meaningless)' if report['dry_run'] else ''), '']
    ref_train, ref_infer = reference_rate(rows, 'train'), reference_rate(rows, 'infer')
    lines += ['## Throughput (images/s; x ref = against the reference model: plain, NCHW, float16, eager, '
              'cudnn.benchmark off; x plain = against plain in the same process)', '',
              '| step | batch | format | AMP dtype | cudnn.benchmark | compile | impl | train | x ref | x plain '
              '| infer | x ref | x plain |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    merged: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        key = (row['step'], row['batch'], row['channels_last'], row['dtype'], row['cudnn_benchmark'], row['compile'],
               row['impl'])
        merged.setdefault(key, {})[row['mode']] = row
    for key, modes in merged.items():
        step, batch, channels_last, dtype, cudnn_benchmark, compiled, impl = key
        cells = []
        for mode, ref in (('train', ref_train), ('infer', ref_infer)):
            row = modes.get(mode)
            rate = row['images_per_s'] if row else None
            cells += [_fmt(rate), _fmt(rate / ref if rate and ref else None, '{:.2f}x'),
                      _fmt(row['vs_plain'] if row else None, '{:.2f}x')]
        lines.append(f'| {step} | {batch} | {"channels_last" if channels_last else "NCHW"} | {dtype} | '
                     f'{"on" if cudnn_benchmark else "off"} | {"yes" if compiled else "no"} | {impl} | ' + ' | '.join(cells) + ' |')
    for profile in report['profiles']:
        lines += ['', f'## Training step by kernel class: {describe(profile)} ({profile["step"]})', '',
                  '| class | ms | share | largest kernels |', '|---|---|---|---|']
        for c in profile['classes']:
            top = '; '.join(f'{name[:60]} {ms:.2f}' for name, ms in c['top'])
            lines.append(f'| {c["class"]} | {c["ms"]:.2f} | {100 * c["share"]:.1f}% | {top} |')
    lines += ['', '## main.py on a synthetic ImageFolder', '', '| run | options | FPS |', '|---|---|---|']
    for run in report['main_runs']:
        lines.append(f'| {run["name"]} | `{" ".join(run["options"])}` | {_fmt(run.get("fps"), "{:.2f}")} |')
    lines += ['', '## Targets (issue 17)', '', '| target | measured | met | best configuration |', '|---|---|---|---|']
    for t in report['targets']:
        met = '-' if t['met'] is None else ('yes' if t['met'] else 'no')
        lines.append(f'| {t["target"]} | {_fmt(t["measured"], "{:.2f}")} | {met} | {t.get("best") or ""} |')
    lines += ['', '## Steps', '', '| step | status | seconds | question |', '|---|---|---|---|']
    for s in report['steps']:
        lines.append(f'| {s["name"]} | {s["status"]} | {_fmt(s.get("seconds"), "{:.0f}")} | {s["question"]} |')
    return '\n'.join(lines) + '\n'


def write_report(report: Dict, out_dir: Path) -> Tuple[Path, Path]:
    report['targets'] = targets(report)
    paths = out_dir / 'report.json', out_dir / 'report.md'
    for path, text in zip(paths, (json.dumps(report, indent=2), render_markdown(report))):
        partial = path.with_suffix(path.suffix + '.partial')
        partial.write_text(text)
        partial.replace(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_environment(settings: Settings) -> Dict:
    """What the run measures on; SetupError when torch, the device or triton is missing."""
    try:
        import torch
    except ImportError as error:
        raise SetupError(f'{sys.executable} cannot import torch ({error}); set PYTHON=/path/to/python of the '
                         'environment that has requirements.txt installed') from None
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                timm=_version('timm'), triton=_version('triton'), host_cpus=os.cpu_count(), device=settings.device)
    if settings.device != 'cuda':
        return info
    from utils.device import resolve_device_type
    from utils.errors import DeviceError
    try:
        resolve_device_type('cuda')  # the device table's rule, as main.py and tools/benchmark.py apply it
    except DeviceError:
        raise SetupError(f'no CUDA device is visible to torch {torch.__version__} (CUDA build: '
                         f'{torch.version.cuda or "none"}); run this on the GPU machine, or check the plan on CPU '
                         'with --dry-run') from None
    from models import triton_lka
    reason = triton_lka.unavailable_reason()
    if reason:
        raise SetupError(f"triton is needed for lka_impl 'triton' and torch.compile: {reason}")
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=f'{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, '
                    f'{props.multi_processor_count} SMs)', cudnn=torch.backends.cudnn.version(),
                visible_devices=torch.cuda.device_count(), driver=_nvidia_driver())
    return info


def _nvidia_driver() -> Optional[str]:
    try:
        result = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', type=Path, default=REPO_ROOT / 'output' / 'gpu_report',
                        help='folder for report.json, report.md, json/, logs/ and main.py\'s run folders')
    parser.add_argument('--data-dir', type=Path, default=None,
                        help='synthetic ImageFolder for main.py (about 200 MB for van_b2; created or topped up; '
                             'default OUT/synthetic_imagefolder)')
    parser.add_argument('--budget-s', type=float, default=DEFAULT_BUDGET_S,
                        help='global deadline in seconds; steps are cut or skipped to keep it')
    parser.add_argument('--steps', default=None, metavar='NAME,...', help='run only these steps (see --list)')
    parser.add_argument('--dry-run', action='store_true',
                        help='the same plan on CPU with van_b0 at 32 px: checks the plumbing, measures nothing')
    parser.add_argument('--list', action='store_true', help='print the plan and exit')
    parser.add_argument('--python', default=sys.executable, help='interpreter for the child processes')
    parser.add_argument('--quiet', action='store_true', help="do not echo the children's output")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    settings = DRY_RUN if args.dry_run else Settings()
    try:
        steps = select_steps(plan(settings), args.steps)
        if args.list:
            for step in steps:
                print(f'{step.name:<20} <= {step.limit_s:>3d} s  {step.question}')
            return 0
        environment = check_environment(settings)
    except SetupError as error:
        print(f'error: {error}', file=sys.stderr, flush=True)
        return 2
    return run_plan(steps, settings, environment, args.out, args.budget_s, args.python, dry_run=args.dry_run,
                    echo=not args.quiet, data_dir=args.data_dir)


def run_plan(steps: Sequence[Step], settings: Settings, environment: Dict, out: Path, budget_s: float,
             python: str, dry_run: bool = False, echo: bool = True, data_dir: Optional[Path] = None) -> int:
    deadline = time.monotonic() + budget_s
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1', **dict(settings.child_env))
    # Batch 256 of van_b2 nears an 80 GB H100's memory: expandable segments keep fragmentation from failing it.
    env.setdefault('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')
    report = dict(tool='tools/gpu_report.py', started=datetime.datetime.now().isoformat(timespec='seconds'),
                  dry_run=dry_run, budget_s=budget_s, settings=dataclasses.asdict(settings), environment=environment,
                  steps=[], rows=[], profiles=[], main_runs=[])
    data_dir = data_dir or out / 'synthetic_imagefolder'
    data_ready = False
    print(f'VAN GPU measurement: {environment.get("gpu", settings.device)}, torch {environment["torch"]}, '
          f'{len(steps)} steps, budget {budget_s:.0f} s, results in {out}', flush=True)
    for step in steps:
        left = deadline - time.monotonic()
        entry = dict(name=step.name, question=step.question, status='', seconds=None)
        report['steps'].append(entry)
        limit = min(step.limit_s * settings.limit_scale, left)
        if limit < MIN_STEP_S:
            entry['status'] = 'skipped: budget used up'
        elif step.bench is not None and step.bench.compile and not settings.with_compile:
            entry['status'] = 'skipped: no torch.compile in a dry run'
        elif step.bench is not None:
            json_path = out / 'json' / f'{step.name}.json'
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.unlink(missing_ok=True)
            argv = benchmark_argv(python, settings, step.bench, json_path)
            print(f'=== {step.name} (limit {limit:.0f} s): {step.question}', flush=True)
            entry['command'] = ' '.join(argv[1:])
            entry['status'], entry['seconds'] = run_child(argv, limit, out / 'logs' / f'{step.name}.log', env,
                                                          echo=echo)
            if json_path.is_file():
                rows, profiles = rows_from_benchmark(step, settings, json.loads(json_path.read_text()))
                report['rows'] += rows
                report['profiles'] += profiles
        elif step.data:
            start = time.monotonic()
            per_class = math.ceil(settings.batch * (settings.main_steps + 1) / 4)
            write_synthetic_imagefolder(data_dir, per_class, max(2, settings.batch // 4), settings.image_side,
                                        processes=os.cpu_count() or 1)
            data_ready = True
            entry['status'], entry['seconds'] = 'ok', time.monotonic() - start
        else:
            best = best_row(report['rows'], 'train', settings.batch) if step.main_run == 'best' else None
            if not (data_ready or (data_dir / 'train').is_dir()):
                entry['status'] = 'skipped: no synthetic ImageFolder (the data step did not run)'
            elif step.main_run == 'best' and best is None:
                entry['status'] = 'skipped: no training configuration was measured'
            else:
                options = main_options(best, settings.amp)
                argv = main_argv(python, settings, data_dir, out / 'main', step.name, options)
                print(f'=== {step.name} (limit {limit:.0f} s): main.py {" ".join(options)}', flush=True)
                entry['command'] = ' '.join(argv[1:])
                log = out / 'logs' / f'{step.name}.log'
                entry['status'], entry['seconds'] = run_child(argv, limit, log, env, stop_after=r'Epoch \d+ FPS:',
                                                              echo=echo)
                fps = re.findall(r'FPS:\s*([0-9.]+)', log.read_text())
                report['main_runs'].append(dict(name=step.name, options=options, fps=float(fps[-1]) if fps else None,
                                                configuration=describe(best) if best else "today's defaults"))
        print(f'=== {step.name}: {entry["status"]}' + (f' ({entry["seconds"]:.0f} s)' if entry['seconds'] else ''),
              flush=True)
        write_report(report, out)
    json_path, md_path = write_report(report, out)
    print(md_path.read_text())
    print(f'results: {json_path} and {md_path}; child logs in {out / "logs"}')
    failed = [s['name'] for s in report['steps'] if s['status'].startswith(('failed', 'timed out'))]
    if failed:
        print(f'steps not completed: {", ".join(failed)} (see their logs)')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

"""Throughput of VAN implementations side by side: training step, inference, and the data pipeline.

    python tools/benchmark.py --model van_b0 -b 32 --img-size 224                   # plain vs fast
    python tools/benchmark.py --impls plain,fast-no-native,fast                      # + PyTorch-only fast path
    python tools/benchmark.py --model van_b2 -b 128 --device cuda --dtype bfloat16 --compile
    python tools/benchmark.py --data-path data/demo -b 64 -j 2                      # loading alone
    python tools/benchmark.py --model van_b2 -b 128 --device cuda --channels-last --cudnn-benchmark \
        --dtype float16 --impls plain,polyphase,triton --profile                     # + time per kernel class

A training step is forward + cross-entropy + backward + AdamW step; inference is a forward under
`torch.inference_mode` in eval mode. All implementations are built first and then timed in
interleaved rounds (plain, fast, plain, fast, ...), so a busy machine slows them alike and the
ratio stays meaningful. Rows: `plain` is nn.Conv2d in NCHW, exactly what the reference computes;
`fast` is the default fast path (`lka_impl='fast'`), with the native C depthwise kernels on CPU where
they built (models/native_kernels.py); `fast-no-native` is the fast path on PyTorch's kernels only;
`polyphase` and `triton` are the GPU candidates (models/polyphase_conv.py, models/triton_lka.py);
`+compile` rows wrap them in torch.compile. `--profile` adds, per training row, one profiled step's time
by kernel class (utils/step_profile.py).
float16/bfloat16 run under autocast (one code path: autocast is disabled for float32).
On CPU the host allocator keeps freed memory, as main.py does (utils/device.py
`keep_freed_host_memory`), for every row alike; `--default-malloc` measures glibc's default
behaviour instead, as a plain script gets it.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402  (registers the VAN variants with timm)
import timm  # noqa: E402
from models import compat, native_kernels  # noqa: E402
from utils.data import train_transform  # noqa: E402
from utils.device import keep_freed_host_memory, resolve_device, synchronize  # noqa: E402
from utils.errors import DeviceError, UserError  # noqa: E402
from utils.images import RobustImageFolder, collate_samples, resolve_eval_config  # noqa: E402
from utils.options import default_options, train_augmentation  # noqa: E402
from utils.step_profile import breakdown, profile_step  # noqa: E402

NO_NATIVE = '-no-native'
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--model', default='van_b0', help='VAN variant (van_b0 .. van_b6, van_tiny ..)')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--device', default='auto',
                        help='auto (NPU, then CUDA, then CPU, as main.py), cpu, cuda[:N], npu[:N]')
    parser.add_argument('--dtype', default='float32', choices=list(DTYPES),
                        help='float32, or autocast to bfloat16/float16 (mixed precision)')
    parser.add_argument('--channels-last', action='store_true',
                        help='feed channels_last inputs to every row (the fast path on CPU converts anyway)')
    parser.add_argument('--impls', default='plain,fast',
                        help='comma-separated lka_impl values to compare; NAME-no-native runs NAME with the '
                             'native CPU kernels switched off')
    parser.add_argument('--compile', action='store_true', help='add torch.compile rows for every implementation')
    parser.add_argument('--cudnn-benchmark', action='store_true',
                        help='let cuDNN time its algorithms per input shape (torch.backends.cudnn.benchmark)')
    parser.add_argument('--profile', action='store_true',
                        help='after timing, profile one training step per row: time by kernel class')
    parser.add_argument('--mode', default='both', choices=['train', 'infer', 'both'])
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per row before timing')
    parser.add_argument('--repeats', type=int, default=5, help='timed steps per row (median reported)')
    parser.add_argument('--default-malloc', action='store_true',
                        help="CPU: keep glibc's default of returning freed memory to the kernel (main.py keeps it)")
    parser.add_argument('--drop-path', type=float, default=None,
                        help="stochastic depth of the trained model (default: the variant's recipe value, as main.py)")
    parser.add_argument('--data-path', default=None,
                        help='measure the training data pipeline alone on this ImageFolder (DIR or DIR/train)')
    parser.add_argument('-j', '--workers', type=int, default=2, help='data loader workers (data mode)')
    parser.add_argument('--batches', type=int, default=20, help='batches timed in data mode')
    parser.add_argument('--json', default=None, metavar='PATH', help='also write the results to this JSON file')
    return parser


def _summary(times, batch_size):
    rates = sorted(batch_size / t for t in times)
    median = statistics.median(rates)
    return dict(images_per_s=median, min=rates[0], max=rates[-1], step_ms=1e3 * statistics.median(times))


def build_rows(args, device):
    """One entry per (implementation, compiled?): the model, its optimizer and its step functions."""
    rows = []
    torch.manual_seed(0)
    reference = None
    impls = [i.strip() for i in args.impls.split(',') if i.strip()]
    drop_path = args.drop_path if args.drop_path is not None else models.recipe_drop_path(args.model)
    for impl in impls:
        lka_impl = impl[:-len(NO_NATIVE)] if impl.endswith(NO_NATIVE) else impl
        for compiled in ([False, True] if args.compile else [False]):
            model = timm.create_model(args.model, num_classes=args.num_classes, drop_path_rate=drop_path,
                                      lka_impl=lka_impl)
            if reference is None:
                reference = model.state_dict()
            model.load_state_dict(reference)  # same weights in every row
            model.to(device)
            if args.channels_last:
                model.to(memory_format=torch.channels_last)
            name = f'{impl}+compile' if compiled else impl
            rows.append(dict(name=name, model=model, run=torch.compile(model) if compiled else model,
                             optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05),
                             context=native_kernels.disabled if impl.endswith(NO_NATIVE) else contextlib.nullcontext))
    return rows


def benchmark_models(args, device):
    dtype = DTYPES[args.dtype]
    # float32: no autocast region at all (torch 2.1's CPU autocast refuses float32 even when disabled).
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = compat.grad_scaler(device.type, enabled=dtype == torch.float16)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(
        memory_format=memory_format)
    targets = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    rows = build_rows(args, device)

    def train_step(row):
        row['model'].train()
        with autocast:
            loss = F.cross_entropy(row['run'](images), targets)
        row['optimizer'].zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(row['optimizer'])
        scaler.update()

    def infer_step(row):
        row['model'].eval()
        with torch.inference_mode(), autocast:
            row['run'](images)

    modes = ['train', 'infer'] if args.mode == 'both' else [args.mode]
    results = []
    for mode in modes:
        step = train_step if mode == 'train' else infer_step
        times = {row['name']: [] for row in rows}
        for round_index in range(args.warmup + args.repeats):
            for row in rows:  # interleaved: every row sees the same machine load
                synchronize(device)
                start = time.perf_counter()
                with row['context']():
                    step(row)
                synchronize(device)
                if round_index >= args.warmup:
                    times[row['name']].append(time.perf_counter() - start)
        base = None
        for row in rows:
            entry = dict(mode=mode, impl=row['name'], **_summary(times[row['name']], args.batch_size))
            base = base or entry['images_per_s']
            entry['speedup'] = entry['images_per_s'] / base
            if args.profile and mode == 'train':
                with row['context']():
                    entry['profile'] = breakdown(profile_step(lambda: step(row), device))
            results.append(entry)
    return results


def benchmark_data(args):
    """Images/s of the training data pipeline alone: what main.py's training loader does per image (decoding
    by utils.images.load_rgb, the training transform with main.py's default augmentation) and per batch."""
    from torch.utils.data import DataLoader

    root = Path(args.data_path)
    if (root / 'train').is_dir():
        root = root / 'train'
    if not root.is_dir():
        raise SystemExit(f'error: --data-path {args.data_path}: no such folder (give an ImageFolder root)')
    model = timm.create_model(args.model, pretrained=False)
    transform = train_transform(resolve_eval_config(model, dict(img_size=args.img_size)),
                                train_augmentation(default_options()))
    try:
        dataset = RobustImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError, UserError) as error:
        raise SystemExit(f'error: --data-path {args.data_path}: not an ImageFolder ({error})')
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0, collate_fn=collate_samples)
    if len(loader) == 0:
        raise SystemExit(f'error: --data-path {args.data_path}: fewer images ({len(dataset)}) than one batch')
    times, seen, start = [], 0, None
    while seen < args.batches + args.warmup:
        for _ in loader:
            now = time.perf_counter()
            if start is not None and seen >= args.warmup:
                times.append(now - start)
            start, seen = now, seen + 1
            if seen >= args.batches + args.warmup:
                break
    if not times:
        raise SystemExit('error: not enough batches to time; lower --warmup or add images')
    return [dict(mode='data', impl=f'workers={args.workers}', **_summary(times, args.batch_size), speedup=1.0)]


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.data_path:
        setting = f'data pipeline: {args.data_path}, batch {args.batch_size}, {args.img_size}px, {args.workers} workers'
        results = benchmark_data(args)
    else:
        try:
            device = resolve_device(args.device)
        except DeviceError as error:
            raise SystemExit(f'error: --device: {error}') from None
        name = f'{os.cpu_count()} CPU cores' if device.type == 'cpu' else getattr(torch, device.type).get_device_name(device)
        setting = (f'{args.model}, batch {args.batch_size}, {args.img_size}px, {args.dtype}, '
                   f'{"channels_last" if args.channels_last else "NCHW"} input, {device} ({name}), '
                   f'{compat.describe()}, {torch.get_num_threads()} threads')
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        if device.type == 'cuda':
            setting += f', cudnn.benchmark {"on" if args.cudnn_benchmark else "off"}'
        if device.type == 'cpu':
            kept = not args.default_malloc and keep_freed_host_memory()
            setting += ', host memory: ' + ('freed memory kept' if kept else 'glibc default')
            setting += ', native kernels: ' + (
                'on' if native_kernels.available() else f'off ({native_kernels.unavailable_reason()})')
        try:
            results = benchmark_models(args, device)
        except compat.UnsupportedError as error:
            raise SystemExit(f'error: --dtype {args.dtype}: {error}') from None
    print(setting)
    print(f'{"mode":<6} {"impl":<16} {"images/s":>9} {"min":>8} {"max":>8} {"step ms":>9} {"speedup":>8}')
    for r in results:
        print(f'{r["mode"]:<6} {r["impl"]:<16} {r["images_per_s"]:9.2f} {r["min"]:8.2f} {r["max"]:8.2f} '
              f'{r["step_ms"]:9.1f} {r["speedup"]:7.2f}x')
    for r in results:
        if 'profile' in r:
            print(f'profiled training step, {r["impl"]}: ms by kernel class (top kernel)')
            for c in r['profile']:
                print(f'  {c["class"]:<30} {c["ms"]:9.2f} {100 * c["share"]:5.1f}%  {c["top"][0][0][:70]}')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(setting=setting, args=vars(args), results=results), indent=2))
    return results


if __name__ == '__main__':
    main()

"""Parameters and multiply-accumulates (GMACs) of the VAN variants at a chosen resolution.

    python tools/flops.py                      # all variants at 224x224
    python tools/flops.py --img-size 256 --models van_b0 van_b2
    python tools/flops.py --img-size 96 128    # height width

MACs are what `torch.utils.flop_counter.FlopCounterMode` counts (convolutions and matrix products)
divided by two; norms, activations and elementwise products are not counted, which is why the
papers' rounded "GFLOPs" (0.9, 2.5, 5.0, 9.0 at 224) come out this way. The models are built on the
meta device: shapes flow through the forward pass without memory or arithmetic, so even van_b6 is
counted in a moment.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Run as `python tools/flops.py` from anywhere: the repository root holds the `models` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import models  # noqa: E402  (registers the VAN variants with timm)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, height: int, width: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a single image."""
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, in_chans, height, width, device=device))
    return counter.get_total_flops() // 2


def flops_table(model_names: Sequence[str], height: int, width: int,
                num_classes: int = 1000) -> List[Tuple[str, int, int]]:
    """(name, parameters, MACs) of each model, built without real memory on the meta device."""
    rows = []
    for name in model_names:
        with torch.device('meta'):
            model = timm.create_model(name, num_classes=num_classes)
        rows.append((name, count_params(model), count_macs(model, height, width)))
    return rows


def format_table(rows: Sequence[Tuple[str, int, int]], height: int, width: int) -> str:
    lines = [f'{"model":<10} {"params":>13} {"GMACs @ " + f"{height}x{width}":>16}']
    lines += [f'{name:<10} {params:>13,} {macs / 1e9:>16.3f}' for name, params, macs in rows]
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], metavar='N',
                        help='input size: one number for a square image, or height and width (default 224)')
    parser.add_argument('--models', nargs='+', default=list(models.VARIANTS), choices=models.MODEL_NAMES,
                        metavar='NAME', help='variants to count (default: van_b0 ... van_b6)')
    parser.add_argument('--num-classes', type=int, default=1000, help='classes of the head (default 1000)')
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.img_size) > 2 or min(args.img_size) < 1:
        parser.error('--img-size takes one positive size or a height and a width')
    height, width = args.img_size if len(args.img_size) == 2 else args.img_size * 2
    print(format_table(flops_table(args.models, height, width, args.num_classes), height, width))


if __name__ == '__main__':
    main()

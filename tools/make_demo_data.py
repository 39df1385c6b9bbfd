"""Write a small offline ImageFolder dataset from scikit-learn's handwritten digits.

The launch scripts and the README's quick start need real images that exist on a machine with no
network and no ImageNet: scikit-learn ships 1797 8x8 grey-level digits (10 classes), so this tool
upscales them to RGB PNGs and writes

    <out>/train/<digit>/<index>.png     (80 %, stratified by class, fixed seed)
    <out>/val/<digit>/<index>.png       (20 %)
    <out>/.demo_complete.json           (marker: parameters and per-split counts, written last)

Upscaling uses bicubic interpolation (smooth strokes, closer to natural images than the blocky
nearest-neighbour result); the digits stay bright strokes on a black background and the grey value is
copied to the three channels. The dataset is created once: a run finds a complete copy (marker present,
same parameters, every file counted) and returns at once; an incomplete copy (interrupted run, deleted
files) is rebuilt. Only the train/ and val/ folders and the marker are ever deleted.

Usage: python tools/make_demo_data.py [--out data/demo] [--size 64] [--val-fraction 0.2] [--seed 0]
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "demo"
MARKER = ".demo_complete.json"
SPLITS = ("train", "val")
# Pixel values of load_digits() are counts of set pixels in 4x4 blocks of the original scan: 0..16.
DIGITS_MAX_VALUE = 16.0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"dataset root to write (default: {DEFAULT_OUT.relative_to(REPO_ROOT)} in the repo)")
    parser.add_argument("--size", type=int, default=64, help="side of the square output images in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class put in val/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete copy exists")
    return parser


def _read_marker(out):
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _count_pngs(out, split):
    return {d.name: sum(1 for _ in d.glob("*.png")) for d in sorted((out / split).iterdir()) if d.is_dir()}


def is_complete(out, size, val_fraction, seed):
    """True when `out` holds a finished dataset built with these parameters and no file is missing."""
    out = Path(out)
    marker = _read_marker(out)
    if marker is None or marker.get("params") != _params(size, val_fraction, seed):
        return False
    try:
        return all(_count_pngs(out, split) == marker["counts"][split] for split in SPLITS)
    except (OSError, KeyError):
        return False


def _params(size, val_fraction, seed):
    return {"source": "sklearn.datasets.load_digits", "size": size, "val_fraction": val_fraction,
            "seed": seed, "interpolation": "bicubic"}


def _check_owned(out):
    """Refuse to delete anything in a folder that this tool did not fill."""
    foreign = [p.name for p in out.iterdir() if p.name not in (*SPLITS, MARKER)]
    if foreign:
        raise SystemExit(f"error: {out} already holds {', '.join(sorted(foreign)[:5])}, which "
                         f"make_demo_data.py did not write; choose an empty or new folder with --out")


def split_indices(labels, val_fraction, seed):
    """Stratified train/val index split, the same for the same seed."""
    from sklearn.model_selection import train_test_split
    indices = np.arange(len(labels))
    return train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=seed)


def to_rgb_image(digit_8x8, size):
    grey = np.clip(digit_8x8 / DIGITS_MAX_VALUE * 255.0, 0, 255).round().astype(np.uint8)
    image = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    return image.convert("RGB")


def build(out, size=64, val_fraction=0.2, seed=0, force=False):
    """Create the dataset under `out` unless a complete copy is there; return a line saying which."""
    from sklearn.datasets import load_digits

    out = Path(out)
    if not force and is_complete(out, size, val_fraction, seed):
        return f"demo dataset already complete at {out}"
    digits = load_digits()
    train_idx, val_idx = split_indices(digits.target, val_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    _check_owned(out)
    # The marker goes first so an interrupted rebuild is never taken for a complete one.
    (out / MARKER).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)

    counts = {}
    for split, indices in zip(SPLITS, (train_idx, val_idx)):
        for class_index in range(10):
            (out / split / str(class_index)).mkdir(parents=True, exist_ok=True)
        for index in sorted(indices):
            label = int(digits.target[index])
            to_rgb_image(digits.images[index], size).save(out / split / str(label) / f"{index:04d}.png")
        counts[split] = _count_pngs(out, split)
    (out / MARKER).write_text(json.dumps({"params": _params(size, val_fraction, seed), "counts": counts},
                                         indent=1))
    return (f"demo dataset written to {out}: {len(train_idx)} train / {len(val_idx)} val images, "
            f"10 classes, {size}x{size} RGB PNG")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.size < 8:
        raise SystemExit(f"error: --size {args.size} is smaller than the 8x8 source digits; use 8 or more")
    if not 0.0 < args.val_fraction < 1.0:
        raise SystemExit(f"error: --val-fraction {args.val_fraction} must lie strictly between 0 and 1")
    try:
        print(build(args.out, args.size, args.val_fraction, args.seed, args.force))
    except ValueError as err:  # sklearn refuses a split that leaves a class out of val/
        raise SystemExit(f"error: cannot split with --val-fraction {args.val_fraction}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

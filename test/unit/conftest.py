"""Shared fixtures: tiny synthetic ImageFolder datasets that a VAN learns in a few epochs on CPU."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

# Without a CUDA device, Triton kernels (models/triton_lka.py) are tested in Triton's CPU interpreter, which
# must be chosen before triton is imported (timm imports it, so before any test module loads). It only
# changes how Triton kernels run; nothing else in the suite runs one.
if 'TRITON_INTERPRET' not in os.environ and not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The torch_npu / HCCL / apex stand-ins (fixtures fake_torch_npu, hccl, npu, fake_apex) for every test.
from npu_fakes import fake_apex, fake_torch_npu, hccl, npu  # noqa: E402,F401

# Each class: a background colour and a shape in a contrasting colour, so colour alone separates them
# and the shape makes the task not purely per-pixel.
CLASS_STYLES = {
    'circle_red': ((200, 30, 30), 'ellipse'),
    'square_green': ((30, 180, 40), 'rectangle'),
    'triangle_blue': ((30, 40, 200), 'triangle'),
    'cross_yellow': ((220, 200, 30), 'cross'),
}
TRAIN_PER_CLASS = 12
VAL_PER_CLASS = (5, 5, 5, 4)  # 19 validation images: odd, so 2 ranks cannot split them evenly


def _draw(style, rng: np.random.Generator, size: int = 32) -> Image.Image:
    colour, shape = style
    background = np.clip(np.array(colour) + rng.integers(-25, 26, 3), 0, 255)
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    c, r = rng.integers(12, 20, 2), int(rng.integers(6, 10))
    box = [c[0] - r, c[1] - r, c[0] + r, c[1] + r]
    ink = (255, 255, 255)
    if shape == 'ellipse':
        draw.ellipse(box, fill=ink)
    elif shape == 'rectangle':
        draw.rectangle(box, fill=ink)
    elif shape == 'triangle':
        draw.polygon([(c[0], c[1] - r), (c[0] - r, c[1] + r), (c[0] + r, c[1] + r)], fill=ink)
    else:
        draw.rectangle([c[0] - r, c[1] - 2, c[0] + r, c[1] + 2], fill=ink)
        draw.rectangle([c[0] - 2, c[1] - r, c[0] + 2, c[1] + r], fill=ink)
    return image


def write_image_folder(root: Path, per_class: dict, seed: int, val_name: str = 'val') -> Path:
    """root/{train,<val_name>}/<class>/*.png; per_class maps split -> {class: count}."""
    rng = np.random.default_rng(seed)
    for split, counts in per_class.items():
        for class_name, count in counts.items():
            folder = root / (val_name if split == 'val' else split) / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _draw(CLASS_STYLES[class_name], rng).save(folder / f'{i:03d}.png')
    return root


def default_counts():
    return {'train': {name: TRAIN_PER_CLASS for name in CLASS_STYLES},
            'val': dict(zip(CLASS_STYLES, VAL_PER_CLASS))}


@pytest.fixture(scope='session')
def shapes_dataset(tmp_path_factory) -> Path:
    """4 classes, 48 train and 19 val images of 32x32 (read-only: tests must not modify it)."""
    return write_image_folder(tmp_path_factory.mktemp('shapes'), default_counts(), seed=0)


@pytest.fixture
def make_dataset(tmp_path):
    """Factory for variants: make_dataset(counts=None, val_name='val') -> root."""
    def make(counts=None, val_name='val', name='data'):
        return write_image_folder(tmp_path / name, counts or default_counts(), seed=1, val_name=val_name)
    return make


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope='session')
def reference_fixtures() -> Path:
    """shared/fixtures (outputs of the reference implementation): beside the repository (<x>/main and
    <x>/shared), or beside the folder of a git worktree (<x>/wt/<name>). Skips when absent."""
    for parent in list(REPO_ROOT.parents)[:2]:
        if (parent / 'shared' / 'fixtures').is_dir():
            return parent / 'shared' / 'fixtures'
    pytest.skip('reference fixtures not found: expected shared/fixtures beside the repository')


@pytest.fixture(scope='session')
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def subprocess_env():
    """Environment for running main.py in a child: quiet, single-threaded BLAS per process."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('WORLD_SIZE', None), env.pop('RANK', None), env.pop('LOCAL_RANK', None)
    return env

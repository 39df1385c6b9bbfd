"""Datasets and loaders: layout checks, class checks, unpadded evaluation shards, reproducible augmentation."""
import pytest
import torch

from utils.errors import DatasetError
from utils.images import DataConfig
from utils.data import (ShardWithoutPadding, build_datasets, build_loaders,
                        build_mixup, build_train_criterion, find_split_dirs)

CLASS_NAMES = ('circle_red', 'square_green', 'triangle_blue', 'cross_yellow')
CONFIG = DataConfig((3, 32, 32), 'bicubic', (0.5,) * 3, (0.5,) * 3, 0.9)
AUG = dict(interpolation='random', auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel',
           color_jitter=0.4)


def test_train_and_val_share_the_class_map(shapes_dataset):
    train_set, val_set, class_to_idx = build_datasets(str(shapes_dataset), CONFIG, dict(AUG), seed=0)
    assert len(train_set) == 48 and len(val_set) == 19
    assert class_to_idx == val_set.class_to_idx and len(class_to_idx) == 4
    image, label = train_set[(0, 5)]
    assert image.shape == (3, 32, 32) and 0 <= label < 4


def test_validation_folder_name_is_accepted(make_dataset):
    root = make_dataset(val_name='validation')
    assert find_split_dirs(str(root))[1].endswith('validation')


def test_missing_root_and_missing_split_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match='does not exist'):
        find_split_dirs(str(tmp_path / 'absent'))
    (tmp_path / 'train').mkdir()
    with pytest.raises(DatasetError, match='val'):
        find_split_dirs(str(tmp_path))


def test_mismatched_classes_are_listed(make_dataset):
    root = make_dataset({'train': {'circle_red': 3, 'square_green': 3}, 'val': {'circle_red': 1, 'cross_yellow': 1}})
    with pytest.raises(DatasetError) as info:
        build_datasets(str(root), CONFIG, dict(AUG), seed=0)
    assert 'square_green' in str(info.value) and 'cross_yellow' in str(info.value)


def test_empty_class_folders_are_a_clear_error(tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'val' / 'a').mkdir(parents=True)
    with pytest.raises(DatasetError, match='cannot read images'):
        build_datasets(str(tmp_path), CONFIG, dict(AUG), seed=0)


@pytest.mark.parametrize('size, world', [(19, 2), (19, 4), (7, 8), (20, 3)])
def test_eval_shards_cover_every_image_exactly_once(size, world):
    seen = [i for rank in range(world) for i in ShardWithoutPadding(size, rank, world)]
    assert sorted(seen) == list(range(size))


def test_train_shards_are_disjoint_and_reshuffled_per_epoch(shapes_dataset):
    train_set, val_set, _ = build_datasets(str(shapes_dataset), CONFIG, dict(AUG), seed=0)
    samplers = [build_loaders(train_set, val_set, 4, 4, 0, rank, 2, 0, False)[0].sampler for rank in (0, 1)]
    epoch0 = [[i for _, i in s] for s in samplers]
    assert not set(epoch0[0]) & set(epoch0[1]) and len(epoch0[0]) == 24
    for s in samplers:
        s.set_epoch(1)
    assert [[i for _, i in s] for s in samplers] != epoch0


def test_augmentation_depends_only_on_seed_epoch_and_image(shapes_dataset):
    train_set, _, _ = build_datasets(str(shapes_dataset), CONFIG, dict(AUG), seed=0)
    torch.manual_seed(123)
    a = train_set[(2, 7)][0]
    torch.manual_seed(456)  # global state must not matter ...
    b = train_set[(2, 7)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, train_set[(3, 7)][0])  # ... but the epoch does
    state = torch.get_rng_state()
    train_set[(0, 1)]
    assert torch.equal(state, torch.get_rng_state()), 'loading in the main process must not disturb the RNG'


def test_too_few_images_for_one_batch_is_a_clear_error(shapes_dataset):
    train_set, val_set, _ = build_datasets(str(shapes_dataset), CONFIG, dict(AUG), seed=0)
    with pytest.raises(DatasetError, match='fewer than one batch'):
        build_loaders(train_set, val_set, 64, 4, 0, 0, 1, 0, False)


def test_mixup_gives_soft_targets_and_soft_target_loss():
    mixup = build_mixup(0.8, 1.0, None, 1.0, 0.5, 'batch', 0.1, num_classes=4)
    images, targets = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    assert type(build_train_criterion(mixup, 0.1)).__name__ == 'SoftTargetCrossEntropy'
    assert build_mixup(0, 0, None, 1.0, 0.5, 'batch', 0.1, 4) is None
    assert type(build_train_criterion(None, 0.1)).__name__ == 'LabelSmoothingCrossEntropy'
    assert isinstance(build_train_criterion(None, 0.0), torch.nn.CrossEntropyLoss)


@pytest.mark.parametrize('seed', [20240101, 2**63 - 1])
def test_any_seed_a_user_types_trains(shapes_dataset, seed):
    from utils.resume import set_seed
    train_set, val_set, _ = build_datasets(str(shapes_dataset), CONFIG, dict(AUG), seed=seed)
    train_loader, _ = build_loaders(train_set, val_set, 4, 4, 0, 0, 1, seed, False)
    train_loader.sampler.set_epoch(299)
    images, targets = next(iter(train_loader))
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4,)
    set_seed(seed, epoch=299, rank=7)
    assert not torch.equal(train_set[(3, 5)][0], train_set[(4, 5)][0])  # epochs still draw their own numbers


def test_the_default_seed_draws_the_numbers_it_always_drew(shapes_dataset):
    import random
    import numpy as np
    from utils.resume import set_seed
    train_set, _, _ = build_datasets(str(shapes_dataset), CONFIG, dict(AUG), seed=42)
    image_seed = (42 * 1_000_003 + 2) * 10_000_019 + 7  # how every run so far seeded image 7 in epoch 2
    random.seed(image_seed), np.random.seed(image_seed % 2**32), torch.manual_seed(image_seed)
    assert torch.equal(train_set.dataset[7][0], train_set[(2, 7)][0])
    set_seed(42, epoch=3, rank=1)
    assert torch.initial_seed() == (42 * 1_000_003 + 3) * 1009 + 1


def test_hidden_folders_are_never_classes_and_are_reported(make_dataset, caplog):
    import logging
    from PIL import Image
    from utils.data import find_class_map
    from utils.data import check_dataset_layout
    root = make_dataset()
    for hidden in (root / 'train' / '.ipynb_checkpoints', root / 'val' / '.cache' / 'x',
                   root / 'train' / 'circle_red' / '.thumbnails'):
        hidden.mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(hidden / 'img.png')
    Image.new('RGB', (8, 8)).save(root / 'train' / 'circle_red' / '.hidden.png')
    assert check_dataset_layout(str(root)).classes == sorted(CLASS_NAMES)
    assert list(find_class_map(str(root / 'train'))) == sorted(CLASS_NAMES)
    logger = logging.getLogger('van')  # main.py's logger (utils.reporting.setup_logger may stop its propagation)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger='van'):
            train_set, val_set, class_to_idx = build_datasets(str(root), CONFIG, dict(AUG), seed=0)
    finally:
        logger.removeHandler(caplog.handler)
    assert list(class_to_idx) == sorted(CLASS_NAMES) and len(train_set) == 48 and len(val_set) == 19
    (line,) = {r.getMessage() for r in caplog.records if 'hidden' in r.getMessage()}  # one line for both splits
    assert '.ipynb_checkpoints' in line and '.cache' in line

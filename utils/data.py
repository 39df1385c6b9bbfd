"""ImageFolder datasets, timm transforms, loaders, Mixup/CutMix and the loss that goes with them.

Training augmentation is made reproducible per image: the random state used to augment image i in
epoch e depends only on (seed, e, i), so a resumed run, or a run with another number of workers,
sees exactly the same images as an uninterrupted one, even with persistent workers.
"""
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.data_layout import class_folders
from utils.errors import DatasetError
from utils.images import RobustImageFolder, SkipCounter, collate_samples
from utils.logger import LOGGER_NAME
from utils.preemption import leave_stop_signals_to_parent, stop_signals_held
from utils.rng_state import torch_seed
from utils.sampler import ResumableSampler

VAL_DIR_NAMES = ('val', 'validation')


@dataclass
class DataConfig:
    """Preprocessing of the model (timm's resolve_data_config output, possibly overridden by flags)."""
    input_size: tuple
    interpolation: str
    mean: tuple
    std: tuple
    crop_pct: float


def find_split_dirs(data_path: str):
    """(train_dir, val_dir) under the dataset root; val may be called val/ or validation/."""
    if not os.path.isdir(data_path):
        raise DatasetError(f'dataset folder {data_path!r} does not exist; pass --data_path DIR '
                           'with DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg')
    train_dir = os.path.join(data_path, 'train')
    val_dirs = [os.path.join(data_path, name) for name in VAL_DIR_NAMES]
    val_dir = next((d for d in val_dirs if os.path.isdir(d)), None)
    if not os.path.isdir(train_dir):
        raise DatasetError(f'{train_dir!r} does not exist: the dataset root must hold train/ and val/ '
                           '(one sub-folder of images per class)')
    if val_dir is None:
        raise DatasetError(f'neither {val_dirs[0]!r} nor {val_dirs[1]!r} exists: the dataset root must '
                           'hold train/ and val/ (one sub-folder of images per class)')
    return train_dir, val_dir


def _image_folder(root: str, transform, on_bad: str, strict: bool) -> RobustImageFolder:
    try:
        return RobustImageFolder(root, transform=transform, on_bad=on_bad, strict=strict)
    except (FileNotFoundError, RuntimeError) as error:
        # torchvision raises when a split has no class folders or no images in them.
        raise DatasetError(f'cannot read images under {root!r}: {error}') from None


def check_same_classes(train_classes: Dict[str, int], val_classes: Dict[str, int], train_dir, val_dir):
    if train_classes == val_classes:
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    raise DatasetError(
        f'{train_dir!r} and {val_dir!r} must contain the same class folders; '
        f'only in train: {only_train[:10] or "none"}, only in val: {only_val[:10] or "none"}')


class SeededPerImage(Dataset):
    """Wraps a training dataset so each image's augmentation is seeded by (seed, epoch, index).

    The sampler yields (epoch, index) pairs. In the main process (workers=0) the global random
    states are restored afterwards so model-side randomness (drop path, mixup) is not disturbed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, epoch_and_index):
        epoch, index = epoch_and_index
        image_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        in_main_process = torch.utils.data.get_worker_info() is None
        if in_main_process:
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(image_seed)
        np.random.seed(image_seed % 2**32)
        torch.manual_seed(torch_seed(image_seed))
        try:
            return self.dataset[index]
        finally:
            if in_main_process:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class EpochTaggingSampler(Sampler):
    """A ResumableSampler whose indices carry the epoch, for SeededPerImage."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int, start: int = 0):
        """`start`: samples all ranks already used in this epoch (a run resumed mid-epoch)."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch, start)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


class ShardWithoutPadding(Sampler):
    """Rank r evaluates images r, r+W, r+2W, ...: every image exactly once over all ranks.

    DistributedSampler pads the last shard with repeated images so ranks get equal counts; that
    would count those images twice in the accuracy.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def find_class_map(train_dir: str) -> Dict[str, int]:
    """Class folder -> index, as RobustImageFolder assigns them (sorted names), without listing images."""
    classes, _ = class_folders(train_dir)
    if not classes:
        raise DatasetError(f'no class folders in {train_dir!r}')
    return {name: index for index, name in enumerate(classes)}


def _report_left_out(folders, logger: logging.Logger) -> None:
    """One line each for the hidden class-level folders and the looping links the listing left out."""
    hidden = [os.path.join(f.root, name) for f in folders for name in f.hidden_folders]
    if hidden:
        logger.info(f'ignoring hidden folders (a name starting with "." is never a class): {", ".join(hidden[:5])}'
                    + (f' and {len(hidden) - 5} more' if len(hidden) > 5 else ''))
    loops = [link for f in folders for link in f.looping_links]
    if loops:
        logger.warning(f'not following {len(loops)} link(s) that lead back to a folder already listed or one above '
                       f'it (each folder is listed once): {", ".join(loops[:5])}' + (' ...' if len(loops) > 5 else ''))


def build_datasets(data_path: str, data_config: DataConfig, train_aug: dict, seed: int, with_train: bool = True,
                   strict_data: bool = False):
    """(train_set, val_set, class_to_idx); `train_aug` holds timm create_transform kwargs for training
    (auto_augment, re_prob, re_mode, re_count, color_jitter, interpolation). Without `with_train`
    (evaluation) the training images are not listed, only its class folders, and train_set is None.
    Hidden folders and looping links left out of the listing are reported to the run's logger."""
    logger = logging.getLogger(LOGGER_NAME)
    train_dir, val_dir = find_split_dirs(data_path)
    if not with_train:
        val_folder = _image_folder(val_dir, create_transform(
            data_config.input_size, is_training=False, interpolation=data_config.interpolation,
            mean=data_config.mean, std=data_config.std, crop_pct=data_config.crop_pct), 'drop', strict_data)
        class_to_idx = find_class_map(train_dir)
        check_same_classes(class_to_idx, val_folder.class_to_idx, train_dir, val_dir)
        _report_left_out([val_folder], logger)
        return None, val_folder, class_to_idx
    train_transform = create_transform(
        data_config.input_size, is_training=True, mean=data_config.mean, std=data_config.std, **train_aug)
    val_transform = create_transform(
        data_config.input_size, is_training=False, interpolation=data_config.interpolation,
        mean=data_config.mean, std=data_config.std, crop_pct=data_config.crop_pct)
    # An unreadable training image is replaced by another sample (the batch stays full); an unreadable
    # validation image is left out, so no image is counted twice. strict_data: stop at the first one.
    train_folder = _image_folder(train_dir, train_transform, 'substitute', strict_data)
    val_folder = _image_folder(val_dir, val_transform, 'drop', strict_data)
    check_same_classes(train_folder.class_to_idx, val_folder.class_to_idx, train_dir, val_dir)
    _report_left_out([train_folder, val_folder], logger)
    return SeededPerImage(train_folder, seed), val_folder, dict(train_folder.class_to_idx)


class StopSignalSafeLoader(DataLoader):
    """DataLoader whose worker processes leave SIGTERM/SIGINT sent to the whole process group to the
    main process, which saves a recovery point before it stops (utils.preemption)."""

    def __init__(self, dataset: Dataset, **kwargs):
        super().__init__(dataset, worker_init_fn=leave_stop_signals_to_parent, **kwargs)

    def __iter__(self):
        with stop_signals_held():  # workers may start here; they inherit the held signals
            return super().__iter__()


def build_loaders(train_set: Optional[Dataset], val_set: Dataset, batch_size: int, val_batch_size: int,
                  workers: int, rank: int, world_size: int, seed: int, pin_memory: bool,
                  pin_memory_device: str = ''):
    """Training loader (sharded and shuffled per epoch, last partial batch dropped as in the reference,
    which also keeps Mixup's even-batch requirement) and an unpadded evaluation loader. Both yield
    (images, targets) and count the unreadable files of each pass in `.skipped` (utils.images).
    pin_memory(_device): utils.device.pin_memory_settings."""
    common = dict(num_workers=workers, pin_memory=pin_memory, pin_memory_device=pin_memory_device,
                  persistent_workers=workers > 0, collate_fn=collate_samples)
    train_loader = None
    if train_set is not None:
        per_rank = math.ceil(len(train_set) / world_size)
        if per_rank < batch_size:
            raise DatasetError(f'the training set has {len(train_set)} images, fewer than one batch per '
                               f'process ({batch_size} x {world_size} processes); lower --batch-size')
        sampler = EpochTaggingSampler(ResumableSampler(
            len(train_set), num_replicas=world_size, rank=rank, shuffle=True, seed=seed))
        # Worker seeds come from the loader's own generator, so starting an epoch does not advance the
        # global RNG that a mid-epoch resume restores (images are seeded by SeededPerImage anyway).
        train_loader = SkipCounter(StopSignalSafeLoader(
            train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
            generator=torch.Generator().manual_seed(torch_seed(seed)), **common))
    val_loader = SkipCounter(StopSignalSafeLoader(
        val_set, batch_size=val_batch_size, shuffle=False, drop_last=False,
        sampler=ShardWithoutPadding(len(val_set), rank, world_size), **common))
    return train_loader, val_loader


def build_mixup(mixup: float, cutmix: float, cutmix_minmax, prob: float, switch_prob: float, mode: str,
                smoothing: float, num_classes: int) -> Optional[Mixup]:
    if mixup <= 0 and cutmix <= 0 and cutmix_minmax is None:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=prob,
                 switch_prob=switch_prob, mode=mode, label_smoothing=smoothing, num_classes=num_classes)


def build_train_criterion(mixup_fn: Optional[Mixup], smoothing: float) -> torch.nn.Module:
    """Mixup produces soft targets (smoothing folded in); otherwise label smoothing or plain CE."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()

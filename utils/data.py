"""The dataset of a run: its folder layout, ImageFolder datasets, sample order, loaders, Mixup/CutMix
and the loss that goes with them.

Layout. A wrong --data_path is the most common first error. Found late (after the model is built,
or deep inside torchvision) it costs minutes and shows a traceback; `check_dataset_layout` finds it
first and names the folder and what the layout must be:

    DATA/train/<class>/<image>    DATA/val/<class>/<image>    (val/ may be named validation/)

Only the first image of each class folder is looked for, and only the first image of each split is
decoded (a split where none can be read would fail every evaluation), so the check takes well under
a second even on ImageNet's 1.28 million files. Which files count as images, and how folders are
walked, is utils.images' rule (the dataset listing uses the same).

Sample order. The order of epoch `e` is a permutation drawn from `seed + e` alone, so any process
can rebuild it (`ResumableSampler`). Ranks take interleaved slices (rank r gets positions r, r+W,
r+2W, ... like DistributedSampler), which means that after k steps of batch B on W ranks exactly the
first k*B*W positions of the permutation have been used, whatever W and B were. A resumed run skips
exactly those positions: no sample is repeated or left out, even when it resumes with a different
number of devices. Started at position 0 it yields exactly what torch's DistributedSampler yields.

Augmentation. Training augmentation is made reproducible per image: the random state used to
augment image i in epoch e depends only on (seed, e, i) (`SeededPerImage`), so a resumed run, or a
run with another number of workers, sees exactly the same images as an uninterrupted one, even with
persistent workers.
"""
import logging
import math
import os
import random
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils.errors import BadImageError, DatasetError
from utils.images import (DataConfig, RobustImageFolder, SkipCounter, class_folders, collate_samples, eval_transform,
                          image_files, is_folder, load_rgb, visible_entries)
from utils.reporting import LOGGER_NAME
from utils.resume import leave_stop_signals_to_parent, stop_signals_held, torch_seed

VAL_DIR_NAMES = ('val', 'validation')
LAYOUT_HELP = "expected DATA/train/<class>/<image> and DATA/val/<class>/<image> (val/ may be named validation/)"


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
class DatasetLayout(NamedTuple):
    train_dir: Optional[Path]  # None when only evaluation was asked for
    val_dir: Path
    classes: List[str]


def find_split_dirs(data_path: Optional[str], need_train: bool = True) -> Tuple[Optional[str], str]:
    """(train_dir, val_dir) under the dataset root; val may be called val/ or validation/ (VAL_DIR_NAMES).
    need_train=False (evaluation only): train_dir is None when there is no train/."""
    if not data_path:
        raise DatasetError(f"no dataset given: pass --data_path DATA where {LAYOUT_HELP}")
    root = Path(data_path).expanduser()
    if not root.exists():
        raise DatasetError(f"--data_path {data_path} does not exist; {LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetError(f"--data_path {data_path} is a file, not a folder; {LAYOUT_HELP}")
    train_dir = root / "train"
    val_dir = next((root / name for name in VAL_DIR_NAMES if (root / name).is_dir()), None)
    missing = [name for name, present in (("train/", train_dir.is_dir() or not need_train), ("val/", val_dir is not None))
               if not present]
    if missing:
        with os.scandir(root) as it:
            found = ", ".join(e.name for e in visible_entries(it)[:10]) or "nothing"
        raise DatasetError(f"{root} has no {' and no '.join(missing)} folder (it holds: {found}); {LAYOUT_HELP}")
    return (str(train_dir) if train_dir.is_dir() else None), str(val_dir)


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], train_dir, val_dir) -> None:
    """Class indices come from the sorted folder names, so both splits must hold the same class folders."""
    if sorted(train_classes) == sorted(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    details = "; ".join(
        f"only in {split}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        for split, names in (("train/", only_train), (Path(val_dir).name + "/", only_val)) if names)
    raise DatasetError(
        f"train/ and {Path(val_dir).name}/ of {Path(train_dir).parent} have different classes ({details}); class "
        "indices come from the sorted folder names, so both splits need the same class folders")


def _check_readable(split_dir: Path, classes: List[str]) -> None:
    """At least one image of the split must decode: otherwise every evaluation (or training step)
    would fail after minutes or hours of work. Stops at the first readable image, so it costs one
    decode unless the split is broken."""
    tried, first_error = 0, None
    for cls in classes:
        for path in image_files(str(split_dir / cls)):
            try:
                load_rgb(path)
                return
            except BadImageError as e:
                tried += 1
                first_error = first_error or e
    raise DatasetError(
        f"no image in {split_dir} can be read: all {tried} image files fail (first: {first_error}); "
        "fix or replace them, or check the disk")


def _has_image(folder: str) -> bool:
    """True as soon as one image file is found anywhere below `folder` (ImageFolder looks recursively)."""
    return next(image_files(folder), None) is not None


def _class_folders(split_dir: Path) -> List[str]:
    try:
        with os.scandir(split_dir) as it:
            entries = visible_entries(it)
    except OSError as e:
        raise DatasetError(f"cannot read {split_dir}: {e.strerror}") from None
    files = [e.name for e in entries if not is_folder(e, split_dir)]
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DatasetError(
            f"{split_dir} holds files directly ({shown}); put every image in a folder named after its class: "
            f"{split_dir}/<class>/<image> ({LAYOUT_HELP})")
    classes = [e.name for e in entries]
    if not classes:
        raise DatasetError(f"{split_dir} has no class folders; {LAYOUT_HELP}")
    empty = [c for c in classes if not _has_image(str(split_dir / c))]
    if len(empty) == len(classes):
        raise DatasetError(
            f"no images in {split_dir}: none of its {len(classes)} class folders holds a file with an image "
            f"extension ({', '.join(IMG_EXTENSIONS)})")
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(
            f"{len(empty)} class folder(s) in {split_dir} hold no images: {shown}; add images or remove the "
            "folder(s) (also from the other split, so both have the same classes)")
    return classes


def check_dataset_layout(data_path: Optional[str], need_train: bool = True) -> DatasetLayout:
    """Return the train/val folders and class names of `data_path`, or raise DatasetError.

    need_train=False (evaluation only) checks just the validation split.
    """
    train_dir, val_dir = find_split_dirs(data_path, need_train)
    val_dir = Path(val_dir)
    if not need_train:
        val_classes = _class_folders(val_dir)
        _check_readable(val_dir, val_classes)
        return DatasetLayout(None, val_dir, val_classes)
    train_dir = Path(train_dir)
    train_classes = _class_folders(train_dir)
    val_classes = _class_folders(val_dir)
    check_same_classes(train_classes, val_classes, train_dir, val_dir)
    _check_readable(train_dir, train_classes)
    _check_readable(val_dir, val_classes)
    return DatasetLayout(train_dir, val_dir, train_classes)


def find_class_map(train_dir: str) -> Dict[str, int]:
    """Class folder -> index, as RobustImageFolder assigns them (sorted names), without listing images."""
    classes, _ = class_folders(train_dir)
    if not classes:
        raise DatasetError(f'no class folders in {train_dir!r}')
    return {name: index for index, name in enumerate(classes)}


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
def _image_folder(root: str, transform, on_bad: str, strict: bool) -> RobustImageFolder:
    try:
        return RobustImageFolder(root, transform=transform, on_bad=on_bad, strict=strict)
    except (FileNotFoundError, RuntimeError) as error:
        # torchvision raises when a split has no class folders or no images in them.
        raise DatasetError(f'cannot read images under {root!r}: {error}') from None


def train_transform(data_config: DataConfig, augmentation: dict):
    """timm's training transform at the model's input size and normalisation; `augmentation` holds
    create_transform's augmentation kwargs (utils.options.train_augmentation: auto_augment, re_prob,
    re_mode, re_count, color_jitter, interpolation, scale, ratio, hflip, vflip)."""
    return create_transform(data_config.input_size, is_training=True, mean=data_config.mean, std=data_config.std,
                            **augmentation)


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
    """(train_set, val_set, class_to_idx); `train_aug`: augmentation kwargs of `train_transform`. Without `with_train`
    (evaluation) the training images are not listed, only its class folders, and train_set is None.
    Hidden folders and looping links left out of the listing are reported to the run's logger."""
    logger = logging.getLogger(LOGGER_NAME)
    train_dir, val_dir = find_split_dirs(data_path)
    if not with_train:
        val_folder = _image_folder(val_dir, eval_transform(data_config), 'drop', strict_data)
        class_to_idx = find_class_map(train_dir)
        check_same_classes(list(class_to_idx), list(val_folder.class_to_idx), train_dir, val_dir)
        _report_left_out([val_folder], logger)
        return None, val_folder, class_to_idx
    # An unreadable training image is replaced by another sample (the batch stays full); an unreadable
    # validation image is left out, so no image is counted twice. strict_data: stop at the first one.
    train_folder = _image_folder(train_dir, train_transform(data_config, train_aug), 'substitute', strict_data)
    val_folder = _image_folder(val_dir, eval_transform(data_config), 'drop', strict_data)
    check_same_classes(list(train_folder.class_to_idx), list(val_folder.class_to_idx), train_dir, val_dir)
    _report_left_out([train_folder, val_folder], logger)
    return SeededPerImage(train_folder, seed), val_folder, dict(train_folder.class_to_idx)


# ---------------------------------------------------------------------------------------------
# Sample order and loaders
# ---------------------------------------------------------------------------------------------
class ResumableSampler(Sampler[int]):
    """Per-epoch shuffled, rank-sharded order of sample indices that can start part-way.

    Call `set_epoch(epoch, start=consumed)` before each epoch; `consumed` is the number of samples
    all ranks together have already used in that epoch (0 for a fresh epoch). With drop_last the
    tail that does not fill one step on every rank is left out (as the reference's drop_last
    training loader does); otherwise it is padded with the epoch's first samples (as
    DistributedSampler does; the training DataLoader's own drop_last then drops the partial batch).
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside 0..{self.num_samples} for a dataset of {self.num_samples} samples")
        self.epoch = epoch
        self.start = start

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed(torch_seed(self.seed + self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def _remaining_per_rank(self) -> int:
        remaining = self.num_samples - self.start
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        remaining = order[self.start:]
        per_rank = self._remaining_per_rank()
        total = per_rank * self.num_replicas
        if total > len(remaining):  # pad so every rank gets the same number of samples
            padding = order[: total - len(remaining)]
            remaining = torch.cat([remaining, padding])
        return iter(remaining[self.rank:total:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self._remaining_per_rank()


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


class StopSignalSafeLoader(DataLoader):
    """DataLoader whose worker processes leave SIGTERM/SIGINT sent to the whole process group to the
    main process, which saves a recovery point before it stops (utils.resume)."""

    def __init__(self, dataset: Dataset, **kwargs):
        super().__init__(dataset, worker_init_fn=leave_stop_signals_to_parent, **kwargs)

    def __iter__(self):
        with stop_signals_held():  # workers may start here; they inherit the held signals
            return super().__iter__()


class RunData(NamedTuple):
    """The datasets of a run and their loaders (build_datasets, build_loaders); the training ones are None
    for an evaluation."""
    train_set: Optional[Dataset]
    val_set: Dataset
    class_to_idx: Dict[str, int]
    train_loader: Optional[SkipCounter]
    val_loader: SkipCounter


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

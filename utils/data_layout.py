"""Checking the dataset folder layout before anything expensive starts.

A wrong --data_path is the most common first error. Found late (after the model is built, or
deep inside torchvision) it costs minutes and shows a traceback; found here it is one message that
names the folder and says what the layout must be:

    DATA/train/<class>/<image>    DATA/val/<class>/<image>    (val/ may be named validation/)

Only the first image of each class folder is looked for, so the check takes well under a second
even on ImageNet's 1.28 million files.
"""
import os
from pathlib import Path
from typing import List, NamedTuple, Optional

from torchvision.datasets.folder import IMG_EXTENSIONS

LAYOUT_HELP = "expected DATA/train/<class>/<image> and DATA/val/<class>/<image> (val/ may be named validation/)"
VAL_NAMES = ("val", "validation")


class DatasetLayoutError(ValueError):
    """The dataset folder cannot be used as it is; the message says why and what to change."""


class DatasetLayout(NamedTuple):
    train_dir: Optional[Path]  # None when only evaluation was asked for
    val_dir: Path
    classes: List[str]


def _visible(entries):
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _has_image(folder: str) -> bool:
    """True as soon as one image file is found anywhere below `folder` (ImageFolder looks recursively)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".") for name in filenames):
            return True
    return False


def _class_folders(split_dir: Path) -> List[str]:
    try:
        with os.scandir(split_dir) as it:
            entries = _visible(it)
    except OSError as e:
        raise DatasetLayoutError(f"cannot read {split_dir}: {e.strerror}") from None
    files = [e.name for e in entries if not e.is_dir()]
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DatasetLayoutError(
            f"{split_dir} holds files directly ({shown}); put every image in a folder named after its class: "
            f"{split_dir}/<class>/<image> ({LAYOUT_HELP})")
    classes = [e.name for e in entries]
    if not classes:
        raise DatasetLayoutError(f"{split_dir} has no class folders; {LAYOUT_HELP}")
    empty = [c for c in classes if not _has_image(str(split_dir / c))]
    if len(empty) == len(classes):
        raise DatasetLayoutError(
            f"no images in {split_dir}: none of its {len(classes)} class folders holds a file with an image "
            f"extension ({', '.join(IMG_EXTENSIONS)})")
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetLayoutError(
            f"{len(empty)} class folder(s) in {split_dir} hold no images: {shown}; add images or remove the "
            "folder(s) (also from the other split, so both have the same classes)")
    return classes


def check_dataset_layout(data_path: Optional[str], need_train: bool = True) -> DatasetLayout:
    """Return the train/val folders and class names of `data_path`, or raise DatasetLayoutError.

    need_train=False (evaluation only) checks just the validation split.
    """
    if not data_path:
        raise DatasetLayoutError(f"no dataset given: pass --data_path DATA where {LAYOUT_HELP}")
    root = Path(data_path).expanduser()
    if not root.exists():
        raise DatasetLayoutError(f"--data_path {data_path} does not exist; {LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetLayoutError(f"--data_path {data_path} is a file, not a folder; {LAYOUT_HELP}")
    train_dir = root / "train"
    val_dir = next((root / name for name in VAL_NAMES if (root / name).is_dir()), None)
    missing = [name for name, present in (("train/", train_dir.is_dir() or not need_train), ("val/", val_dir is not None))
               if not present]
    if missing:
        with os.scandir(root) as it:
            found = ", ".join(e.name for e in _visible(it)[:10]) or "nothing"
        raise DatasetLayoutError(
            f"{root} has no {' and no '.join(missing)} folder (it holds: {found}); {LAYOUT_HELP}")
    train_classes = _class_folders(train_dir) if need_train else None
    val_classes = _class_folders(val_dir)
    if not need_train:
        return DatasetLayout(None, val_dir, val_classes)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        details = "; ".join(
            f"only in {split}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            for split, names in (("train/", only_train), (val_dir.name + "/", only_val)) if names)
        raise DatasetLayoutError(
            f"train/ and {val_dir.name}/ of {root} have different classes ({details}); class indices come from the "
            "sorted folder names, so both splits need the same class folders")
    return DatasetLayout(train_dir, val_dir, train_classes)

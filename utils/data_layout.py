"""Checking the dataset folder layout before anything expensive starts.

A wrong --data_path is the most common first error. Found late (after the model is built, or
deep inside torchvision) it costs minutes and shows a traceback; found here it is one message that
names the folder and says what the layout must be:

    DATA/train/<class>/<image>    DATA/val/<class>/<image>    (val/ may be named validation/)

Only the first image of each class folder is looked for, and only the first image of each split is
decoded (a split where none can be read would fail every evaluation), so the check takes well under
a second even on ImageNet's 1.28 million files.

This module also decides, for the check and for the dataset listing (utils.images.RobustImageFolder)
alike, what the folders hold: hidden names are never classes or images, and links are followed
without ever looping (`walk_folder`).
"""
import os
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

from torchvision.datasets.folder import IMG_EXTENSIONS

from utils.errors import DatasetError

LAYOUT_HELP = "expected DATA/train/<class>/<image> and DATA/val/<class>/<image> (val/ may be named validation/)"
VAL_NAMES = ("val", "validation")


class DatasetLayout(NamedTuple):
    train_dir: Optional[Path]  # None when only evaluation was asked for
    val_dir: Path
    classes: List[str]


def is_hidden(name: str) -> bool:
    """Names starting with '.' (.ipynb_checkpoints, .DS_Store, macOS's ._* files) are never classes
    or images: such folders and files are left out everywhere (this check and the dataset listing)."""
    return name.startswith(".")


def _visible(entries):
    return sorted((e for e in entries if not is_hidden(e.name)), key=lambda e: e.name)


def _is_folder(entry: os.DirEntry, split_dir) -> bool:
    """entry.is_dir(), following links; a link that loops back on itself is a clear error."""
    try:
        return entry.is_dir()
    except OSError as e:  # ELOOP: a link to itself (class -> class) can never be opened
        raise DatasetError(
            f"cannot open {os.path.join(split_dir, entry.name)}: {e.strerror} (a symbolic link that loops back on "
            "itself?); make it a folder of images or a link to one, or remove it") from None


def class_folders(split_dir) -> Tuple[List[str], List[str]]:
    """(class names, hidden folder names) of a split folder: its visible sub-folders (links to folders
    count, as in torchvision's ImageFolder), sorted, and the hidden ones, which are never classes.
    Files directly in the split are not classes either (check_dataset_layout reports them)."""
    try:
        with os.scandir(split_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot read {split_dir}: {e.strerror}") from None
    folders = [e for e in entries if _is_folder(e, split_dir)]
    return ([e.name for e in folders if not is_hidden(e.name)], [e.name for e in folders if is_hidden(e.name)])


def _folder_key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_folder(folder: str, loops: Optional[list] = None) -> Iterator[Tuple[str, List[str]]]:
    """Yield (path, sorted names of its visible entries that are not folders) for `folder` and every
    visible folder below it, depth first in name order.

    Links are followed, as ImageFolder does, but never into a folder already walked or one that holds
    `folder` (a link to '.', '..' or any folder above loops: ImageFolder would walk it until the
    system's link limit and list the same images 40 times). Such links are appended to `loops`.
    """
    # Every folder above `folder` counts as walked, so that a link back up is seen as the loop it is.
    real = os.path.realpath(folder)
    seen = {key for key in map(_folder_key, _parents(real)) if key is not None}
    stack = [folder]
    while stack:
        path = stack.pop()
        key = _folder_key(path)
        if key is None:
            continue
        if key in seen:
            if loops is not None:
                loops.append(path)
            continue
        seen.add(key)
        try:
            with os.scandir(path) as it:
                entries = _visible(it)
        except OSError:
            continue  # unreadable folder: skipped, as os.walk does
        folders, files = [], []
        for entry in entries:
            try:
                is_folder = entry.is_dir()
            except OSError:  # a link looping on itself: a file that will not decode
                is_folder = False
            (folders if is_folder else files).append(entry.name)
        yield path, files
        stack.extend(os.path.join(path, name) for name in reversed(folders))


def _parents(path: str):
    parent = os.path.dirname(path)
    while parent != path:
        yield parent
        path, parent = parent, os.path.dirname(parent)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not is_hidden(name)


def _image_files(folder: str):
    """Image file paths below `folder`, in walk order (lazy: the first one comes at once)."""
    for path, files in walk_folder(folder):
        for name in files:
            if is_image_file(name):
                yield os.path.join(path, name)


def _has_image(folder: str) -> bool:
    """True as soon as one image file is found anywhere below `folder` (ImageFolder looks recursively)."""
    return next(_image_files(folder), None) is not None


def _check_readable(split_dir: Path, classes: List[str]) -> None:
    """At least one image of the split must decode: otherwise every evaluation (or training step)
    would fail after minutes or hours of work. Stops at the first readable image, so it costs one
    decode unless the split is broken."""
    from utils.images import BadImageError, load_rgb  # utils.images builds on this module

    tried, first_error = 0, None
    for cls in classes:
        for path in _image_files(str(split_dir / cls)):
            try:
                load_rgb(path)
                return
            except BadImageError as e:
                tried += 1
                first_error = first_error or e
    raise DatasetError(
        f"no image in {split_dir} can be read: all {tried} image files fail (first: {first_error}); "
        "fix or replace them, or check the disk")


def _class_folders(split_dir: Path) -> List[str]:
    try:
        with os.scandir(split_dir) as it:
            entries = _visible(it)
    except OSError as e:
        raise DatasetError(f"cannot read {split_dir}: {e.strerror}") from None
    files = [e.name for e in entries if not _is_folder(e, split_dir)]
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
    if not data_path:
        raise DatasetError(f"no dataset given: pass --data_path DATA where {LAYOUT_HELP}")
    root = Path(data_path).expanduser()
    if not root.exists():
        raise DatasetError(f"--data_path {data_path} does not exist; {LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetError(f"--data_path {data_path} is a file, not a folder; {LAYOUT_HELP}")
    train_dir = root / "train"
    val_dir = next((root / name for name in VAL_NAMES if (root / name).is_dir()), None)
    missing = [name for name, present in (("train/", train_dir.is_dir() or not need_train), ("val/", val_dir is not None))
               if not present]
    if missing:
        with os.scandir(root) as it:
            found = ", ".join(e.name for e in _visible(it)[:10]) or "nothing"
        raise DatasetError(
            f"{root} has no {' and no '.join(missing)} folder (it holds: {found}); {LAYOUT_HELP}")
    train_classes = _class_folders(train_dir) if need_train else None
    val_classes = _class_folders(val_dir)
    if not need_train:
        _check_readable(val_dir, val_classes)
        return DatasetLayout(None, val_dir, val_classes)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        details = "; ".join(
            f"only in {split}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            for split, names in (("train/", only_train), (val_dir.name + "/", only_val)) if names)
        raise DatasetError(
            f"train/ and {val_dir.name}/ of {root} have different classes ({details}); class indices come from the "
            "sorted folder names, so both splits need the same class folders")
    _check_readable(train_dir, train_classes)
    _check_readable(val_dir, val_classes)
    return DatasetLayout(train_dir, val_dir, train_classes)

"""Images: which files are images, how each decodes into RGB (or one clear error), the ImageFolder that
survives broken files, and the one evaluation preprocessing.

Large datasets always contain a few broken files. `load_rgb` decides, for one file, whether it can be
used and how it becomes an 8-bit RGB image; `RobustImageFolder` uses it so that a broken file costs
one sample instead of the run; `SkipCounter` counts and reports those files in the main process.

Decisions (each one documented here because it changes the pixels the model sees):
- Truncated JPEG/PNG: bad. Pillow could pad the missing rows with grey, but that trains on garbage.
- Zero-byte files and files Pillow cannot identify (a text file named .jpg): bad.
- Grayscale (1, L), CMYK, YCbCr: converted to RGB by Pillow.
- 16-bit grayscale (I;16*, I): scaled to 8 bit (value / 257). Pillow's own convert clips at 255,
  which would turn almost every pixel white.
- Transparency (RGBA, LA, PA, palette with a transparent colour): composited on white. Dropping
  alpha exposes whatever colour the encoder left under transparent pixels (often black or noise);
  white is what a viewer shows and what product/logo images are made for.
- More pixels than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 MP by
  default): bad, without decoding. No training image needs that many pixels (VAN trains on 224 px
  crops), such a file is usually an error or an attack, and decoding it costs gigabytes per worker.
  Users who really need huge images can raise `PIL.Image.MAX_IMAGE_PIXELS` (None disables it).
- More elongated than MAX_ASPECT_RATIO : 1 (a 2,000,000 x 1 strip, a 2 KB PNG): bad, without decoding.
  The pixel limit does not see what preprocessing will cost: the resize for the model scales the
  shorter side to the input size (248 px for 224 inputs), which would make that strip 496 million
  x 248 pixels, tens of GB. `check_image_size` is the rule.

Which files are images, for the dataset check (utils.data) and the listing alike: names starting
with '.' are never classes or images, and links are followed without ever looping (`walk_folder`).

Preprocessing for evaluation is one function, `eval_transform` of a `DataConfig` (the model's input
size, interpolation, mean, std and crop, `resolve_eval_config`): validation in training, --eval and
tools/predict.py all decode with `load_rgb` and apply it, so a prediction sees the pixels evaluation
sees (tools/export_onnx.py states the same config for the exported graph's input).
"""
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils.errors import BadImageError, DatasetError, UnreadableDatasetError

_logger = logging.getLogger(__name__)

# A substitute is looked for among the next samples of the (sorted) file list, which are usually
# of the same class. This many unreadable files in a row means the dataset, not a file, is broken.
MAX_CONSECUTIVE_BAD = 50

# No photograph or scan is this elongated (even wide panoramas stay far below it); past it, resizing the shorter
# side to the model input costs this many times the input's pixels or more.
MAX_ASPECT_RATIO = 100

_WHITE = (255, 255, 255)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert an already decoded image of any Pillow mode to 8-bit RGB (see module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # A palette image with a transparent index must go through RGBA to honour it.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        # 16-bit sources use the full 0..65535 range; an 'I' or 'F' image that stays within 0..255
        # is already 8-bit data stored wide.
        scale = 257.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def check_image_size(path: str, width: int, height: int) -> None:
    """Raise BadImageError when preprocessing an image of this size would cost far more than the
    image itself (see the module docstring); call it before decoding."""
    if width < 1 or height < 1:
        raise BadImageError(path, f"no pixels ({width} x {height})")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise BadImageError(path, f"{width} x {height} pixels is too elongated (aspect ratio {ratio:.0f}:1, more than "
                                  f"{MAX_ASPECT_RATIO}:1): resizing its shorter side to the model input would make it "
                                  f"{ratio:.0f} times the input's size; crop the file")


def load_rgb(path: str) -> Image.Image:
    """Decode `path` fully and return it as an 8-bit RGB image; raise BadImageError if it cannot be used."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat both the same way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_image_size(path, *img.size)
                img.load()  # decode now, so truncation is found here and not inside a transform
                return _to_rgb(img)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(path, f"too many pixels ({e}); resize the file or raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        # OSError: truncated or corrupt data, unreadable file; ValueError/SyntaxError: broken headers
        # and colour modes Pillow cannot convert.
        raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from None


def is_hidden(name: str) -> bool:
    """Names starting with '.' (.ipynb_checkpoints, .DS_Store, macOS's ._* files) are never classes
    or images: such folders and files are left out everywhere (this check and the dataset listing)."""
    return name.startswith(".")


def visible_entries(entries):
    """The entries of a scandir whose names are not hidden, sorted by name."""
    return sorted((e for e in entries if not is_hidden(e.name)), key=lambda e: e.name)


def is_folder(entry: os.DirEntry, split_dir) -> bool:
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
    folders = [e for e in entries if is_folder(e, split_dir)]
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
                entries = visible_entries(it)
        except OSError:
            continue  # unreadable folder: skipped, as os.walk does
        folders, files = [], []
        for entry in entries:
            try:
                entry_is_folder = entry.is_dir()
            except OSError:  # a link looping on itself: a file that will not decode
                entry_is_folder = False
            (folders if entry_is_folder else files).append(entry.name)
        yield path, files
        stack.extend(os.path.join(path, name) for name in reversed(folders))


def _parents(path: str):
    parent = os.path.dirname(path)
    while parent != path:
        yield parent
        path, parent = parent, os.path.dirname(parent)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not is_hidden(name)


def image_files(folder: str):
    """Image file paths below `folder`, in walk order (lazy: the first one comes at once)."""
    for path, files in walk_folder(folder):
        for name in files:
            if is_image_file(name):
                yield os.path.join(path, name)


@dataclass
class DataConfig:
    """Preprocessing of the model (timm's resolve_data_config output, possibly overridden by options)."""
    input_size: tuple
    interpolation: str
    mean: tuple
    std: tuple
    crop_pct: float


def resolve_eval_config(model, overrides: Optional[Mapping] = None) -> DataConfig:
    """The model's preprocessing (its pretrained_cfg) with `overrides` in timm's resolve_data_config terms
    (img_size or input_size, crop_pct, mean, std, interpolation; None keeps the model's value)."""
    from timm.data import resolve_data_config
    config = resolve_data_config(dict(overrides or {}), model=model)
    return DataConfig(config['input_size'], config['interpolation'], config['mean'], config['std'],
                      config['crop_pct'])


def eval_transform(config: DataConfig) -> Callable:
    """The one evaluation preprocessing of a decoded image (`load_rgb`): resize to input / crop_pct,
    center crop, normalise (timm's eval transform)."""
    from timm.data import create_transform
    return create_transform(config.input_size, is_training=False, interpolation=config.interpolation,
                            mean=config.mean, std=config.std, crop_pct=config.crop_pct)


class Sample(tuple):
    """(image, target), exactly what ImageFolder returns, plus attributes for collate_samples:
    `bad_files` holds 'path: reason' when the requested file was unreadable; `valid` is False for a
    placeholder that stands for an unreadable file in 'drop' mode; `error` is the exception that must
    stop the run (--strict-data, a broken dataset), raised by SkipCounter in the main process: raised
    in a DataLoader worker it would reach the user as a RuntimeError holding the worker's traceback."""

    def __new__(cls, image, target, bad_files: tuple = (), valid: bool = True, error: Optional[BadImageError] = None):
        sample = super().__new__(cls, (image, target))
        sample.bad_files, sample.valid, sample.error = bad_files, valid, error
        return sample

    def __getnewargs__(self):  # keeps the attributes when a DataLoader worker pickles the sample
        return self[0], self[1], self.bad_files, self.valid, self.error

    image = property(lambda self: self[0])
    target = property(lambda self: self[1])


class RobustImageFolder(ImageFolder):
    """torchvision ImageFolder that survives unreadable files.

    on_bad='substitute' (training): the next readable sample in file order is used instead, so the
        batch stays full; the choice depends only on the index, which keeps resumed runs exact.
    on_bad='drop' (evaluation): a placeholder marked invalid is returned and `collate_samples`
        removes it, so every readable validation image is counted exactly once and no image twice.
    strict=True: the first unreadable file stops the run with a BadImageError naming it.
    A substitute is transformed with the random state the requested sample would have used
    (see utils.data.SeededPerImage), so the choice and its augmentation are reproducible.
    Errors that stop the run travel in the sample (Sample.error) and SkipCounter raises them.

    Folders and files are listed as ImageFolder lists them, in the same order, except that hidden
    ones (names starting with '.') are left out (`hidden_folders` names those at the class level) and
    links are never followed into a folder listed already or one above (`looping_links`), see
    `walk_folder`.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, on_bad: str = "substitute",
                 strict: bool = False):
        if on_bad not in ("substitute", "drop"):
            raise ValueError(f"on_bad must be 'substitute' or 'drop', not {on_bad!r}")
        self.hidden_folders: List[str] = []
        self.looping_links: List[str] = []
        super().__init__(root, transform=transform, loader=load_rgb)
        self.on_bad = on_bad
        self.strict = strict

    def find_classes(self, directory: str):
        classes, self.hidden_folders = class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: Dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        """(path, class index) of every image, classes in index order, each class's files sorted by
        path (ImageFolder's order); is_valid_file(path) replaces the image-extension test."""
        if is_valid_file is None:
            suffixes = extensions or IMG_EXTENSIONS
            is_valid_file = lambda path: path.lower().endswith(suffixes)  # noqa: E731
        samples, empty = [], []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            found = [(os.path.join(folder, f), index)
                     for folder, files in sorted(walk_folder(os.path.join(directory, name), self.looping_links))
                     for f in files if is_valid_file(os.path.join(folder, f))]
            if not found:
                empty.append(name)
            samples += found
        if empty and not allow_empty:
            raise FileNotFoundError(f"no image files in the class folder(s) {', '.join(empty)} of {directory}")
        return samples

    def _load(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __getitem__(self, index: int) -> Sample:
        try:
            return self._sample(index)
        except BadImageError as error:  # stops the run; see Sample.error
            return Sample(None, -1, (), False, error)

    def _sample(self, index: int) -> Sample:
        bad: Optional[str] = None  # the requested file, when unreadable
        for offset in range(MAX_CONSECUTIVE_BAD):
            candidate = (index + offset) % len(self.samples)
            try:
                image, target = self._load(candidate)
                return Sample(image, target, (bad,) if bad else (), True)
            except BadImageError as e:
                if self.strict:
                    raise BadImageError(e.path, e.reason + " (--strict-data stops at the first unreadable file; "
                                        "remove or fix it, or run without --strict-data to skip such files)") from None
                # Only the requested file counts as skipped here: an unreadable substitute is counted
                # (and reported) when its own index comes up, so each file counts once per pass.
                bad = bad or str(e)
                if self.on_bad == "drop":
                    return Sample(self._placeholder(), self.samples[index][1], (bad,), False)
        raise UnreadableDatasetError(
            self.root, f"{MAX_CONSECUTIVE_BAD} unreadable images in a row (first: {bad}); the dataset looks "
                       "broken, check the files or the disk (finished epochs are kept: --resume auto continues "
                       "once it is fixed)")

    def _placeholder(self):
        # The evaluation transform of a blank image has the shape collation needs.
        image = Image.new("RGB", (256, 256), _WHITE)
        return self.transform(image) if self.transform is not None else image


class Batch(NamedTuple):
    images: torch.Tensor
    targets: torch.Tensor
    bad_files: tuple
    error: Optional[BadImageError] = None  # the first Sample.error of the batch


def collate_samples(samples: List[Sample]) -> Batch:
    """Collate Samples, dropping invalid placeholders and keeping every unreadable file met for the batch.

    Runs in the worker processes; the file names travel with the batch so the main process can count
    and report them (a counter inside the dataset would live in a worker's copy and be lost).
    """
    bad_files = tuple(f for s in samples for f in s.bad_files)
    error = next((s.error for s in samples if s.error is not None), None)
    if error is not None:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad_files, error)
    kept = [s for s in samples if s.valid]
    if kept:
        images, targets = default_collate([(s.image, s.target) for s in kept])
    else:
        # Every sample of this batch was unreadable: an empty batch of the right shape.
        images, targets = default_collate([(s.image, s.target) for s in samples[:1]])
        images, targets = images[:0], targets[:0]
    return Batch(images, targets, bad_files)


class SkipCounter:
    """Wraps a DataLoader of `collate_samples` batches: yields (images, targets), reports each
    unreadable file once per run with its path, and counts the skips of the current pass.

    Other attributes (sampler, dataset, batch_size...) are those of the wrapped loader.
    """

    def __init__(self, loader, log: Callable[[str], None] = _logger.warning):
        self.loader = loader
        self.log = log
        self.skipped = 0  # unreadable files met in the current pass over the loader
        self._reported = set()

    def __iter__(self):
        self.skipped = 0
        for batch in self.loader:
            if batch.error is not None:
                raise batch.error
            self.skipped += len(batch.bad_files)
            for bad_file in batch.bad_files:
                if bad_file not in self._reported:  # a file is reported once per run, not once per epoch
                    self._reported.add(bad_file)
                    self.log(f"Skipped unreadable image {bad_file}")
            yield batch.images, batch.targets

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

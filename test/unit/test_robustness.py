"""Faults a long training run meets: bad images, bad dataset layouts, preemption, non-finite
losses, unwritable output folders, unsafe checkpoint files."""
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from models import compat
from processes import Watched, has_exited, run_watched
from utils.data import check_dataset_layout
from utils.errors import BadImageError, DatasetError, NonFiniteLossError, OutputDirError
from utils.images import RobustImageFolder, SkipCounter, collate_samples, load_rgb
from utils.engine import NonFiniteGuard
from utils.checkpoint import check_output_dir
from utils.resume import RecoveryPoints, StopRequest, capture_rng_state, restore_rng_state, stop_requested
from utils.data import ResumableSampler

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


# ---------------------------------------------------------------- image files of every kind

def _jpeg_bytes(size=(32, 32), color=(10, 200, 30), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width=30000, height=30000) -> bytes:
    """A valid PNG header declaring 900 MP; Pillow must refuse it before decoding anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _thin_png(width=2_000_000, height=1) -> bytes:
    """A 2 KB PNG of 2 MP that the eval resize (shorter side to 248 px) would make 496 million x 248."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_usable_images(folder: Path):
    """Images that decode but are not 8-bit RGB; returns name -> expected RGB of pixel (0, 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 20, 20)).save(folder / "rgb.png")
    Image.new("L", (32, 32), 77).save(folder / "gray.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.save(folder / "rgba.png")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(folder / "palette.png", transparency=0)  # index 0 (black) is transparent
    gray16 = np.full((32, 32), 32896, dtype=np.uint16)  # 128 * 257: mid grey in 16 bit
    Image.fromarray(gray16).save(folder / "gray16.png")
    return {"rgb.png": (200, 20, 20), "gray.png": (77, 77, 77), "rgba.png": (255, 255, 255),
            "palette.png": (255, 255, 255), "gray16.png": (128, 128, 128)}


def _write_bad_images(folder: Path):
    """Files with image names that cannot be used; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _jpeg_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "corrupt.jpg").write_bytes(jpeg[:2] + bytes(range(256)) * 4)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(_bomb_png())
    (folder / "thin.png").write_bytes(_thin_png())
    return ["bomb.png", "corrupt.jpg", "empty.jpg", "text.png", "thin.png", "truncated.jpg"]


def test_usable_images_of_any_mode_become_8bit_rgb(tmp_path):
    expected = _write_usable_images(tmp_path)
    for name, color in expected.items():
        img = load_rgb(str(tmp_path / name))
        assert img.mode == "RGB" and img.size == (32, 32), name
        assert img.getpixel((0, 0)) == color, name
    # transparency is composited on white, not dropped: the opaque pixel keeps its colour
    assert load_rgb(str(tmp_path / "rgba.png")).getpixel((1, 1)) == (0, 0, 255)
    assert load_rgb(str(tmp_path / "palette.png")).getpixel((1, 1)) == (0, 255, 0)
    red, green, blue = load_rgb(str(tmp_path / "cmyk.jpg")).getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize("name", ["bomb.png", "corrupt.jpg", "empty.jpg", "text.png", "thin.png", "truncated.jpg"])
def test_unusable_image_raises_error_naming_the_file(tmp_path, name):
    _write_bad_images(tmp_path)
    with pytest.raises(BadImageError) as info:
        load_rgb(str(tmp_path / name))
    assert str(tmp_path / name) in str(info.value)


def test_an_image_too_elongated_to_preprocess_is_bad_before_decoding(tmp_path):
    (tmp_path / "thin.png").write_bytes(_thin_png())
    assert len(_thin_png()) < 3000
    with pytest.raises(BadImageError, match=r"2000000 x 1 pixels is too elongated \(aspect ratio 2000000:1"):
        load_rgb(str(tmp_path / "thin.png"))
    Image.new("RGB", (1000, 10)).save(tmp_path / "panorama.png")  # 100:1 is still an image
    assert load_rgb(str(tmp_path / "panorama.png")).size == (1000, 10)


def _image_folder(root: Path, bad_in: str = "b"):
    """Classes a and b with 4 good images each; class `bad_in` also holds every kind of bad file."""
    for cls, color in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (16, 16), color).save(root / cls / f"good{i}.png")
    _write_usable_images(root / "a")  # decodable oddities are used, not skipped
    return _write_bad_images(root / bad_in)


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_fills_batches_and_reports_each_bad_file_once(tmp_path, workers):
    bad_names = _image_folder(tmp_path)
    dataset = RobustImageFolder(str(tmp_path), transform=_to_tensor, on_bad="substitute")
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_samples)
    messages = []
    counted = SkipCounter(loader, log=messages.append)
    for _ in range(2):  # two epochs: counted twice, reported once
        sizes = [images.shape[0] for images, targets in counted]
        assert sum(sizes) == len(dataset) and counted.skipped == len(bad_names)
    assert len(messages) == len(bad_names)
    for name in bad_names:
        assert sum(str(tmp_path / "b" / name) in m for m in messages) == 1


def test_bad_file_is_replaced_by_the_same_sample_every_time(tmp_path):
    _image_folder(tmp_path)
    dataset = RobustImageFolder(str(tmp_path), transform=_to_tensor)
    paths = [p for p, _ in dataset.samples]
    bad = paths.index(str(tmp_path / "b" / "bomb.png"))
    first, second = dataset[bad], dataset[bad]
    assert first.valid and torch.equal(first.image, second.image) and first.bad_files == second.bad_files
    assert first.target == 1 and first.bad_files[0].startswith(str(tmp_path / "b" / "bomb.png"))


def test_evaluation_loader_counts_readable_images_once_and_skips_bad_ones(tmp_path):
    bad_names = _image_folder(tmp_path)
    dataset = RobustImageFolder(str(tmp_path), transform=_to_tensor, on_bad="drop")
    counted = SkipCounter(DataLoader(dataset, batch_size=3, collate_fn=collate_samples), log=lambda m: None)
    seen = sum(images.shape[0] for images, _ in counted)
    assert seen == len(dataset) - len(bad_names) and counted.skipped == len(bad_names)


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_data_stops_at_the_first_bad_file_naming_it(tmp_path, workers):
    _image_folder(tmp_path)
    dataset = RobustImageFolder(str(tmp_path), transform=_to_tensor, strict=True)
    loader = SkipCounter(DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_samples))
    with pytest.raises(BadImageError, match=r"^\S*b[/\\]bomb\.png: .*--strict-data") as info:
        for _ in loader:
            pass
    assert "Traceback" not in str(info.value)  # raised in this process, not wrapped by a worker


@pytest.mark.parametrize("workers", [0, 1])
def test_a_folder_of_only_bad_files_is_a_clear_error(tmp_path, workers):
    from utils.errors import UnreadableDatasetError
    _write_bad_images(tmp_path / "a")
    for i in range(60):
        (tmp_path / "a" / f"zero{i}.jpg").write_bytes(b"")
    dataset = RobustImageFolder(str(tmp_path), transform=_to_tensor)
    loader = SkipCounter(DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_samples))
    with pytest.raises(UnreadableDatasetError, match=f"^{tmp_path}: 50 unreadable images in a row") as info:
        next(iter(loader))
    assert "Traceback" not in str(info.value)


# ---------------------------------------------------------------- dataset layout

def _layout(root: Path, train=("a", "b"), val=("a", "b"), val_name="val"):
    for split, classes in (("train", train), (val_name, val)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(root / split / cls / "x.png")
    return root


def test_good_layout_is_accepted_with_validation_folder_name(tmp_path):
    layout = check_dataset_layout(str(_layout(tmp_path, val_name="validation")))
    assert layout.classes == ["a", "b"] and layout.val_dir.name == "validation"


@pytest.mark.parametrize("fault, message", [
    ("no_path", "pass --data_path"),
    ("missing", "does not exist"),
    ("no_train", "no train/ folder"),
    ("no_val", "no val/ folder"),
    ("empty_class", r"hold no images: b"),
    ("no_images", "no images in"),
    ("different_classes", r"different classes \(only in train/: b; only in val/: c\)"),
    ("files_in_train", r"holds files directly \(stray\.jpg\)"),
])
def test_bad_layout_gives_one_clear_message(tmp_path, fault, message):
    root = _layout(tmp_path / "data")
    if fault == "no_path":
        root = None
    elif fault == "missing":
        root = tmp_path / "nowhere"
    elif fault == "no_train":
        os.rename(root / "train", root / "training")
    elif fault == "no_val":
        os.rename(root / "val", root / "test")
    elif fault == "empty_class":
        (root / "train" / "b" / "x.png").unlink()
    elif fault == "no_images":
        for split in ("train", "val"):
            for cls in ("a", "b"):
                (root / split / cls / "x.png").rename(root / split / cls / "x.txt")
    elif fault == "different_classes":
        os.rename(root / "val" / "b", root / "val" / "c")
    elif fault == "files_in_train":
        Image.new("RGB", (8, 8)).save(root / "train" / "stray.jpg")
    with pytest.raises(DatasetError, match=message):
        check_dataset_layout(None if root is None else str(root))


def _images_in(folder: Path, count: int, color=(0, 0, 0)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), color).save(folder / f"{i}.png")


def test_links_are_followed_once_and_never_back_up(tmp_path):
    root = tmp_path / "train"
    _images_in(root / "a", 2)
    _images_in(root / "b", 3)
    _images_in(tmp_path / "elsewhere", 4)
    (root / "a" / "up").symlink_to("..")  # a loop: train/, which holds a
    (root / "b" / "here").symlink_to(".")  # a loop: the folder itself
    (root / "a" / "more").symlink_to(tmp_path / "elsewhere")  # another place: followed as always
    (root / "b" / "again").symlink_to(tmp_path / "elsewhere")  # another class may link there too
    (root / "b" / "x").mkdir()
    (root / "b" / "y").symlink_to("x")  # the same folder twice: listed once
    _images_in(root / "b" / "x", 1)
    dataset = RobustImageFolder(str(root))
    per_class = [sum(1 for _, target in dataset.samples if target == t) for t in (0, 1)]
    assert dataset.classes == ["a", "b"] and per_class == [2 + 4, 3 + 4 + 1]
    assert len({path for path, _ in dataset.samples}) == len(dataset.samples)
    assert sorted(Path(p).name for p in dataset.looping_links) == ["here", "up", "y"]


def test_a_split_with_links_back_up_passes_the_layout_check(tmp_path):
    root = _layout(tmp_path)
    (root / "train" / "a" / "up").symlink_to("..")
    (root / "val" / "b" / "self").symlink_to(".")
    assert check_dataset_layout(str(root)).classes == ["a", "b"]


def test_evaluation_only_needs_the_validation_split(tmp_path):
    root = _layout(tmp_path)
    os.rename(root / "train", root / "elsewhere")
    assert check_dataset_layout(str(root), need_train=False).classes == ["a", "b"]


# ---------------------------------------------------------------- mid-epoch resume order

@pytest.mark.parametrize("world, resumed_world", [(1, 1), (2, 2), (2, 3)])
def test_resumed_epoch_visits_each_remaining_sample_exactly_once(world, resumed_world):
    n, batch, steps_done = 101, 4, 5

    def indices(world_size, start):
        out = []
        for rank in range(world_size):
            sampler = ResumableSampler(n, num_replicas=world_size, rank=rank, seed=3)
            sampler.set_epoch(7, start=start)
            out.append(list(sampler))
        return out

    reference = ResumableSampler(n, seed=3)
    reference.set_epoch(7)
    order = list(reference)
    assert sorted(order) == list(range(n))
    before = [ranks[: steps_done * batch] for ranks in indices(world, 0)]
    consumed = steps_done * batch * world
    after = indices(resumed_world, consumed)
    seen = [i for ranks in before for i in ranks] + [i for ranks in after for i in ranks]
    assert sorted(set(seen)) == list(range(n))  # nothing left out
    assert len(seen) - n < resumed_world  # only the padding that evens out the last step repeats
    assert sorted(i for ranks in before for i in ranks) == sorted(order[:consumed])


def test_uninterrupted_order_is_that_of_distributed_sampler():
    from torch.utils.data import DistributedSampler
    for rank in range(3):
        ours = ResumableSampler(50, num_replicas=3, rank=rank, seed=5)
        theirs = DistributedSampler(range(50), num_replicas=3, rank=rank, seed=5)
        ours.set_epoch(4), theirs.set_epoch(4)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


# ---------------------------------------------------------------- preemption signals, RNG state

def test_sigterm_and_sigint_become_a_stop_request_until_the_context_ends():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as request:
        assert not stop_requested(request, CPU)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested(request, CPU) and request.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_second_ctrl_c_does_not_interrupt_a_recovery_write():
    with StopRequest() as request:
        os.kill(os.getpid(), signal.SIGINT)
        with request.shielded():  # RecoveryPoints writes inside this
            os.kill(os.getpid(), signal.SIGINT)
        assert request.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # outside a write it still stops at once
            os.kill(os.getpid(), signal.SIGINT)


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.tensor([index])


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers tell who sent a signal with sigwaitinfo")
def test_data_workers_leave_group_signals_to_the_main_process():
    from utils.data import StopSignalSafeLoader
    batches = iter(StopSignalSafeLoader(_Numbers(), batch_size=4, num_workers=2, persistent_workers=True))
    first = next(batches)
    workers = [w.pid for w in batches._workers]
    for name in ("TERM", "INT"):  # sent by another process, as a scheduler's killpg is
        subprocess.run(["kill", f"-{name}", *map(str, workers)], check=True)
    rest = list(batches)
    assert torch.cat([first, *rest]).flatten().tolist() == list(range(64))
    assert all(w.is_alive() for w in batches._workers)
    # The main process still ends its workers (DataLoader's shutdown sends SIGTERM to laggards).
    for worker in batches._workers:
        worker.terminate()
        worker.join(timeout=10)
    assert not any(w.is_alive() for w in batches._workers)


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    import random
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng": capture_rng_state(CPU)}, tmp_path / "state.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(tmp_path / "state.pth", weights_only=True)["rng"], CPU)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# ---------------------------------------------------------------- non-finite loss

def test_nonfinite_loss_without_scaler_stops_naming_the_step():
    guard = NonFiniteGuard(scaler_skips_steps=False)
    guard.update(torch.tensor(1.0), "epoch 0 step 1")
    guard.update(torch.tensor(float("nan")), "epoch 0 step 2")
    guard.update(torch.tensor(float("nan")), "epoch 0 step 3")
    with pytest.raises(NonFiniteLossError, match="not finite at epoch 0 step 2"):
        guard.check()


def test_nonfinite_loss_under_fp16_scaler_is_skipped_until_it_persists():
    guard = NonFiniteGuard(scaler_skips_steps=True, max_consecutive=3)
    for step, value in enumerate([1.0, float("inf"), float("nan"), 2.0, float("nan"), float("nan")]):
        guard.update(torch.tensor(value), f"step {step}")
    guard.check()
    assert guard.skipped_steps == 4 and guard.consecutive == 2
    guard.update(torch.tensor(float("nan")), "step 6")
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row \(since step 4, last at step 6\)"):
        guard.check()


# ---------------------------------------------------------------- output folder

def test_output_below_a_file_or_without_space_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputDirError, match="cannot write to output folder .*afile"):
        check_output_dir(tmp_path / "afile" / "run")
    with pytest.raises(OutputDirError, match="MiB free"):
        check_output_dir(tmp_path / "run", needed_bytes=2**60)
    assert check_output_dir(tmp_path / "run", needed_bytes=1).is_dir()
    assert list((tmp_path / "run").iterdir()) == []  # the probe file is gone


def without_root_privileges(command):
    """root ignores file permissions; drop that privilege for `command` (skip when impossible)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux setpriv: file permissions cannot be tested")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"] + command


@pytest.mark.slow
def test_read_only_output_folder_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code = ("import sys; from utils.checkpoint import check_output_dir; from utils.errors import OutputDirError\n"
            "try: check_output_dir(sys.argv[1])\n"
            "except OutputDirError as e: print(e); sys.exit(3)\n")
    result = subprocess.run(without_root_privileges([sys.executable, "-c", code, str(locked / "run")]), cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "cannot write to output folder" in result.stdout and "Permission denied" in result.stdout


def test_recovery_points_save_every_interval_and_on_stop():
    saved = []
    with StopRequest() as request:
        points = RecoveryPoints(request, saved.append, CPU, interval=3)
        assert [points(step) for step in (1, 2, 3, 4)] == [False] * 4
        os.kill(os.getpid(), signal.SIGTERM)
        assert points(5) is True and points.stopped_after == 5
    assert saved == [3, 5]


# ---------------------------------------------------------------- safe loading and export

class _RunsCode:
    """Unpickling this object runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_unpickling_runs_code_is_refused(tmp_path, capsys):
    from models.weights import UnsafeFileError, safe_load
    from tools.export_weights import main as export_main
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeFileError, match="could run arbitrary code"):
        safe_load(evil)
    out = tmp_path / "out.safetensors"
    assert export_main([str(evil), str(out)]) == 1
    assert "refusing to read" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_export_writes_plain_weights_that_load_into_the_model(tmp_path):
    import argparse
    import timm
    from safetensors.torch import load_file
    import models  # noqa: F401
    from tools.export_weights import export_weights
    model = timm.create_model("van_b0", num_classes=3)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint = {"arch": "van_b0", "epoch": 2, "args": argparse.Namespace(lr=0.1),
                  "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                  "state_dict_ema": ema, "optimizer": {"state": {}, "param_groups": []}}
    torch.save(checkpoint, tmp_path / "last.pth.tar")
    export_weights(str(tmp_path / "last.pth.tar"), str(tmp_path / "w.safetensors"))
    export_weights(str(tmp_path / "last.pth.tar"), str(tmp_path / "ema.safetensors"), ema=True)
    weights = load_file(tmp_path / "w.safetensors")
    fresh = timm.create_model("van_b0", num_classes=3)
    fresh.load_state_dict(weights)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(load_file(tmp_path / "ema.safetensors")["head.bias"], ema["head.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "last.pth.tar", "w.safetensors"]


# ---------------------------------------------------------------- the same faults in runs of main.py

FAST_RECIPE = ['--img-size', '32', '-b', '8', '--warmup-epochs', '0', '--cooldown-epochs', '0', '-j', '0',
               '--log-interval', '1', '--aa', 'none', '--reprob', '0']


def _main_args(data, output, experiment, *extra):
    return ['--data_path', str(data), '--output', str(output), '--experiment', experiment, *FAST_RECIPE, *extra]


def _run_main(args, env, timeout=300, **kwargs):
    return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_gives_the_weights_of_an_uninterrupted_run(shapes_dataset, tmp_path,
                                                                                  subprocess_env):
    # Mixup, CutMix, random crops, flips and drop path stay on: resuming must continue every random stream.
    common = ['--epochs', '2', '--max-steps-per-epoch', '4', '--drop-path', '0.1']
    full = _run_main(_main_args(shapes_dataset, tmp_path, 'full', *common), subprocess_env)
    assert full.returncode == 0, full.stderr

    command = [sys.executable, str(REPO / 'main.py'), *_main_args(shapes_dataset, tmp_path, 'cut', *common)]
    with Watched(command, deadline_s=300, cwd=REPO, env=subprocess_env) as process:
        process.read_until('Train: 0 [   2/')  # inside epoch 0, after its second step
        process.send_signal(signal.SIGTERM)
        status, output = process.finish(), process.output
    assert status == 128 + signal.SIGTERM, output
    assert 'stopped by SIGTERM in epoch 0' in output and '--resume auto' in output
    recovery = torch.load(tmp_path / 'cut' / 'recovery.pth.tar', weights_only=True)['recovery']
    assert recovery['epoch'] == 0 and 2 <= recovery['steps_done'] < 4  # mid-epoch, not at a boundary
    assert not (tmp_path / 'cut' / 'last.pth.tar').exists()

    resumed = _run_main(_main_args(shapes_dataset, tmp_path, 'cut', *common, '--resume', 'auto'), subprocess_env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing epoch 0 after {recovery['samples_seen']} samples" in resumed.stdout
    assert f"Train: 0 [   {recovery['steps_done'] + 1}/   4" in resumed.stdout  # no step repeated or skipped
    expected, got = _weights(tmp_path / 'full' / 'last.pth.tar'), _weights(tmp_path / 'cut' / 'last.pth.tar')
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not (tmp_path / 'cut' / 'recovery.pth.tar').exists()  # superseded by the epoch checkpoints


def _stop_group_at(command, marker, signum, env):
    """Run `command` in its own process group and signal the whole group (as a scheduler, torchrun or
    Ctrl-C does) once a line starting with `marker` appears; returns (exit status, output)."""
    with Watched(command, deadline_s=300, cwd=REPO, env=env) as process:
        process.read_until(marker)
        process.signal_group(signum)
        return process.finish(), process.output


@pytest.mark.slow
def test_group_signals_with_data_workers_save_and_resume_exactly(shapes_dataset, tmp_path, subprocess_env):
    common = ['--epochs', '2', '--max-steps-per-epoch', '4', '--drop-path', '0.1']
    full = _run_main(_main_args(shapes_dataset, tmp_path, 'full', *common), subprocess_env)  # -j 0
    assert full.returncode == 0, full.stderr
    main = [sys.executable, str(REPO / 'main.py')]

    # SIGTERM to the group with 2 persistent workers in epoch 0, SIGINT with 1 worker in epoch 1.
    status, output = _stop_group_at(main + _main_args(shapes_dataset, tmp_path, 'cut', *common, '-j', '2'),
                                    'Train: 0 [   2/', signal.SIGTERM, subprocess_env)
    assert status == 128 + signal.SIGTERM and 'stopped by SIGTERM in epoch 0' in output, output
    resume = _main_args(shapes_dataset, tmp_path, 'cut', *common, '--resume', 'auto', '-j', '1')
    status, output = _stop_group_at(main + resume, 'Train: 1 [   2/', signal.SIGINT, subprocess_env)
    assert status == 128 + signal.SIGINT and 'stopped by SIGINT in epoch 1' in output, output
    assert 'Traceback' not in output and 'killed by signal' not in output
    resumed = _run_main(resume, subprocess_env)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = _weights(tmp_path / 'full' / 'last.pth.tar'), _weights(tmp_path / 'cut' / 'last.pth.tar')
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_sigkill_while_saving_leaves_only_complete_checkpoints_and_resume_finishes(shapes_dataset, tmp_path,
                                                                                    subprocess_env):
    from utils.checkpoint import find_resume_checkpoint, read_training_checkpoint
    run_dir = tmp_path / 'run'
    args = _main_args(shapes_dataset, tmp_path, 'run', '--epochs', '2', '--max-steps-per-epoch', '3',
                      '--mixup', '0', '--cutmix', '0', '--recovery-interval', '1')  # a checkpoint every step
    process = subprocess.Popen([sys.executable, str(REPO / 'main.py'), *args], cwd=REPO, env=subprocess_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = []
    try:
        while process.poll() is None and not partial:
            # once one checkpoint is complete, wait for the next write to begin
            if run_dir.exists() and list(run_dir.glob('*.pth.tar')):
                partial = list(run_dir.glob('*.tmp*'))
        process.send_signal(signal.SIGKILL)  # in the middle of writing a checkpoint
    finally:
        process.wait(timeout=60)
    assert partial, 'the run ended before it wrote a checkpoint'
    for path in run_dir.glob('*.pth.tar'):
        read_training_checkpoint(str(path))  # every file under a final name is complete
    found = find_resume_checkpoint(str(run_dir))
    assert found is not None, 'killed before the first checkpoint was complete'

    resumed = _run_main(args[:-2] + ['--resume', 'auto'], subprocess_env)
    assert resumed.returncode == 0, resumed.stderr
    assert f'resumed from {found[0]}' in resumed.stdout and '*** Best metric' in resumed.stdout
    assert list(run_dir.glob('*.tmp*')) == []  # what the killed write left is cleaned up
    assert read_training_checkpoint(str(run_dir / 'last.pth.tar'))['epoch'] == 1


def test_nan_loss_stops_the_epoch_naming_the_step(caplog):
    import logging
    from utils.amp import create_precision
    from utils.device import DistEnv
    from utils.engine import NonFiniteGuard, TrainSettings, TrainingParts, train_one_epoch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, precision = create_precision(model, optimizer, CPU, enabled=False)
    calls = []

    def nan_at_step_3(output, target):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss * float('nan') if len(calls) == 3 else loss

    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 2, 2), torch.randint(0, 3, (24,)))
    loader = DataLoader(data, batch_size=4)
    with pytest.raises(NonFiniteLossError, match='not finite at epoch 0 step 3'):
        train_one_epoch(TrainingParts(model, loader, nan_at_step_3, optimizer, precision), TrainSettings(log_interval=5),
                        0, DistEnv(CPU), logging.getLogger('test'),
                        nonfinite_guard=NonFiniteGuard(scaler_skips_steps=False))


@pytest.mark.slow
def test_diverging_run_stops_with_a_message_and_keeps_the_last_good_checkpoint(shapes_dataset, tmp_path,
                                                                               subprocess_env):
    args = _main_args(shapes_dataset, tmp_path, 'run', '--max-steps-per-epoch', '2', '--mixup', '0', '--cutmix', '0')
    first = _run_main(args + ['--epochs', '1'], subprocess_env)
    assert first.returncode == 0, first.stderr
    good = _weights(tmp_path / 'run' / 'last.pth.tar')
    # An absurd learning rate makes the weights, then the loss, overflow within a few steps.
    diverged = _run_main(args + ['--epochs', '3', '--resume', 'auto', '--lr', '1e30', '--recovery-interval', '1'],
                         subprocess_env)
    assert diverged.returncode == 2, diverged.stderr
    assert re.search(r'error: loss is not finite at epoch 1 step \d', diverged.stderr)
    assert 'Traceback' not in diverged.stderr
    kept = _weights(tmp_path / 'run' / 'last.pth.tar')
    assert all(torch.equal(good[k], kept[k]) for k in good)
    recovery = tmp_path / 'run' / 'recovery.pth.tar'
    assert not recovery.exists() or all(torch.isfinite(v).all() for v in _weights(recovery).values()
                                        if v.is_floating_point())


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_when_one_of_two_processes_dies_the_other_exits_with_a_message(shapes_dataset, tmp_path, subprocess_env):
    import time
    port = _free_port()
    args = _main_args(shapes_dataset, tmp_path, 'run', '--epochs', '50', '--mixup', '0', '--cutmix', '0',
                      '--dist-timeout', '30')
    survivor, victim = (Watched([sys.executable, str(REPO / 'main.py'), *args], deadline_s=300, cwd=REPO,
                                env=dict(subprocess_env, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                                         RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2'))
                        for rank in range(2))
    with survivor, victim:
        survivor.read_until('Train: 0 [   1/')  # both processes are training
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        status, output = survivor.finish(), survivor.output
        waited = time.monotonic() - killed_at
    assert status == 1, output
    assert 'lost contact with the others' in output and '--resume auto' in output
    assert waited < 60  # bounded by --dist-timeout, not a hang
    assert 'Traceback' not in output


_HANGING_LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)
print('worker', worker.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not Path('/proc/self/task').exists(), reason='finds the processes below a child through /proc')
def test_a_hanging_child_fails_its_test_in_time_and_leaves_no_process_behind():
    # What the torchrun tests rely on: a launcher whose worker hangs (in a session of its own, as torchrun's
    # are) fails the test at the deadline, naming what was awaited, and neither process survives.
    with Watched([sys.executable, '-c', _HANGING_LAUNCHER], deadline_s=3) as launcher:
        worker = int(launcher.read_until('worker ').split()[1])
        with pytest.raises(AssertionError, match=r"(?s)A line starting with 'Train: ' did not come within 3 s.*"
                                                 r"it hangs, so it and every process below it were killed.*worker "):
            launcher.read_until('Train: ')
    assert launcher.process.returncode == -signal.SIGKILL
    assert has_exited(worker)


def _worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process that has RANK=rank."""
    children = Path(f'/proc/{launcher_pid}/task/{launcher_pid}/children').read_text().split()
    for pid in map(int, children):
        environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        if f'RANK={rank}'.encode() in environ:
            return pid
    raise AssertionError(f'torchrun {launcher_pid} has no worker of rank {rank} among {children}')


@pytest.mark.slow
@pytest.mark.skipif(not Path('/proc/self/task').exists(), reason='finds torchrun\'s workers through /proc (Linux)')
def test_torchrun_restart_after_a_killed_worker_resumes_from_the_last_recovery_point(shapes_dataset, tmp_path,
                                                                                    subprocess_env):
    from utils.checkpoint import read_training_checkpoint
    # 48 images, 2 processes of batch 4: 6 steps in the epoch, a recovery checkpoint every 2.
    args = _main_args(shapes_dataset, tmp_path, 'run', '--epochs', '1', '-b', '4', '--mixup', '0', '--cutmix', '0',
                      '--device', 'cpu', '--recovery-interval', '2', '--resume', 'auto', '--dist-timeout', '30')
    env = dict(subprocess_env)
    env.pop('TORCH_DISABLE_SHARE_RDZV_TCP_STORE', None)  # torchrun's default: one store for every attempt
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                '--max-restarts', '1', str(REPO / 'main.py'), *args]
    with Watched(torchrun, deadline_s=300, cwd=REPO, env=env) as launcher:
        launcher.read_until('recovery checkpoint: epoch 0 step 2 ')
        os.kill(_worker_with_rank(launcher.pid, 1), signal.SIGKILL)  # 4 steps before the epoch ends
        status, output = launcher.finish(), launcher.output
    assert status == 0, output
    first, restarted = output.split('device cpu, world size 2', 2)[1:]  # rank 0's first line of each attempt
    saved = re.findall(r'recovery checkpoint: epoch 0 step (\d+) ', first)
    assert saved and int(saved[-1]) < 6, first  # killed mid-epoch, after a recovery point
    last_point = int(saved[-1])
    run_dir = tmp_path / 'run'
    assert f'resumed from {run_dir / "recovery.pth.tar"}' in restarted
    assert f'(step {last_point})' in restarted  # only the steps after the last recovery point are lost
    assert f'Train: 0 [   {last_point + 1}/   6' in restarted  # and none is repeated
    assert '*** Best metric' in restarted
    assert read_training_checkpoint(str(run_dir / 'last.pth.tar'))['epoch'] == 0
    assert not (run_dir / 'recovery.pth.tar').exists()


@pytest.mark.slow
def test_torchrun_stopped_by_a_group_signal_saves_and_says_so_in_one_line(shapes_dataset, tmp_path, subprocess_env):
    from utils.checkpoint import read_training_checkpoint
    args = _main_args(shapes_dataset, tmp_path, 'run', '--epochs', '2', '-b', '4', '--max-steps-per-epoch', '2',
                      '--mixup', '0', '--cutmix', '0', '--device', 'cpu', '-j', '1', '--dist-timeout', '60')
    torchrun = [sys.executable, str(REPO / 'tools' / 'torchrun.py'), '--standalone', '--nproc_per_node', '2',
                str(REPO / 'main.py')]
    status, output = _stop_group_at(torchrun + args, 'Train: 0 [   1/', signal.SIGTERM, subprocess_env)
    assert status == 128 + signal.SIGTERM, output
    assert 'stopped by SIGTERM after epoch 0' in output and 'torchrun: stopped by SIGTERM' in output
    assert 'Traceback' not in output and 'killed by signal' not in output
    assert read_training_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))['epoch'] == 0
    resumed = run_watched(torchrun + args + ['--resume', 'auto'], deadline_s=300, cwd=REPO, env=subprocess_env)
    assert resumed.returncode == 0 and 'resumed from' in resumed.stdout, resumed.stdout + resumed.stderr
    assert read_training_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))['epoch'] == 1


@pytest.mark.slow
def test_torchrun_for_the_launch_scripts_passes_a_user_error_on_without_a_traceback(tmp_path, subprocess_env):
    command = [sys.executable, str(REPO / 'tools' / 'torchrun.py'), '--standalone', '--nproc_per_node', '2',
               str(REPO / 'main.py'), '--data_path', str(tmp_path / 'nowhere'), '--device', 'cpu']
    result = run_watched(command, deadline_s=300, cwd=REPO, env=subprocess_env)
    assert result.returncode == 2, result.stderr
    assert 'does not exist' in result.stderr and 'main.py FAILED' in result.stderr
    assert 'Traceback' not in result.stderr


def _copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.slow
def test_run_with_bad_images_skips_reports_and_counts_them(shapes_dataset, tmp_path, subprocess_env):
    data = _copy_dataset(shapes_dataset, tmp_path / 'data')
    train_bad = _write_bad_images(data / 'train' / 'circle_red')
    _write_usable_images(data / 'train' / 'square_green')  # odd modes are used, not skipped
    (data / 'val' / 'cross_yellow' / 'broken.jpg').write_bytes(_jpeg_bytes()[:300])
    (data / 'val' / 'cross_yellow' / 'empty.png').write_bytes(b'')
    result = _run_main(_main_args(data, tmp_path, 'run', '--epochs', '1', '--mixup', '0', '--cutmix', '0',
                                  '-j', '2'), subprocess_env)
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    for name in train_bad:
        assert log.count(f"Skipped unreadable image {data / 'train' / 'circle_red' / name}") == 1
    assert f'Epoch 0 skipped {len(train_bad)} unreadable training images' in log
    assert '(images 19) skipped 2' in log  # every readable validation image counted once, the bad ones not

    strict = _run_main(_main_args(data, tmp_path, 'strict', '--epochs', '1', '--strict-data'), subprocess_env)
    assert strict.returncode != 0 and '--strict-data' in strict.stderr
    assert re.search(r'(train/circle_red|val/cross_yellow)/\S+: ', strict.stderr)


@pytest.mark.slow
def test_a_run_into_a_broken_stretch_of_data_stops_with_one_message(shapes_dataset, tmp_path, subprocess_env):
    data = _copy_dataset(shapes_dataset, tmp_path / 'data')
    for i in range(100):  # after the class's readable images: more than 50 unreadable ones in a row
        (data / 'train' / 'circle_red' / f'zz{i:03d}.png').write_bytes(b'')
    result = _run_main(_main_args(data, tmp_path, 'run', '--epochs', '1', '-j', '1'), subprocess_env)
    assert result.returncode == 2, result.stderr
    assert re.search(r'error: \S+train: 50 unreadable images in a row \(first: \S+circle_red/zz\d+\.png: empty file',
                     result.stderr)
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('fault, message', [
    ('missing', 'does not exist'),
    ('no_val', 'no val/ folder'),
    ('empty_class', 'hold no images: cross_yellow'),
    ('different_classes', r'only in train/: cross_yellow; only in val/: zebra'),
    ('files_in_train', 'holds files directly'),
    ('class_linked_to_itself', r'cannot open \S+train/cross_yellow: Too many levels of symbolic links'),
    ('unreadable_val', r'no image in \S+val can be read: all 2 image files fail \(first: \S+circle_red/000.png: '),
])
def test_bad_layout_stops_main_before_the_model_is_built(make_dataset, tmp_path, capsys, monkeypatch, fault,
                                                         message):
    import main
    root = make_dataset(counts={'train': {'circle_red': 2, 'cross_yellow': 2}, 'val': {'circle_red': 1,
                                                                                     'cross_yellow': 1}})
    if fault == 'missing':
        root = tmp_path / 'nowhere'
    elif fault == 'no_val':
        shutil.rmtree(root / 'val')
    elif fault == 'empty_class':
        for image in (root / 'train' / 'cross_yellow').iterdir():
            image.unlink()
    elif fault == 'different_classes':
        os.rename(root / 'val' / 'cross_yellow', root / 'val' / 'zebra')
    elif fault == 'files_in_train':
        Image.new('RGB', (8, 8)).save(root / 'train' / 'stray.png')
    elif fault == 'class_linked_to_itself':
        shutil.rmtree(root / 'train' / 'cross_yellow')
        (root / 'train' / 'cross_yellow').symlink_to('cross_yellow')
    elif fault == 'unreadable_val':  # found now, not after a whole unsaved training epoch
        for image in (root / 'val').glob('*/*.png'):
            image.write_bytes(image.read_bytes()[:40])

    def fail(*args, **kwargs):
        raise AssertionError('the model was built before the dataset was checked')
    monkeypatch.setattr(main, 'create_model', fail)
    status = main.main(_main_args(root, tmp_path / 'out', 'run', '--epochs', '1'))
    error = capsys.readouterr().err
    assert status == 2 and re.search(message, error) and 'Traceback' not in error, error
    assert not (tmp_path / 'out' / 'run').exists()  # no empty run dir left behind


def test_main_refuses_checkpoints_and_weights_whose_unpickling_runs_code(shapes_dataset, tmp_path, capsys):
    import main
    marker = tmp_path / 'code-ran'
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'epoch': 0, 'state_dict': {}, 'optimizer': {}, 'payload': _RunsCode(marker)}, evil)
    for flag in ('--resume', '--pretrained'):
        status = main.main(_main_args(shapes_dataset, tmp_path / 'out', flag.strip('-'), '--epochs', '1', flag,
                                      str(evil)))
        error = capsys.readouterr().err
        assert status == 2 and 'arbitrary code' in error and str(evil) in error, (flag, error)
    assert not marker.exists()


@pytest.mark.slow
def test_unwritable_output_folder_is_reported_at_start(shapes_dataset, tmp_path, subprocess_env):
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o555)
    command = [sys.executable, str(REPO / 'main.py'), *_main_args(shapes_dataset, locked, 'run', '--epochs', '1')]
    result = subprocess.run(without_root_privileges(command), cwd=REPO, env=subprocess_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f'cannot write to output folder {locked / "run"}: Permission denied' in result.stderr
    assert 'Traceback' not in result.stderr and 'Train:' not in result.stdout


@pytest.mark.slow
def test_full_disk_while_saving_is_reported_without_partial_files(shapes_dataset, tmp_path, subprocess_env):
    import resource

    def small_disk():
        # Writing past 4 MiB fails as on a full disk (EFBIG instead of ENOSPC; SIGXFSZ would kill instead).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    result = _run_main(_main_args(shapes_dataset, tmp_path, 'run', '--epochs', '1', '--max-steps-per-epoch', '1',
                                  '--mixup', '0', '--cutmix', '0'), subprocess_env, preexec_fn=small_disk)
    assert result.returncode == 2, result.stderr
    assert "cannot write checkpoint" in result.stderr and 'File too large' in result.stderr
    assert 'Traceback' not in result.stderr
    assert sorted(p.name for p in (tmp_path / 'run').iterdir() if 'pth' in p.name) == []


# ---------------------------------------------------------------- one run per run dir

_HOLD_LOCK = ("import sys, time\n"
              "from utils.checkpoint import RunDirLock\n"
              "lock = RunDirLock(sys.argv[1]).acquire()\n"
              "print('locked', flush=True)\n"
              "time.sleep(120)\n")


def test_run_dir_lock_names_its_holder_and_is_taken_over_when_the_holder_dies(tmp_path):
    import socket
    from utils.errors import RunDirBusyError
    from utils.checkpoint import RunDirLock
    with Watched([sys.executable, '-c', _HOLD_LOCK, tmp_path], deadline_s=60, cwd=REPO) as holder:
        holder.read_until('locked')
        with pytest.raises(RunDirBusyError) as busy:
            RunDirLock(tmp_path).acquire()
        assert f'pid {holder.pid} on host {socket.gethostname()}' in str(busy.value)
        assert 'started ' in str(busy.value) and '--experiment' in str(busy.value)
    # leaving the block killed the holder: no chance to release, the kernel drops the lock, the file still names it
    with RunDirLock(tmp_path) as lock:
        assert f'pid {holder.pid} on host' in lock.describe_takeover() and 'is gone' in lock.describe_takeover()
    with RunDirLock(tmp_path) as lock:  # released normally: nothing to report
        assert lock.describe_takeover() is None


@pytest.mark.slow
def test_a_second_run_in_the_same_run_dir_stops_and_leaves_the_first_alone(shapes_dataset, tmp_path,
                                                                           subprocess_env, capsys):
    import main
    args = _main_args(shapes_dataset, tmp_path, 'shared', '--mixup', '0', '--cutmix', '0')
    first = Watched([sys.executable, str(REPO / 'main.py'), *args, '--epochs', '50'], deadline_s=300, cwd=REPO,
                    env=subprocess_env)
    with first:
        first.read_until('Train: 0 [   1/')
        in_flight = tmp_path / 'shared' / f'last.pth.tar.tmp{first.pid}'  # as if the first run were saving
        in_flight.write_bytes(b'half written')
        for resume in ([], ['--resume', 'auto']):
            status = main.main([*args, '--epochs', '1', '--max-steps-per-epoch', '1', *resume])
            error = capsys.readouterr().err
            assert status == 2, error
            assert f'is in use by another run (pid {first.pid} on host' in error
            assert in_flight.exists()  # the first run's file is not touched
        assert first.process.poll() is None
        first.send_signal(signal.SIGTERM)
        first.finish()
    assert 'Traceback' not in first.output


@pytest.mark.slow
@pytest.mark.skipif(bool(compat.cpu_float16_reason()), reason=compat.cpu_float16_reason())
def test_float16_run_whose_statistics_overflow_saves_nothing_non_finite(shapes_dataset, tmp_path, subprocess_env):
    # An absurd learning rate under the float16 scaler: the scaler skips the overflowing steps, but their
    # forward passes turn the BatchNorm statistics into NaN while the loss guard still waits.
    args = _main_args(shapes_dataset, tmp_path, 'fp16', '--epochs', '1', '--max-steps-per-epoch', '3', '--mixup', '0',
                      '--cutmix', '0', '--amp', '--amp-dtype', 'float16', '--lr', '1e30')
    result = _run_main(args, subprocess_env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr
    assert re.search(r'error: the model state after epoch 0 holds NaN or inf in \d+ tensors \(model: \d+ tensors '
                     r'\(\S+running_', result.stderr)
    assert 'still updated the BatchNorm statistics' in result.stderr
    assert re.search(r'not saving the state after epoch 0: \d+ tensors hold NaN or inf', result.stdout)
    assert not list((tmp_path / 'fp16').glob('*.pth.tar*'))


def test_run_dir_on_a_file_system_without_locks_runs_unprotected_and_says_so(tmp_path, monkeypatch):
    import errno
    import utils.checkpoint
    from utils.checkpoint import RunDirLock

    def no_locks(*args):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(utils.checkpoint.fcntl, 'lockf', no_locks)
    with RunDirLock(tmp_path) as lock:
        assert 'cannot lock the run dir' in lock.describe_takeover() and 'No locks available' in lock.describe_takeover()

"""tools/make_demo_data.py: the offline digits ImageFolder the launch scripts fall back to."""
import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_demo_data.py"


_spec = importlib.util.spec_from_file_location("make_demo_data", TOOL)
make_demo_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_demo_data)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def make(out, *extra):
    """Runs the tool's command line in-process (scikit-learn is imported once for all tests)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = make_demo_data.main(["--out", str(out), "--size", "16", *extra])
        except SystemExit as exit_:
            # argparse and the tool's own checks end with SystemExit(message or code)
            code = exit_.code if isinstance(exit_.code, int) else 1
            if isinstance(exit_.code, str):
                stderr.write(exit_.code)
    return Result(code, stdout.getvalue(), stderr.getvalue())


def pngs(root, split):
    return sorted((root / split).glob("*/*.png"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "digits"
    result = make(out)
    assert result.returncode == 0, result.stderr
    return out


def test_all_digits_split_stratified_into_imagefolder(demo):
    train, val = pngs(demo, "train"), pngs(demo, "val")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert sorted(p.name for p in (demo / "train").iterdir()) == [str(d) for d in range(10)]
    # Stratified: every class keeps its 80/20 share (class sizes are 174..183).
    for digit in range(10):
        n_train = len(list((demo / "train" / str(digit)).glob("*.png")))
        n_val = len(list((demo / "val" / str(digit)).glob("*.png")))
        assert abs(n_val / (n_train + n_val) - 0.2) < 0.01
    # No image is in both splits (file names are the dataset indices).
    assert not {p.name for p in train} & {p.name for p in val}


def test_images_are_rgb_upscaled_digits_with_the_right_label(demo):
    from sklearn.datasets import load_digits
    digits = load_digits()
    image_path = pngs(demo, "val")[0]
    image = Image.open(image_path)
    assert image.mode == "RGB" and image.size == (16, 16)
    index = int(image_path.stem)
    assert digits.target[index] == int(image_path.parent.name)
    # Downscaled back to 8x8 the picture still matches its source digit far better than another one.
    small = Image.open(image_path).convert("L").resize((8, 8), Image.Resampling.BOX)
    pixels = [v / 255 * 16 for v in small.getdata()]
    own = sum(abs(a - b) for a, b in zip(pixels, digits.images[index].ravel()))
    other = next(i for i in range(len(digits.target)) if digits.target[i] != digits.target[index])
    foreign = sum(abs(a - b) for a, b in zip(pixels, digits.images[other].ravel()))
    assert own < foreign / 2


def test_second_run_keeps_the_complete_copy(demo):
    first = pngs(demo, "train")[0]
    mtime = first.stat().st_mtime_ns
    result = make(demo)
    assert result.returncode == 0 and "already complete" in result.stdout
    assert first.stat().st_mtime_ns == mtime


def test_incomplete_copy_is_rebuilt(tmp_path):
    out = tmp_path / "digits"
    assert make(out).returncode == 0
    pngs(out, "val")[5].unlink()
    result = make(out)
    assert result.returncode == 0 and "written" in result.stdout
    assert len(pngs(out, "val")) == 360
    # Another image size is another dataset: rebuilt, not taken as complete.
    result = make(out, "--size", "12")
    assert "written" in result.stdout and Image.open(pngs(out, "train")[0]).size == (12, 12)


def test_refuses_to_delete_files_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = make(tmp_path)
    assert result.returncode != 0 and "notes.txt" in result.stderr and "--out" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["--val-fraction", "1.5"], "--val-fraction 1.5 must lie strictly between 0 and 1"),
    (["--val-fraction", "0.001"], "cannot split"),
])
def test_bad_options_give_one_clear_message(tmp_path, args, message):
    result = make(tmp_path / "d", *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr

"""The environment check (tools/ensure_env.py) and the two quick-start scripts (test/demo.sh,
test/unit_tests.sh) that use it.

The scripts run in a temporary copy of the repo with stand-in interpreters: each fake environment is
a bash script whose "installed packages" are the *.dist-info folders of its own site folder. The
environment check runs for real under it (the real Python with -S, so only that site is seen);
`-m venv` creates another fake environment, `-m pip install` copies the packages of a fake index into
the site (or prints a prepared pip failure), and main.py / pytest are stood in for as in
test_launch_scripts.py. Every call is recorded in calls.txt as "<environment> <arguments>".
"""
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import packaging
import pytest

from utils.reporting import RunResults

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ensure_env", REPO / "tools" / "ensure_env.py")
ensure_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ensure_env)

SCRIPTS = ["demo.sh", "unit_tests.sh", "env_python.sh", "common.sh", "env_npu.sh", "train_full_1p.sh"]
REQUIREMENTS = "torch>=2.4,<=2.14.1\n# a comment\ntimm>=1.0.9,<1.1\nPyYAML>=6.0\n"
DEV_REQUIREMENTS = "pytest>=7.4\n"
INDEX = {"torch": "2.14.1+cu128", "timm": "1.0.31", "PyYAML": "6.0.4", "pytest": "9.2.0"}
TRAIN_LOG = """\
Train: 0 [  44/  45 (100%)]  Loss: 1.5432 (1.7000)  Time: 0.490s,  65.30/s  LR: 5.000e-04  Data: 0.010 (0.011)
Epoch 0 FPS:64.00
* Acc@1 97.222 Acc@5 100.000 Loss 0.150 (images 360)
*** Best metric: 97.222 (epoch 0)
"""
PIP_NOT_FOUND = """\
Looking in links: wheels
Collecting torch<=2.14.1,>=2.4 (from -r requirements.txt (line 1))
ERROR: Could not find a version that satisfies the requirement torch<=2.14.1,>=2.4 (from versions: none)
ERROR: No matching distribution found for torch<=2.14.1,>=2.4
"""

FAKE_PYTHON = r"""#!/bin/bash
# Stand-in interpreter: its packages are the *.dist-info folders in $site (see fake.cfg beside it).
here=$(cd "$(dirname "$0")" && pwd)
source "$here/fake.cfg"
echo "$name $*" >> "$FAKE_DIR/calls.txt"
case "$1 ${2:-}" in
    *ensure_env.py*) PYTHONPATH="$site:$FAKE_DIR/lib" exec "$REAL_PYTHON" -S "$@" ;;
    "-c "*) exec "$REAL_PYTHON" "$@" ;;
    "-m venv")
        mkdir -p "$3/bin" "$3/site" && touch "$3/pyvenv.cfg" && cp "$0" "$3/bin/python"
        printf 'name=venv\nsite=%q\n' "$3/site" > "$3/bin/fake.cfg"
        exit 0 ;;
    "-m pip")
        [[ -f $FAKE_DIR/pip_output ]] && { cat "$FAKE_DIR/pip_output"; exit 1; }
        cp -r "$FAKE_DIR/index/." "$site/" && echo "Successfully installed (stand-in)"
        exit 0 ;;
    "-m pytest") shift 2; echo "pytest in $PWD: $*"; exit "${FAKE_PYTEST_RC:-0}" ;;
    "-m utils.launcher" | "-m utils.modelzoo") PYTHONPATH=$REAL_REPO exec "$REAL_PYTHON" "$@" ;;
    "tools/make_demo_data.py "*) exit 0 ;;
    "main.py "*)
        while (( $# )); do
            case $1 in --output) output=$2 ;; --experiment) experiment=$2 ;; --results) results=$2 ;; esac
            shift
        done
        mkdir -p "$output/$experiment" && touch "$output/$experiment/curves.png"
        cat "$FAKE_DIR/log.txt"
        cp "$FAKE_DIR/results.json" "$results"
        exit 0 ;;
esac
echo "stand-in python: unexpected call: $*" >&2
exit 99
"""


def write_dist_info(site, name, version):
    info = Path(site) / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def make_fake_env(folder, name, packages=()):
    """A stand-in interpreter at folder/python with `packages` ({name: version}) installed."""
    folder.mkdir(parents=True, exist_ok=True)
    python = folder / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    site = folder / "site"
    site.mkdir(exist_ok=True)
    (folder / "fake.cfg").write_text(f"name={name}\nsite={site}\n")
    for package, version in dict(packages).items():
        write_dist_info(site, package, version)
    return python


class Sandbox:
    """A repo copy, the fake system Python (python3.11, python3, python on PATH) and the fake index."""

    def __init__(self, tmp_path):
        self.repo = tmp_path / "repo"
        (self.repo / "test").mkdir(parents=True)
        (self.repo / "tools").mkdir()
        for name in SCRIPTS:
            shutil.copy(REPO / "test" / name, self.repo / "test" / name)
        shutil.copy(REPO / "tools" / "ensure_env.py", self.repo / "tools" / "ensure_env.py")
        (self.repo / "requirements.txt").write_text(REQUIREMENTS)
        (self.repo / "requirements-dev.txt").write_text(DEV_REQUIREMENTS)
        self.fake = tmp_path / "fake"
        # `packaging` importable under -S without counting as installed (no dist-info in lib/).
        shutil.copytree(Path(packaging.__file__).parent, self.fake / "lib" / "packaging")
        for package, version in INDEX.items():
            write_dist_info(self.fake / "index", package, version)
        (self.fake / "log.txt").write_text(TRAIN_LOG)
        results = RunResults(str(self.fake / "results.json"), "train", "van_b0", 1, 32)  # what that log says
        results.add_losses([1.5432])
        results.add_epoch(dict(epoch=0, train_loss=1.7, lr=5e-4, eval_loss=0.15, eval_top1=97.222, eval_top5=100.0,
                               fps=64.0), (97.222, 0))
        results.finish()
        self.bin = tmp_path / "bin"
        system = make_fake_env(self.bin, "system")
        for alias in ("python3", "python3.11"):
            os.symlink(system, self.bin / alias)
        self.system_site = self.bin / "site"
        self.venv = self.repo / ".venv"

    def run(self, script, *args, cwd=None, **env_extra):
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHON", "VIRTUAL_ENV", "VAN_VENV", "PYTHONPATH", "PYTHONHOME", "ASCEND_DEVICE_ID",
                            "CUDA_VISIBLE_DEVICES")}
        env.update(PATH=f"{self.bin}:/usr/bin:/bin", FAKE_DIR=str(self.fake), REAL_PYTHON=sys.executable, REAL_REPO=str(REPO),
                   **env_extra)
        script_path = self.repo / "test" / script
        return subprocess.run(["bash", str(script_path), *args], cwd=cwd or self.repo, env=env,
                              capture_output=True, text=True, timeout=120)

    def calls(self):
        path = self.fake / "calls.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        path.unlink(missing_ok=True)
        # The environment checks and version probes are the mechanism, not the behaviour under test.
        return [line for line in lines if "ensure_env.py" not in line and " -c " not in line]


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def satisfied(box):
    """The fake system Python gets everything in the fake index."""
    shutil.copytree(box.fake / "index", box.system_site, dirs_exist_ok=True)


# --- the check -------------------------------------------------------------------------------------

def lines_of(text):
    return [("requirements.txt:%d" % n, line) for n, line in enumerate(text.splitlines(), 1)]


def test_met_requirements_have_no_problems_whatever_the_name_spelling_and_local_label():
    installed = {"torch": "2.14.1+cu128", "timm": "1.0.31", "pyyaml": "6.0.4"}
    assert ensure_env.unmet_requirements(lines_of(REQUIREMENTS.replace("# a comment\n", "")), installed) == []


def test_missing_and_wrong_versions_are_named_with_their_line():
    installed = {"torch": "2.15.0", "pyyaml": "5.4"}
    problems = ensure_env.unmet_requirements(lines_of("torch>=2.4,<=2.14.1\ntimm>=1.0.9,<1.1\nPyYAML>=6.0"),
                                             installed)
    assert problems == ["torch 2.15.0 installed, requirements.txt:1 needs <=2.14.1,>=2.4",
                        "timm not installed (requirements.txt:2 needs <1.1,>=1.0.9)",
                        "PyYAML 5.4 installed, requirements.txt:3 needs >=6.0"]


@pytest.mark.parametrize("line, version, met", [
    ("pillow>=9.0,<13", "13.0.0", False),
    ("pillow>=9.0,<13", "12.3.0", True),
    ("pillow>=9.0,<13", "13.0.0rc1", False),   # <13 excludes 13's own pre-releases
    ("torch>=2.4", "2.5.0rc1", True),          # an installed pre-release counts where it fits, as in pip check
    ("timm>=1.0.9,<1.1", "1.0.10", True),      # numeric, not string, comparison
    ("numpy>=1.23", "1.9.0", False),
    ("scikit_learn>=1.2", "1.9.1", True),      # distribution names are normalized (PEP 503)
])
def test_version_rules_are_pips(line, version, met):
    name = line.split(">")[0].split("<")[0]
    installed = {ensure_env.normalize_name(name): version}
    assert (ensure_env.unmet_requirements([("r:1", line)], installed) == []) == met


def test_markers_of_this_interpreter_decide_whether_a_line_applies():
    lines = [("r:1", 'oldpkg>=1 ; python_version < "3.0"'), ("r:2", 'newpkg>=1 ; python_version >= "3.0"')]
    assert ensure_env.unmet_requirements(lines, {}) == ["newpkg not installed (r:2 needs >=1)"]


def test_requirement_files_follow_includes_and_skip_comments_and_index_options(tmp_path):
    (tmp_path / "base.txt").write_text("torch>=2.4  # inline comment\n\n--find-links wheels/\n")
    (tmp_path / "dev.txt").write_text("-r base.txt\npytest>=7.4\n")
    lines, files = ensure_env.read_requirement_lines(tmp_path / "dev.txt")
    assert lines == [("base.txt:1", "torch>=2.4"), ("dev.txt:2", "pytest>=7.4")]
    assert files == [tmp_path / "dev.txt", tmp_path / "base.txt"]
    (tmp_path / "odd.txt").write_text("-e .\n")
    with pytest.raises(ValueError, match="odd.txt:1: cannot check the pip option line '-e .'"):
        ensure_env.read_requirement_lines(tmp_path / "odd.txt")


def test_the_repository_requirement_files_are_readable_and_met_here():
    report = ensure_env.check_this_interpreter([REPO / "requirements.txt", REPO / "requirements-dev.txt"])
    assert report["unmet"] == []


def test_hash_changes_with_the_file_and_with_what_it_includes(tmp_path):
    (tmp_path / "base.txt").write_text("torch>=2.4\n")
    (tmp_path / "dev.txt").write_text("-r base.txt\n")
    before = ensure_env.requirement_hashes([tmp_path / "dev.txt"])
    (tmp_path / "base.txt").write_text("torch>=2.5\n")
    assert ensure_env.requirement_hashes([tmp_path / "dev.txt"]) != before


def test_pythons_below_the_minimum_are_refused():
    major, minor = ensure_env.MIN_PYTHON
    assert ensure_env.python_problem((major, minor, 0)) is None
    assert f"Python {major}.{minor - 1}.18 is older than {major}.{minor}" in \
        ensure_env.python_problem((major, minor - 1, 18))


def fake_which(tmp_path, names):
    for name in names:
        (tmp_path / name).write_text("")
        (tmp_path / name).chmod(0o755)
    return {"PATH": str(tmp_path)}


def test_new_venv_prefers_the_tested_python_and_skips_old_ones(tmp_path):
    environ = fake_which(tmp_path, ["python3.11", "python3"])
    versions = {"python3.11": (3, 11, 7), "python3": (3, 12, 1)}
    path, version, name = ensure_env.choose_venv_python(environ, lambda p: versions[Path(p).name])
    assert (name, version) == ("python3.11", (3, 11, 7))
    versions = {"python3.11": None, "python3": (3, 12, 1)}   # a pyenv shim of a missing version
    assert ensure_env.choose_venv_python(environ, lambda p: versions[Path(p).name])[2] == "python3"


def test_no_python_new_enough_is_a_clear_error(tmp_path):
    major, minor = ensure_env.MIN_PYTHON
    environ = fake_which(tmp_path, ["python3"])
    with pytest.raises(ensure_env.EnvError) as err:
        ensure_env.choose_venv_python(environ, lambda p: (major, minor - 1, 10))
    assert f"no Python {major}.{minor} or newer" in str(err.value)
    assert f"python3 is Python {major}.{minor - 1}.10" in str(err.value)


@pytest.mark.parametrize("output, named", [
    (PIP_NOT_FOUND, "pip could not install torch<=2.14.1,>=2.4"),
    ("Collecting hdbscan\n  Building wheel for hdbscan (pyproject.toml): finished with status 'error'\n"
     "  ERROR: Failed building wheel for hdbscan\nFailed to build hdbscan\n", "pip could not install hdbscan"),
    ("ERROR: Cannot install timm==1.0.9 and torch==2.3 because these package versions have conflicting "
     "dependencies.\n", "pip could not install timm==1.0.9 and torch==2.3"),
    ("Collecting numpy>=1.23\n  Downloading numpy.whl\nERROR: Could not install packages due to an OSError: "
     "[Errno 28] No space left on device\n", "pip failed while installing numpy>=1.23"),
    ("ERROR: Could not open requirements file: [Errno 2] No such file\n", "pip failed before naming a package"),
])
def test_pip_failures_name_the_package(output, named):
    message = ensure_env.pip_failure(output.splitlines(), 1)
    assert message.startswith(named), message


def test_shell_exports_activate_only_a_virtual_environment():
    venv = {"prefix": "/r/.venv", "base_prefix": "/usr"}
    lines = ensure_env.shell_exports("/r/.venv/bin/python", venv).splitlines()
    assert lines[:3] == ["export PYTHON=/r/.venv/bin/python", "export VIRTUAL_ENV=/r/.venv",
                         'export PATH=/r/.venv/bin:"$PATH"']
    system = {"prefix": "/usr", "base_prefix": "/usr"}
    assert ensure_env.shell_exports("/my dir/python3", system) == "export PYTHON='/my dir/python3'\n"


# --- the scripts with stand-in interpreters --------------------------------------------------------

def main_calls(calls):
    return [call for call in calls if " main.py " in call]


def option_values(call, name):
    """Every value main.py gets for `name`, in order ('--name value' or '--name=value')."""
    values = [word.split("=", 1)[1] for word in call if word.startswith(name + "=")]
    return values + [call[i + 1] for i, word in enumerate(call) if word == name]


def test_demo_uses_the_current_python_as_is_when_it_meets_the_requirements(box):
    satisfied(box)
    result = box.run("demo.sh")
    assert result.returncode == 0, result.stderr
    calls = box.calls()
    assert [c.split()[0] for c in main_calls(calls)] == ["system"]
    assert not any(" -m venv" in c or " -m pip" in c for c in calls)
    assert not box.venv.exists()
    assert f"Using Python {sys.version.split()[0]} at {box.bin}/python3 (python3 on PATH; it meets " \
           "requirements.txt)" in result.stderr
    # The quick start's settings reach main.py; the results are listed at the end.
    call = main_calls(calls)[0].split()
    assert option_values(call, "--epochs") == ["8"] and option_values(call, "--img-size") == ["32"]
    assert option_values(call, "--lr") == ["1e-3"] and "--amp" not in call
    assert "Top-1 accuracy (best epoch, validation set): 97.222 %" in result.stdout
    run_dir = result.stdout.split("Run dir (checkpoints, summary.csv): ")[1].split()[0]
    assert f"Checkpoints:  {run_dir}/model_best.pth.tar, last.pth.tar" in result.stdout
    assert f"Curves:       {run_dir}/curves.png" in result.stdout
    assert f"Training log: {box.repo}/test/output/0/train_0.log" in result.stdout
    assert f"Summary:      {box.repo}/test/output/0/VAN_Classification_bs32_1p_acc.log" in result.stdout


def test_an_activated_environment_is_used_even_when_python3_lacks_the_requirements(box, tmp_path):
    env = tmp_path / "myenv"
    make_fake_env(env / "bin", "myenv", INDEX)
    result = box.run("demo.sh", VIRTUAL_ENV=str(env))
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in main_calls(box.calls())] == ["myenv"]
    assert "(the active virtual environment; it meets requirements.txt)" in result.stderr


def test_demo_creates_the_venv_once_and_reuses_it(box):
    result = box.run("demo.sh")
    assert result.returncode == 0, result.stderr
    calls = box.calls()
    requirements = box.repo / "requirements.txt"
    assert f"system -m venv {box.venv}" in calls
    assert [c for c in calls if " -m pip " in c] == [
        f"venv -m pip install --disable-pip-version-check -r {requirements}"]
    assert [c.split()[0] for c in main_calls(calls)] == ["venv"]
    assert "python3 on PATH) lacks: torch not installed" in result.stderr
    assert f"Creating the virtual environment {box.venv} with python3.11" in result.stderr
    assert f"at {box.venv}/bin/python (virtual environment {box.venv}, created now)" in result.stderr

    result = box.run("demo.sh", "--epochs=3", "--img-size=64")
    assert result.returncode == 0, result.stderr
    calls = box.calls()
    assert not any(" -m venv" in c or " -m pip" in c for c in calls)
    assert f"(virtual environment {box.venv}, up to date)" in result.stderr
    call = main_calls(calls)[0].split()
    assert call[0] == "venv" and option_values(call, "--epochs") == ["3"]
    assert call.index("--img-size=64") > call.index("--img-size=32")  # the later one wins in main.py


def test_changed_requirements_are_installed_again_into_the_same_venv(box):
    assert box.run("demo.sh").returncode == 0
    box.calls()
    with open(box.repo / "requirements.txt", "a") as handle:
        handle.write("timm<1.0.99\n")   # still met: only the changed file asks for the install
    result = box.run("demo.sh")
    assert result.returncode == 0, result.stderr
    calls = box.calls()
    assert not any(" -m venv" in c for c in calls)
    assert len([c for c in calls if " -m pip " in c]) == 1
    assert "requirements.txt changed since the last install" in result.stderr
    assert "updated now" in result.stderr


def test_unit_tests_adds_the_dev_requirements_and_exits_with_pytests_status(box):
    satisfied(box)
    (box.system_site / "pytest-9.2.0.dist-info").rename(box.fake / "pytest-elsewhere")  # python3 lacks pytest
    result = box.run("unit_tests.sh", "-x", "-k", "launch or main", FAKE_PYTEST_RC="3")
    assert result.returncode == 3
    calls = box.calls()
    assert [c for c in calls if " -m pip " in c] == [
        f"venv -m pip install --disable-pip-version-check -r {box.repo}/requirements.txt "
        f"-r {box.repo}/requirements-dev.txt"]
    assert calls[-1] == "venv -m pytest -x -k launch or main"
    assert f"pytest in {box.repo}: -x -k launch or main" in result.stdout
    assert "lacks: pytest not installed" in result.stderr
    # From test/: a test path is taken relative to there; pytest still runs in the repo root.
    (box.repo / "test" / "unit").mkdir()
    (box.repo / "test" / "unit" / "test_x.py").write_text("")
    result = box.run("unit_tests.sh", "unit/test_x.py::test_y", "-q", cwd=box.repo / "test")
    assert result.returncode == 0, result.stderr
    assert f"pytest in {box.repo}: {box.repo}/test/unit/test_x.py::test_y -q" in result.stdout


@pytest.mark.parametrize("where", ["test", "elsewhere"])
def test_scripts_work_from_any_directory(box, tmp_path, where):
    satisfied(box)
    cwd = box.repo / "test" if where == "test" else tmp_path
    result = box.run("demo.sh", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert f"Summary:      {box.repo}/test/output/0/" in result.stdout
    result = box.run("unit_tests.sh", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert f"pytest in {box.repo}: \n" in result.stdout


def test_failed_install_names_the_package_and_stops(box):
    (box.fake / "pip_output").write_text(PIP_NOT_FOUND)
    result = box.run("demo.sh")
    assert result.returncode == 1
    assert "error: pip could not install torch<=2.14.1,>=2.4 (ERROR: No matching distribution found for " \
           "torch<=2.14.1,>=2.4); fix that and rerun" in result.stderr
    assert PIP_NOT_FOUND.splitlines()[2] in result.stderr  # pip's own output is shown too
    assert main_calls(box.calls()) == []
    assert not (box.venv / ensure_env.STAMP_NAME).exists()


def test_van_venv_forces_its_own_environment(box, tmp_path):
    satisfied(box)   # python3 would do, but CI asks for a fresh environment of its own
    ci_venv = tmp_path / "ci-venv"
    result = box.run("unit_tests.sh", VAN_VENV=str(ci_venv))
    assert result.returncode == 0, result.stderr
    calls = box.calls()
    assert f"system -m venv {ci_venv}" in calls and calls[-1] == "venv -m pytest"
    assert not box.venv.exists()


def test_a_folder_that_is_not_a_venv_is_never_deleted(box):
    box.venv.mkdir()
    (box.venv / "notes.txt").write_text("mine")
    result = box.run("demo.sh")
    assert result.returncode == 1
    assert f"error: {box.venv} exists but is not a virtual environment" in result.stderr
    assert (box.venv / "notes.txt").read_text() == "mine"


def test_a_broken_venv_is_created_again(box):
    box.venv.mkdir()
    (box.venv / "pyvenv.cfg").write_text("home = /gone\n")   # its Python was removed
    result = box.run("demo.sh")
    assert result.returncode == 0, result.stderr
    assert f"The virtual environment {box.venv} is unusable (no {box.venv}/bin/python)" in result.stderr
    assert f"system -m venv {box.venv}" in box.calls()

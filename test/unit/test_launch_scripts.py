"""ModelZoo launch scripts (test/*.sh): argument handling, running main.py, and the summary files.

The scripts are copied into a temporary repo so their test/output/ lands there, and main.py is
replaced by a stand-in python (PYTHON=...) that records its command line, prints a log in the
format main.py writes and writes the results file main.py would write for that log (--results).
`python -m utils.launcher` and `python -m utils.modelzoo` run for real. The tests marked slow run the
real main.py through the scripts on a small dataset; the longer end-to-end runs on CPU are in .ci/run.
"""
import os
import json
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_modelzoo import EVALUATION, TRAINING, write_results

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["common.sh", "env_npu.sh", "train_performance_1p.sh", "train_performance_8p.sh",
           "train_full_1p.sh", "train_full_8p.sh", "train_eval_1p.sh", "train_eval_8p.sh",
           "train_finetune_1p.sh"]

# Lines in the exact format of main.py's log (see BRIEF: "Log lines"), two epochs.
TRAIN_LOG = """\
Namespace(model='van_b0')
Train: 0 [   0/  45 (  0%)]  Loss: 2.3100 (2.3100)  Time: 0.912s,  35.09/s  LR: 1.000e-06  Data: 0.210 (0.210)
Train: 0 [  44/  45 (100%)]  Loss: 2.2500 (2.2800)  Time: 0.512s,  62.50/s  LR: 1.000e-06  Data: 0.010 (0.012)
Epoch 0 FPS:60.25
Test: [  11/  12]  Loss: 2.1000 (2.1500)  Acc@1: 20.0000 (18.5000)  Acc@5: 60.0000 (58.0000)
* Acc@1 18.500 Acc@5 58.000 Loss 2.150 (images 360)
Train: 1 [   0/  45 (  0%)]  Loss: 1.9000 (1.9000)  Time: 0.500s,  64.00/s  LR: 5.000e-04  Data: 0.010 (0.010)
Train: 1 [  44/  45 (100%)]  Loss: 1.5432 (1.7000)  Time: 0.490s,  65.30/s  LR: 5.000e-04  Data: 0.010 (0.011)
Epoch 1 FPS:64.00
Test: [  11/  12]  Loss: 1.4000 (1.4500)  Acc@1: 60.0000 (55.2780)  Acc@5: 95.0000 (94.1670)
* Acc@1 55.278 Acc@5 94.167 Loss 1.450 (images 360)
*** Best metric: 55.278 (epoch 1)
"""
EVAL_LOG = """\
Test: [   0/   3]  Loss: 0.6000 (0.6000)  Acc@1: 84.0000 (84.0000)  Acc@5: 99.0000 (99.0000)
Test: [   2/   3]  Loss: 0.6200 (0.6100)  Acc@1: 83.0000 (83.5000)  Acc@5: 98.8000 (98.9000)
* Acc@1 83.500 Acc@5 98.900 Loss 0.610 (images 360)
"""

FAKE_PYTHON = """#!/bin/bash
# Stand-in for python: records the call, then prints the prepared log and writes the prepared results
# file like main.py would; python -m (utils.launcher, utils.modelzoo) is the real interpreter.
printf '%q ' "$@" >> "$FAKE_DIR/calls.txt"; echo >> "$FAKE_DIR/calls.txt"
[[ $1 == -m ]] && PYTHONPATH=$REAL_REPO exec "$REAL_PYTHON" "$@"
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}" >> "$FAKE_DIR/env.txt"
echo "NPU_ENV=${ASCEND_HOME_PATH:-unset} ${TASK_QUEUE_ENABLE:-unset} ${CPU_AFFINITY_CONF:-unset}" >> "$FAKE_DIR/npu_env.txt"
[[ $1 == tools/make_demo_data.py ]] && { echo "demo dataset written"; exit 0; }
cat "$FAKE_DIR/log.txt"
while (( $# )); do
    [[ $1 == --results && -f $FAKE_DIR/results.json ]] && cp "$FAKE_DIR/results.json" "$2"
    shift
done
exit "${FAKE_RC:-0}"
"""


def results_of(log, tmp_path):
    """The results file main.py writes for the run that printed `log` (None: it wrote none)."""
    if log == TRAIN_LOG:
        return write_results(tmp_path / 'train_results.json', 'acc', 128, 1, TRAINING).read_text()
    if log == EVAL_LOG:
        return write_results(tmp_path / 'eval_results.json', 'eval', 128, 1, EVALUATION).read_text()
    return None


def repo_with_scripts(tmp_path):
    """A temporary repo whose test/ holds copies of the launch scripts, so their test/output/ lands there."""
    root = tmp_path / "repo"
    (root / "test").mkdir(parents=True)
    for name in SCRIPTS:
        shutil.copy(REPO / "test" / name, root / "test" / name)
    return root


@pytest.fixture
def repo(tmp_path):
    """A copy of the scripts in a temporary repo, a small ImageFolder and the stand-in python."""
    root = repo_with_scripts(tmp_path)
    for split in ("train", "val"):
        (root / "data" / "digits" / split / "0").mkdir(parents=True)
    fake = tmp_path / "fake"
    fake.mkdir()
    python = fake / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    (fake / "log.txt").write_text(TRAIN_LOG)
    (fake / "results.json").write_text(results_of(TRAIN_LOG, tmp_path))
    (fake / "ckpt.pth.tar").write_bytes(b"checkpoint")
    return root


def run_script(repo, script, *args, cwd=None, log=None, results=None, rc=0, env_extra=None):
    """Run a launch script with the stand-in trainer printing `log` and writing `results` (default: the
    results of `log`)."""
    fake = repo.parent / "fake"
    if log is not None:
        (fake / "log.txt").write_text(log)
        results = results or results_of(log, repo.parent)
        (fake / "results.json").unlink(missing_ok=True)
        if results is not None:
            (fake / "results.json").write_text(results)
    env = {k: v for k, v in os.environ.items() if k not in ("ASCEND_DEVICE_ID", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHON=str(fake / "python"), FAKE_DIR=str(fake), FAKE_RC=str(rc), REAL_PYTHON=sys.executable,
               REAL_REPO=str(REPO), **(env_extra or {}))
    return subprocess.run(["bash", str(repo / "test" / script), *args], cwd=cwd or repo, env=env,
                          capture_output=True, text=True, timeout=60)


def calls(repo):
    """The stand-in's calls, without those of utils.launcher and utils.modelzoo (python -m)."""
    path = repo.parent / "fake" / "calls.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [call for call in map(shlex.split, lines) if call[:1] != ["-m"]]


def main_call(repo):
    (call,) = [c for c in calls(repo) if "main.py" in c]
    return call


def option(call, name):
    return call[call.index(name) + 1]


def summary(repo, device_id, case):
    lines = (repo / "test" / "output" / str(device_id) / f"{case}.log").read_text().splitlines()
    return [tuple(line.split(" = ", 1)) for line in lines]


# --- whole scripts with the stand-in trainer -----------------------------------------------------

def test_performance_1p_writes_the_modelzoo_summary_in_order(repo):
    result = run_script(repo, "train_performance_1p.sh", "--data_path=data/digits", "--device=cpu")
    assert result.returncode == 0, result.stderr
    assert "------------------ Final result ------------------" in result.stdout
    assert "Final Performance images/sec : 64.00" in result.stdout
    assert "E2E Training Duration sec : " in result.stdout
    case = "VAN_Classification_bs128_1p_perf"
    fields = summary(repo, 0, case)
    assert [k for k, _ in fields] == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName",
                                      "ActualFPS", "TrainingTime", "ActualLoss", "E2ETrainingTime"]
    values = dict(fields)
    assert values["Network"] == "VAN_Classification"
    assert values["RankSize"] == "1" and values["BatchSize"] == "128" and values["CaseName"] == case
    assert values["DeviceType"] == os.uname().machine
    assert values["ActualFPS"] == "64.00" and values["TrainingTime"] == "2000.00"
    assert values["ActualLoss"] == "1.5432"
    assert int(values["E2ETrainingTime"]) >= 0
    loss_file = repo / "test" / "output" / "0" / f"train_{case}_loss.txt"
    assert loss_file.read_text().split() == ["2.3100", "2.2500", "1.9000", "1.5432"]
    assert (repo / "test" / "output" / "0" / "train_0.log").read_text() == TRAIN_LOG


def test_port_defaults_reach_main_py(repo):
    assert run_script(repo, "train_performance_1p.sh", "--data_path=data/digits").returncode == 0
    call = main_call(repo)
    assert call[0] == "main.py"  # run directly, not under torchrun
    assert option(call, "--model") == "van_base" and option(call, "-b") == "128"
    # lr and drop path are main.py's recipe (per global batch, per variant): the scripts pass none.
    assert not [a for a in call if a.startswith(("--lr", "--drop-path"))]
    assert option(call, "--epochs") == "1" and option(call, "--cooldown-epochs") == "0"  # one epoch in all
    assert option(call, "--device") == "auto"
    assert "--amp" in call and "--eval" not in call and "-j" not in call
    assert Path(option(call, "--data_path")) == repo / "data" / "digits"
    assert option(call, "--output") == str(repo / "output" / "train")
    assert option(call, "--experiment").startswith("VAN_Classification_bs128_1p_perf-")


def test_options_pass_through_and_override_defaults(repo):
    result = run_script(repo, "train_full_1p.sh", "--data_path", "data/digits", "--model=van_b0",
                        "--batch-size", "32", "--img-size=64", "--channels-last", "--workers=3",
                        "--epochs=2", "--no-amp", "--max-steps-per-epoch", "5", "--device_id=5")
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert option(call, "--model") == "van_b0" and option(call, "-b") == "32"
    assert "--workers=3" in call and option(call, "--epochs") == "2"  # --workers is main.py's
    assert "--img-size=64" in call and "--channels-last" in call and "--amp" not in call
    assert option(call, "--max-steps-per-epoch") == "5"
    # --device_id picks the output folder and the physical device; the case is an accuracy run.
    values = dict(summary(repo, 5, "VAN_Classification_bs32_1p_acc"))
    assert values["TrainAccuracy"] == "55.278" and values["BatchSize"] == "32"
    assert "Final Train Accuracy : 55.278" in result.stdout
    assert (repo.parent / "fake" / "env.txt").read_text().strip() == "CUDA_VISIBLE_DEVICES=5"


def resolved_by_main_py(call):
    """(lr, drop path, world size) that main.py resolves from a recorded script call."""
    import main
    start = call.index("main.py")
    world_size = 1
    if start:  # under torchrun: processes per node x nodes
        launcher = dict(a[2:].split("=", 1) for a in call[:start] if a.startswith("--") and "=" in a)
        world_size = int(launcher["nproc_per_node"]) * int(launcher.get("nnodes", 1))
    args = main.parse_args(call[start + 1:])
    line = main.resolve_recipe(args, world_size)
    assert f"world size {world_size}, global batch {args.batch_size * world_size} " in line
    return args.lr, args.drop_path, world_size


@pytest.mark.parametrize("model, drop_path", [("van_b0", 0.1), ("van_b1", 0.1), ("van_b2", 0.1), ("van_b3", 0.2),
                                               ("van_base", 0.1)])
def test_scripts_train_with_the_recipe_lr_per_global_batch_and_drop_path_per_variant(repo, model, drop_path):
    runs = [("train_full_1p.sh", [], 1), ("train_performance_1p.sh", [], 1), ("train_finetune_1p.sh", None, 1),
            ("train_full_8p.sh", [], 8), ("train_full_8p.sh", ["--nproc=2"], 2),
            ("train_performance_8p.sh", ["--nproc=1"], 1), ("train_performance_8p.sh", [], 8)]
    ckpt = str(repo.parent / "fake" / "ckpt.pth.tar")
    for script, extra, world_size in runs:
        extra = [f"--pth_path={ckpt}"] if extra is None else extra
        calls_file = repo.parent / "fake" / "calls.txt"
        calls_file.unlink(missing_ok=True)
        result = run_script(repo, script, "--data_path=data/digits", f"--model={model}", *extra)
        assert result.returncode == 0, result.stderr
        # 1e-3 belongs to the reference's 8 x 128 = 1024 images per step, and scales with the global batch.
        assert resolved_by_main_py(main_call(repo)) == (pytest.approx(1e-3 * world_size / 8), drop_path, world_size), \
            script


def test_a_given_lr_and_drop_path_pass_through_to_main_py(repo):
    result = run_script(repo, "train_full_8p.sh", "--data_path=data/digits", "--nproc=2", "--lr=2e-3",
                        "--drop-path", "0.3")
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert "--lr=2e-3" in call and option(call, "--drop-path") == "0.3"
    assert resolved_by_main_py(call) == (2e-3, 0.3, 2)


def test_options_with_several_values_pass_through_whole(repo):
    result = run_script(repo, "train_performance_1p.sh", "--data_path=data/digits", "--scale", "0.5", "1",
                        "--mean", "0.5", "0.5", "0.5", "--amp")
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert call[call.index("--scale"):call.index("--scale") + 3] == ["--scale", "0.5", "1"]
    assert call[call.index("--mean") + 1:call.index("--mean") + 4] == ["0.5"] * 3
    assert call.count("--amp") == 1


def test_short_options_are_understood(repo):
    assert run_script(repo, "train_performance_1p.sh", "--data_path=data/digits", "-b16", "-j", "2").returncode == 0
    call = main_call(repo)
    assert option(call, "-b") == "16" and option(call, "-j") == "2" and call.count("-b") == 1
    assert (repo / "test" / "output" / "0" / "VAN_Classification_bs16_1p_perf.log").exists()


def test_8p_uses_torchrun_and_the_real_process_count(repo):
    result = run_script(repo, "train_performance_8p.sh", "--data_path=data/digits", "--nproc=2", "--device=cpu")
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert call[:4] == ["tools/torchrun.py", "--nproc_per_node=2", "--standalone", "main.py"]
    values = dict(summary(repo, 0, "VAN_Classification_bs128_2p_perf"))
    assert values["RankSize"] == "2" and values["TrainingTime"] == f"{128 * 2 * 1000 / 64:.2f}"


def test_8p_default_is_eight_processes_and_multi_node_needs_master(repo):
    assert run_script(repo, "train_full_8p.sh", "--data_path=data/digits").returncode == 0
    assert "--nproc_per_node=8" in main_call(repo)
    # 300 cosine epochs + main.py's default 10 cooldown epochs: the port's 310.
    assert option(main_call(repo), "--epochs") == "300" and "--cooldown-epochs" not in main_call(repo)
    result = run_script(repo, "train_full_8p.sh", "--data_path=data/digits", "--nnodes=2")
    assert result.returncode == 2 and "--master_addr" in result.stderr
    (repo.parent / "fake" / "calls.txt").unlink()
    result = run_script(repo, "train_full_8p.sh", "--data_path=data/digits", "--nnodes=2", "--node_rank=1",
                        "--master_addr=node0", "--master_port=29600")
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert "--nnodes=2" in call and "--node_rank=1" in call and "--master_addr=node0" in call
    assert "--standalone" not in call
    assert (repo / "test" / "output" / "0" / "VAN_Classification_bs128_16p_acc.log").exists()


def test_eval_8p_takes_positional_data_and_checkpoint(repo):
    ckpt = repo.parent / "fake" / "ckpt.pth.tar"
    result = run_script(repo, "train_eval_8p.sh", "data/digits", str(ckpt), "--nproc=1", log=EVAL_LOG)
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert "--eval" in call and option(call, "--pretrained") == str(ckpt)
    assert "Final Train Accuracy : 83.500" in result.stdout
    assert "Final Performance" not in result.stdout  # evaluation measures no training speed
    fields = summary(repo, 0, "VAN_Classification_bs128_1p_acc")
    assert [k for k, _ in fields] == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName",
                                      "TrainAccuracy", "ActualLoss", "E2ETrainingTime"]
    assert dict(fields)["ActualLoss"] == "0.610"


def test_eval_and_finetune_accept_pth_path_option(repo):
    ckpt = repo.parent / "fake" / "ckpt.pth.tar"
    result = run_script(repo, "train_eval_1p.sh", "--data_path=data/digits", f"--pth_path={ckpt}", log=EVAL_LOG)
    assert result.returncode == 0, result.stderr
    (repo.parent / "fake" / "calls.txt").unlink()
    result = run_script(repo, "train_finetune_1p.sh", "--data_path=data/digits", f"--pth_path={ckpt}",
                        log=TRAIN_LOG)
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert option(call, "--pretrained") == str(ckpt) and "--eval" not in call


def test_scripts_work_from_inside_test_dir_with_relative_paths(repo):
    result = run_script(repo, "train_performance_1p.sh", "--data_path=../data/digits", cwd=repo / "test")
    assert result.returncode == 0, result.stderr
    assert Path(option(main_call(repo), "--data_path")).resolve() == repo / "data" / "digits"
    assert (repo / "test" / "output" / "0" / "VAN_Classification_bs128_1p_perf.log").exists()


def test_output_dir_is_recreated_per_run(repo):
    stale = repo / "test" / "output" / "0" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("old run")
    assert run_script(repo, "train_performance_1p.sh", "--data_path=data/digits").returncode == 0
    assert not stale.exists()


def test_missing_data_path_falls_back_to_demo_data_and_says_so(repo):
    result = run_script(repo, "train_performance_1p.sh")
    assert result.returncode == 0, result.stderr
    assert "No --data_path given: using the demo dataset" in result.stdout
    demo = str(repo / "data" / "demo")
    assert calls(repo)[0] == ["tools/make_demo_data.py", "--out", demo]
    assert option(main_call(repo), "--data_path") == demo


@pytest.mark.parametrize("args, message", [
    (["--data_path="], "--data_path= is empty"),
    (["--data_path"], "--data_path needs a value"),
    (["--nproc=2"], "--nproc is for the 8p scripts"),
    (["--amp=1"], "--amp takes no value"),
    (["--eval"], "--eval is chosen by the script"),
    (["--data_path=data/digits", "stray"], "unexpected argument 'stray'"),
])
def test_bad_arguments_fail_fast_with_one_clear_line(repo, args, message):
    result = run_script(repo, "train_performance_1p.sh", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert calls(repo) == []  # nothing was started
    assert not (repo / "test" / "output").exists()


def test_help_prints_the_usage_and_runs_nothing(repo):
    result = run_script(repo, "train_eval_1p.sh", "--data_path=data/digits", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: bash test/train_eval_1p.sh [--data_path=DIR] [--pth_path=FILE|DIR]")
    assert "Positional DIR [FILE] are --data_path [--pth_path]" in result.stdout
    assert calls(repo) == [] and not (repo / "test" / "output").exists()


def test_eval_and_finetune_without_a_checkpoint_fail_before_running(repo):
    result = run_script(repo, "train_eval_8p.sh", "data/digits")
    assert result.returncode == 2 and "--pth_path=FILE is required: the checkpoint to evaluate" in result.stderr
    result = run_script(repo, "train_finetune_1p.sh", "--data_path=data/digits")
    assert result.returncode == 2 and "--pth_path=FILE is required: the checkpoint to start from" in result.stderr
    assert calls(repo) == []


def test_the_script_leaves_checking_data_and_weights_to_main_py(repo):
    # A validation/ split and a weights directory (HuggingFace layout) are main.py's to judge; the script
    # once refused both. Paths reach main.py made absolute against the caller's directory.
    (repo / "data" / "digits" / "val").rename(repo / "data" / "digits" / "validation")
    weights = repo / "hf_weights"
    weights.mkdir()
    result = run_script(repo, "train_eval_1p.sh", "data/digits", "hf_weights", log=EVAL_LOG)
    assert result.returncode == 0, result.stderr
    call = main_call(repo)
    assert option(call, "--data_path") == str(repo / "data" / "digits")
    assert option(call, "--pretrained") == str(weights)
    assert "Final Train Accuracy : 83.500" in result.stdout


def test_a_user_error_of_main_py_is_the_scripts_exit_status_2(repo):
    result = run_script(repo, "train_full_1p.sh", "--data_path=data/digits", "--batch-size=0", rc=2,
                        log="error: argument -b/--batch-size: expected an integer >= 1, got '0'\n")
    assert result.returncode == 2
    assert "main.py refused to run (exit status 2, its error is above)" in result.stderr
    assert "error: argument -b/--batch-size" in result.stdout  # main.py's own message, also in the log
    assert not list((repo / "test" / "output" / "0").glob("VAN_Classification_*.log"))


def test_8p_rejects_device_id(repo):
    result = run_script(repo, "train_performance_8p.sh", "--device_id=1")
    assert result.returncode == 2 and "--device_id is for the 1p scripts" in result.stderr


def test_failed_training_exits_nonzero_without_summary(repo):
    result = run_script(repo, "train_performance_1p.sh", "--data_path=data/digits",
                        log="Traceback (most recent call last):\nRuntimeError: boom\n", rc=1)
    assert result.returncode != 0
    assert "main.py exited with status 1" in result.stderr and "train_0.log" in result.stderr
    out = repo / "test" / "output" / "0"
    assert (out / "train_0.log").exists()
    assert not list(out.glob("VAN_Classification_*.log"))


# Stand-in for main.py under a stop signal: it saves (a second later) and exits with the signal's status.
STOPPABLE_PYTHON = """#!/bin/bash
[[ $1 == -m ]] && PYTHONPATH=$REAL_REPO exec "$REAL_PYTHON" "$@"
[[ $1 == tools/make_demo_data.py ]] && exit 0
stop() { sleep 1; echo "recovery checkpoint: epoch 0 step 1 -> saved"; exit "$1"; }
trap 'stop 143' TERM
trap 'stop 130' INT
echo "Train: 0 [   1/  45 (  2%)]  Loss: 2.3100 (2.3100)"
while :; do sleep 0.1; done
"""


@pytest.mark.parametrize("script, signum", [("train_full_1p.sh", signal.SIGTERM), ("train_full_8p.sh", signal.SIGINT)])
def test_a_group_signal_lets_main_py_save_and_says_how_to_resume(repo, script, signum):
    python = repo.parent / "fake" / "python"
    python.write_text(STOPPABLE_PYTHON)
    env = dict(os.environ, PYTHON=str(python), REAL_PYTHON=sys.executable, REAL_REPO=str(REPO))
    process = subprocess.Popen(["bash", str(repo / "test" / script), "--data_path=data/digits", "--experiment=run1"],
                               cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("Train: 0"):
                os.killpg(process.pid, signum)  # what a scheduler, torchrun or Ctrl-C does
                break
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "--experiment=run1 --resume auto" in err
    # tee outlived the signal: the log has what main.py wrote after it
    assert "recovery checkpoint" in (repo / "test" / "output" / "0" / "train_0.log").read_text()


def test_training_that_finished_no_epoch_fails_instead_of_empty_summary(repo, tmp_path):
    no_epoch = json.loads(results_of(TRAIN_LOG, tmp_path))
    no_epoch.update(epochs=[], train_losses=[], best=None)
    result = run_script(repo, "train_performance_1p.sh", "--data_path=data/digits", log="nothing useful\n",
                        results=json.dumps(no_epoch))
    assert result.returncode == 1
    assert "no finished epoch: training did not finish an epoch (no summary written)" in result.stderr
    assert not list((repo / "test" / "output" / "0").glob("VAN_Classification_*.log"))
    # No results file at all (main.py stopped before writing one, yet said it succeeded)
    result = run_script(repo, "train_performance_1p.sh", "--data_path=data/digits", log="nothing useful\n")
    assert result.returncode == 1 and "cannot read the results file" in result.stderr
    assert not list((repo / "test" / "output" / "0").glob("VAN_Classification_*.log"))


def test_env_npu_is_harmless_without_cann():
    result = subprocess.run(["bash", "-c", f'source "{REPO}/test/env_npu.sh"; echo "autoload=$TORCH_DEVICE_BACKEND_AUTOLOAD"'],
                            capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"})
    if Path("/usr/local/Ascend").exists() or Path("/etc/Ascend").exists():
        pytest.skip("this machine has CANN installed")
    assert result.returncode == 0 and "autoload=0" in result.stdout


# --- env_npu.sh on a machine with CANN (a user install under $HOME/Ascend, the tree faked) -------------

REAL_CANN = Path("/etc/Ascend/ascend_cann_install.info").exists()  # a root install takes precedence


def fake_cann(home, layout="cann"):
    """$HOME/Ascend as CANN's installer leaves it: the install-path record and <layout>/set_env.sh."""
    root = home / "Ascend"
    (root / layout).mkdir(parents=True)
    (root / "ascend_cann_install.info").write_text(f"Install_Path={root}\n")
    (root / layout / "set_env.sh").write_text(f'export ASCEND_HOME_PATH="{root / layout}"\n')
    return root / layout


def source_env_npu(home, snippet, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("TASK_QUEUE_ENABLE", "CPU_AFFINITY_CONF", "ASCEND_HOME_PATH", "TORCH_DEVICE_BACKEND_AUTOLOAD")}
    result = subprocess.run(["bash", "-c", f'source "{REPO}/test/env_npu.sh"; {snippet}'], capture_output=True,
                            text=True, timeout=30, env=dict(base, HOME=str(home), **env))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(REAL_CANN, reason="this machine has CANN installed for root")
@pytest.mark.parametrize("layout", ["cann", "ascend-toolkit"])  # CANN >= 8.5, and before
def test_env_npu_sources_cann_and_sets_the_recommended_npu_switches(tmp_path, layout):
    toolkit = fake_cann(tmp_path, layout)
    out = source_env_npu(tmp_path, 'echo "$ASCEND_HOME_PATH|$TASK_QUEUE_ENABLE|$CPU_AFFINITY_CONF|'
                                   '${TORCH_DEVICE_BACKEND_AUTOLOAD-unset}"')
    assert out.splitlines()[-1] == f"{toolkit}|2|2|unset"


@pytest.mark.skipif(REAL_CANN, reason="this machine has CANN installed for root")
def test_env_npu_keeps_the_callers_settings(tmp_path):
    fake_cann(tmp_path)
    out = source_env_npu(tmp_path, 'echo "$TASK_QUEUE_ENABLE|$CPU_AFFINITY_CONF"', TASK_QUEUE_ENABLE="1",
                         CPU_AFFINITY_CONF="1,npu0:0-3")
    assert out.splitlines()[-1] == "1|1,npu0:0-3"


@pytest.mark.skipif(REAL_CANN, reason="this machine has CANN installed for root")
def test_8p_ranks_run_with_cann_task_queue_2_and_per_rank_core_binding(repo, tmp_path):
    toolkit = fake_cann(tmp_path)
    result = run_script(repo, "train_performance_8p.sh", "--data_path=data/digits", env_extra=dict(HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    # torchrun passes the environment to every rank; CPU_AFFINITY_CONF=2 binds each to its NPU's cores.
    assert f"NPU_ENV={toolkit} 2 2" in (repo.parent / "fake" / "npu_env.txt").read_text()


# --- the scripts with the real main.py (small CPU runs) ------------------------------------------------

@pytest.fixture
def real_repo(tmp_path):
    """A repo with copies of the scripts whose code is the real one."""
    root = repo_with_scripts(tmp_path)
    for name in ("main.py", "models", "utils", "tools"):
        os.symlink(REPO / name, root / name)
    return root


def tiny_imagefolder(root, val_name="val"):
    """2 classes of 32x32 images: 8 training and 4 validation images each."""
    for split, count in (("train", 8), (val_name, 4)):
        for label, color in (("dark", (30, 30, 30)), ("light", (220, 220, 220))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), tuple(c + 3 * i for c in color)).save(folder / f"{i}.png")
    return root


SMALL = ["--device=cpu", "--model=van_b0", "--img-size=32", "--batch-size=4", "--no-amp", "--workers=0"]


def run_real(repo, script, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("ASCEND_DEVICE_ID", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(repo / "test" / script), *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_dataset_with_a_validation_folder_trains_through_the_script(real_repo, tmp_path):
    from utils.modelzoo import check_summary
    data = tiny_imagefolder(tmp_path / "data", val_name="validation")
    result = run_real(real_repo, "train_performance_1p.sh", f"--data_path={data}", *SMALL, "--max-steps-per-epoch=3",
                      "--log-interval=1", "--experiment=validation_folder")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = real_repo / "test" / "output" / "0"
    fields = check_summary(str(out / "VAN_Classification_bs4_1p_perf.log"), "perf", 4, 1)
    # What the log says, read as the scripts once read it (each Train line's loss, the last FPS line).
    log = (out / "train_0.log").read_text()
    losses = re.findall(r"^Train: .*  Loss: (\S+) ", log, re.M)
    assert (out / "train_VAN_Classification_bs4_1p_perf_loss.txt").read_text().split() == losses and len(losses) == 3
    assert fields["ActualLoss"] == losses[-1]
    assert fields["ActualFPS"] == re.findall(r"^Epoch \d+ FPS:(\S+)$", log, re.M)[-1]
    assert f"Final Performance images/sec : {fields['ActualFPS']}" in result.stdout
    assert (real_repo / "output" / "train" / "validation_folder" / "last.pth.tar").is_file()


@pytest.mark.slow
def test_huggingface_weights_directory_evaluates_through_the_script(real_repo, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file
    from test_weights import _hf_state_dict
    from utils.modelzoo import check_summary
    data = tiny_imagefolder(tmp_path / "data")
    torch.manual_seed(0)
    state_dict = timm.create_model("van_b0", num_classes=2).state_dict()
    weights = tmp_path / "van-b0-hf"
    weights.mkdir()
    hf = {k: v.contiguous() for k, v in _hf_state_dict(state_dict).items() if not k.endswith("num_batches_tracked")}
    save_file(hf, str(weights / "model.safetensors"))
    result = run_real(real_repo, "train_eval_1p.sh", str(data), str(weights), *SMALL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_summary(str(real_repo / "test" / "output" / "0" / "VAN_Classification_bs4_1p_acc.log"), "eval", 4, 1)
    assert "* Acc@1 " in (real_repo / "test" / "output" / "0" / "train_0.log").read_text()


@pytest.mark.slow
def test_main_py_checks_what_the_script_passes_and_its_status_2_comes_through(real_repo, tmp_path):
    result = run_real(real_repo, "train_performance_1p.sh", f"--data_path={tmp_path / 'nowhere'}", *SMALL)
    assert result.returncode == 2
    assert f"error: --data_path {tmp_path / 'nowhere'} does not exist" in result.stdout
    assert "main.py refused to run (exit status 2" in result.stderr and "Traceback" not in result.stdout
    data = tiny_imagefolder(tmp_path / "data")
    result = run_real(real_repo, "train_eval_1p.sh", str(data), str(tmp_path / "missing.pth"), *SMALL)
    assert result.returncode == 2 and "weights file not found" in result.stdout

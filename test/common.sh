# Shared part of the ModelZoo launch scripts in test/ (sourced by them, never run on its own).
#
# A launch script sets the defaults that differ between scripts (epochs, ...) and calls
#   launch <1p|8p> <perf|acc|eval> "$@"
# which has utils/launcher.py read and check the script's own options (all others go to main.py, which
# checks them), recreates test/output/<device id>/, falls back to the demo dataset when --data_path is absent,
# runs main.py (tools/torchrun.py for 8p) into train_<device id>.log, and has utils/modelzoo.py print the
# "Final result" block and write the summary <CaseName>.log and the loss file from main.py's results file.

TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$TEST_DIR")
CALLER_PWD=$PWD  # paths the user types are relative to where the script was called from
cd "$REPO_ROOT" || exit 1

# The VAN port's defaults (Ascend ModelZoo); every one can be overridden on the command line. The learning
# rate and drop path are main.py's recipe (lr 1e-3 per global batch of 1024, drop path per variant).
Network="VAN_Classification"
model="van_base"
batch_size=128            # per device
amp=1
epochs=1                  # the scripts set their own
cooldown_epochs=""        # empty: main.py's default (10 epochs at min lr after the cosine)
device="auto"
device_id=""              # 1p only; empty: ASCEND_DEVICE_ID from the environment, else 0
nproc=8 nnodes=1 node_rank=0 master_addr="" master_port="${MASTER_PORT:-29500}"  # 8p only
data_path="" pth_path="" output_root="" experiment=""  # output: <repo>/output/train; experiment: <CaseName>-<date>
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

die() { echo "error: $2" >&2; exit "$1"; }  # die <exit code> <message>

# read_arguments <1p|8p> <perf|acc|eval> [script arguments...]: sets the variables above, extra_args (main.py's
# options), rank_size, CaseName and modelzoo_case as utils/launcher.py says (it prints --help and the errors).
read_arguments() {
    launch_mode=$1 run_kind=$2
    shift 2
    [[ -n $PYTHON ]] || die 1 "no python on PATH; activate the environment from README.md (pip install -r requirements.txt -r requirements-dev.txt)"
    local variable defaults=() plan
    for variable in Network model batch_size amp epochs cooldown_epochs device device_id nproc nnodes node_rank \
                    master_addr master_port data_path pth_path output_root experiment; do
        defaults+=("$variable=${!variable}")
    done
    plan=$("$PYTHON" -m utils.launcher "$launch_mode" "$run_kind" --script "$(basename "$0")" \
           --caller-dir "$CALLER_PWD" ${pth_required:+--pth-required} "${defaults[@]}" -- "$@") || exit
    eval "$plan"
}

# Recreates test/output/<id>/ and makes sure there is data to train on.
prepare_run() {
    export ASCEND_DEVICE_ID=${device_id:-0}
    # Pin the 1p run to one physical device; main.py then sees it as device 0.
    [[ -z $device_id ]] || export ASCEND_RT_VISIBLE_DEVICES=$device_id CUDA_VISIBLE_DEVICES=$device_id
    [[ ${etp_running_flag:-} == true ]] || source "$TEST_DIR/env_npu.sh"
    out_dir="$TEST_DIR/output/$ASCEND_DEVICE_ID"
    rm -rf "$out_dir"
    mkdir -p "$out_dir" || die 1 "cannot create $out_dir"
    log_file="$out_dir/train_${ASCEND_DEVICE_ID}.log" results_file="$out_dir/results.json"
    if [[ -z $data_path ]]; then
        data_path="$REPO_ROOT/data/demo"
        echo "No --data_path given: using the demo dataset (scikit-learn digits, 10 classes) at $data_path"
        "$PYTHON" tools/make_demo_data.py --out "$data_path" || die 1 "could not create the demo dataset (is scikit-learn installed? see README.md)"
    fi
    output_root=${output_root:-$REPO_ROOT/output/train}
    experiment=${experiment:-${CaseName}-$(date +%Y%m%d-%H%M%S)}
    run_dir="$output_root/$experiment"
}

# Fills the array main_cmd with the full command line (tools/torchrun.py for 8p).
build_command() {
    main_cmd=("$PYTHON")
    if [[ $launch_mode == 8p ]]; then
        main_cmd+=(tools/torchrun.py --nproc_per_node="$nproc")
        if (( nnodes == 1 )); then
            main_cmd+=(--standalone)   # picks a free port: several runs can share a machine
        else
            main_cmd+=(--nnodes="$nnodes" --node_rank="$node_rank" --master_addr="$master_addr" --master_port="$master_port")
        fi
    fi
    main_cmd+=(main.py --data_path "$data_path" --model "$model" -b "$batch_size" --epochs "$epochs"
               --device "$device" --output "$output_root" --experiment "$experiment")
    (( amp )) && main_cmd+=(--amp)
    [[ -n $cooldown_epochs ]] && main_cmd+=(--cooldown-epochs "$cooldown_epochs")
    [[ $run_kind == eval ]] && main_cmd+=(--eval)
    [[ -n $pth_path ]] && main_cmd+=(--pretrained "$pth_path")
    main_cmd+=("${extra_args[@]}" --results "$results_file")
}

_stopped_hint() {
    [[ $run_kind == eval ]] && { echo "(main.py exit status $status); see $log_file"; return; }
    echo "(main.py exit status $status); $run_dir keeps the point where it stopped: run this script again with the same arguments plus --experiment=$experiment --resume auto to continue (log: $log_file)"
}

# launch <1p|8p> <perf|acc|eval> [script arguments...]: the whole script.
launch() {
    read_arguments "$@"
    prepare_run
    build_command
    echo "Running: ${main_cmd[*]}"
    echo "Log: $log_file"
    local start_time status stop_signal=""
    start_time=$(date +%s)
    # Schedulers, torchrun and Ctrl-C signal the whole process group. main.py then saves a recovery
    # point and exits; this script waits for it (bash runs a trap only after the pipeline has ended)
    # and tee ignores the signal, so the log keeps main.py's last lines.
    trap 'stop_signal=SIGTERM' TERM
    trap 'stop_signal=SIGINT' INT
    "${main_cmd[@]}" 2>&1 | (trap '' TERM INT; exec tee "$log_file")
    status=${PIPESTATUS[0]}
    trap - TERM INT
    case $status in
        0) stop_signal="" ;;  # it finished before the signal mattered
        130) stop_signal=SIGINT ;;  # main.py and tools/torchrun.py report a stop with the signal's status
        143) stop_signal=SIGTERM ;;
    esac
    [[ -n $stop_signal ]] && die "$(( $(kill -l "$stop_signal") + 128 ))" "stopped by $stop_signal $(_stopped_hint)"
    (( status != 2 )) || die 2 "main.py refused to run (exit status 2, its error is above); see $log_file"
    (( status == 0 )) || die 1 "main.py exited with status $status; see $log_file (no summary written)"
    "$PYTHON" -m utils.modelzoo report --results "$results_file" --out-dir "$out_dir" "${modelzoo_case[@]}" \
        --e2e-time $(( $(date +%s) - start_time )) || exit 1
    [[ -d $run_dir ]] && echo "Run dir (checkpoints, summary.csv): $run_dir"  # evaluation writes no run dir
    return 0
}

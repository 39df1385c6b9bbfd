# Shared part of the ModelZoo launch scripts in test/ (sourced by them, never run on its own).
#
# A launch script sets the defaults that differ between scripts (epochs, ...) and calls
#   launch <1p|8p> <perf|acc|eval> "$@"
# which reads the script's own options, recreates test/output/<device id>/, falls back to the demo
# dataset when --data_path is absent, runs main.py (tools/torchrun.py for 8p) into train_<device id>.log,
# and has utils/modelzoo.py print the "Final result" block and write the summary <CaseName>.log and the
# loss file from main.py's results file. main.py checks every option it takes (data, weights, values).

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
extra_args=()             # main.py options passed through unchanged
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

die() { echo "error: $2" >&2; exit "$1"; }  # die <exit code> <message>

usage() {
    cat <<EOF
usage: bash test/$(basename "$0") [--data_path=DIR] [--pth_path=FILE|DIR] [--device=auto|npu|cuda|cpu]
       [--device_id=N (1p)] [--nproc=N --nnodes=N --node_rank=N --master_addr=HOST --master_port=N (8p)]
       [--workers=N] [--no-amp] [any main.py option, e.g. --model=van_b0 --batch-size=32 --img-size=64]
  Options take --name=value or --name value. Positional DIR [FILE] are --data_path [--pth_path].
  Without --data_path the demo dataset (scikit-learn digits, data/demo) is created and used.
EOF
}

_abspath() { case $1 in /*|'') printf '%s\n' "$1" ;; *) printf '%s\n' "$CALLER_PWD/$1" ;; esac; }
_int() { [[ $2 =~ ^[0-9]+$ ]] && (( $2 >= $3 )) || die 2 "$1 must be an integer >= $3, got '$2'"; }

# The options the script itself uses, and the variable each sets; all others go to main.py unchanged.
declare -A SCRIPT_OPTIONS=(
    [--data_path]=data_path [--data-path]=data_path [--pth_path]=pth_path [--pth-path]=pth_path
    [--ckpt_path]=pth_path [--pretrained]=pth_path [--device]=device [--device_id]=device_id [--device-id]=device_id
    [--model]=model [--batch-size]=batch_size [--batch_size]=batch_size [-b]=batch_size [--epochs]=epochs
    [--cooldown-epochs]=cooldown_epochs [--output]=output_root [--experiment]=experiment
    [--nproc]=nproc [--nproc_per_node]=nproc [--nnodes]=nnodes [--node_rank]=node_rank [--node-rank]=node_rank
    [--master_addr]=master_addr [--master-addr]=master_addr [--master_port]=master_port [--master-port]=master_port)
MULTI_NODE_VARIABLES=" nproc nnodes node_rank master_addr master_port "  # 8p only

# parse_args <1p|8p> <perf|acc|eval> [script arguments...]: sets the variables above; the other options go
# to extra_args with every bare word after them (some take several values, e.g. --scale 0.5 1).
parse_args() {
    launch_mode=$1 run_kind=$2
    shift 2
    local positional=() multi_opts=() seen_option=0 arg name value has_value variable
    while (( $# )); do
        arg=$1
        shift
        case $arg in
            -h|--help) usage; exit 0 ;;
            --*=*) name=${arg%%=*} value=${arg#*=} has_value=1 ;;
            -b?*) name=-b value=${arg:2} has_value=1 ;;   # -b32
            -*) name=$arg value="" has_value=0 ;;
            *) (( seen_option )) && die 2 "unexpected argument '$arg': positional DIR [FILE] must come before options (see --help)"
               positional+=("$arg"); continue ;;
        esac
        seen_option=1
        variable=${SCRIPT_OPTIONS[$name]:-}
        case $name in
            --amp|--no-amp) (( has_value )) && die 2 "$name takes no value (--amp or --no-amp turns AMP on or off)"
                            amp=$([[ $name == --amp ]] && echo 1 || echo 0); continue ;;
            --eval) die 2 "--eval is chosen by the script: use train_eval_1p.sh / train_eval_8p.sh" ;;
        esac
        if [[ -z $variable ]]; then
            extra_args+=("$arg")
            (( has_value )) || while (( $# )) && [[ $1 != -* ]]; do extra_args+=("$1"); shift; done
            continue
        fi
        if (( ! has_value )); then  # the value is the next word
            (( $# )) && [[ -n $1 && $1 != -* ]] || die 2 "$name needs a value"
            value=$1
            shift
        fi
        [[ -n $value ]] || die 2 "$name= is empty; give a value or leave the option out"
        printf -v "$variable" '%s' "$value"
        [[ $MULTI_NODE_VARIABLES == *" $variable "* ]] && multi_opts+=("$name")
    done
    (( ${#positional[@]} <= 2 )) || die 2 "too many positional arguments: ${positional[*]} (expected DIR [FILE])"
    data_path=$(_abspath "${positional[0]:-$data_path}") pth_path=$(_abspath "${positional[1]:-$pth_path}")
    output_root=$(_abspath "$output_root")
    if [[ $launch_mode == 1p ]]; then
        (( ${#multi_opts[@]} == 0 )) || die 2 "${multi_opts[0]} is for the 8p scripts; this 1p script runs one process"
        device_id=${device_id:-${ASCEND_DEVICE_ID:-}}
        [[ -z $device_id ]] || _int --device_id "$device_id" 0
        rank_size=1
    else
        [[ -z $device_id ]] || die 2 "--device_id is for the 1p scripts; 8p runs use local ranks 0..nproc-1"
        _int --nproc "$nproc" 1; _int --nnodes "$nnodes" 1; _int --node_rank "$node_rank" 0; _int --master_port "$master_port" 1
        (( node_rank < nnodes )) || die 2 "--node_rank=$node_rank must be below --nnodes=$nnodes"
        (( nnodes == 1 )) || [[ -n $master_addr ]] || die 2 "--nnodes=$nnodes needs --master_addr=<address of node 0>"
        rank_size=$(( nproc * nnodes ))
    fi
    # The launcher's own interface: a finetune or an evaluation starts from the weights it is given.
    [[ -n $pth_path ]] || ! { [[ $run_kind == eval ]] || (( ${pth_required:-0} )); } \
        || die 2 "--pth_path=FILE is required: the checkpoint to $([[ $run_kind == eval ]] && echo evaluate || echo start from)"
    [[ -n $PYTHON ]] || die 1 "no python on PATH; activate the environment from README.md (pip install -r requirements.txt -r requirements-dev.txt)"
    modelzoo_case=(--network "$Network" --batch-size "$batch_size" --rank-size "$rank_size" --kind "$run_kind")
    CaseName=$("$PYTHON" -m utils.modelzoo case-name "${modelzoo_case[@]}") || die 1 "cannot run $PYTHON -m utils.modelzoo"
}

# Recreates test/output/<id>/ and makes sure there is data to train on.
prepare_run() {
    ASCEND_DEVICE_ID=${device_id:-0}
    export ASCEND_DEVICE_ID
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
    parse_args "$@"
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

# Shared part of the ModelZoo launch scripts in test/ (sourced by them, never run on its own).
#
# A launch script sets the defaults that differ between scripts (epochs, ...) and calls
#   launch <1p|8p> <perf|acc|eval> "$@"
# which parses the arguments, goes to the repo root, recreates test/output/<device id>/, falls back
# to the demo dataset when --data_path is absent, runs main.py (torchrun for 8p) into
# train_<device id>.log, then prints the "Final result" block and writes the summary
# <CaseName>.log and the loss file train_<CaseName>_loss.txt that ModelZoo automation reads.
# The parse_* functions take a log path so tests can run them on sample logs.

TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$TEST_DIR")
# Paths the user types are relative to where the script was called from (repo root or test/).
CALLER_PWD=$PWD
cd "$REPO_ROOT" || exit 1

# The VAN port's defaults (Ascend ModelZoo); every one can be overridden on the command line.
# The learning rate and drop path come from main.py's recipe: lr 1e-3 per global batch of 1024
# (scaled to batch size x processes), drop path per variant (0.1 for van_base); a given --lr= or
# --drop-path= passes through.
Network="VAN_Classification"
model="van_base"
batch_size=128            # per device
amp=1
epochs=1                  # the scripts set their own
cooldown_epochs=""        # empty: main.py's default (10 epochs at min lr after the cosine)
device="auto"
device_id=""              # 1p only; empty: ASCEND_DEVICE_ID from the environment, else 0
workers=""                # empty: main.py's default
nproc=8                   # 8p only: processes per node
nnodes=1
node_rank=0
master_addr=""
master_port="${MASTER_PORT:-29500}"
data_path=""
pth_path=""
output_root=""            # empty: <repo>/output/train
experiment=""             # empty: <CaseName>-<date>
extra_args=()             # main.py options passed through unchanged
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

die() {  # die <exit code> <message>: one clear line on stderr, no traceback
    echo "error: $2" >&2
    exit "$1"
}

usage() {
    cat <<EOF
usage: bash test/$(basename "$0") [--data_path=DIR] [--pth_path=FILE] [--device=auto|npu|cuda|cpu]
       [--device_id=N (1p)] [--nproc=N --nnodes=N --node_rank=N --master_addr=HOST --master_port=N (8p)]
       [--workers=N] [--no-amp] [any main.py option, e.g. --model=van_b0 --batch-size=32 --img-size=64]
  Options take --name=value or --name value. Positional DIR [FILE] are --data_path [--pth_path].
  Without --data_path the demo dataset (scikit-learn digits, data/demo) is created and used.
EOF
}

_abspath() {  # a path the user typed, made absolute against the caller's directory
    case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$CALLER_PWD/$1" ;; esac
}

_require_int() {  # _require_int <option> <value> <minimum>
    [[ $2 =~ ^[0-9]+$ ]] && (( $2 >= $3 )) || die 2 "$1 must be an integer >= $3, got '$2'"
}

# _take_value "$@": an option given without '=' takes the next word as its value; returns 0 when it
# did (the caller then shifts). Works on parse_args' locals name/value/has_value.
_take_value() {
    if (( has_value )); then
        [[ -n $value ]] || die 2 "$name= is empty; give a value or leave the option out"
        return 1
    fi
    (( $# )) && [[ -n $1 && $1 != -* ]] || die 2 "$name needs a value"
    value=$1 has_value=1
}

# parse_args <1p|8p> <perf|acc|eval> [script arguments...]
# Sets the variables above; unknown options go to extra_args for main.py.
parse_args() {
    launch_mode=$1 run_kind=$2
    shift 2
    local positional=() seen_option=0 arg name value has_value
    multi_opts=()
    while (( $# )); do
        arg=$1
        shift
        case $arg in
            -h|--help) usage; exit 0 ;;
            --*=*) name=${arg%%=*} value=${arg#*=} has_value=1 ;;
            -[bj]?*) name=${arg:0:2} value=${arg:2} has_value=1 ;;   # -b32, -j4
            -*) name=$arg value="" has_value=0 ;;
            *)
                (( seen_option )) && die 2 "unexpected argument '$arg': positional DIR [FILE] must come before options (see --help)"
                positional+=("$arg")
                continue ;;
        esac
        seen_option=1
        case $name in
            --data_path|--data-path) _take_value "$@" && shift; data_path=$value ;;
            --pth_path|--pth-path|--ckpt_path|--pretrained) _take_value "$@" && shift; pth_path=$value ;;
            --device) _take_value "$@" && shift; device=$value ;;
            --device_id|--device-id) _take_value "$@" && shift; device_id=$value ;;
            --workers|-j) _take_value "$@" && shift; workers=$value ;;
            --nproc|--nproc_per_node) _take_value "$@" && shift; nproc=$value; multi_opts+=("$name") ;;
            --nnodes) _take_value "$@" && shift; nnodes=$value; multi_opts+=("$name") ;;
            --node_rank|--node-rank) _take_value "$@" && shift; node_rank=$value; multi_opts+=("$name") ;;
            --master_addr|--master-addr) _take_value "$@" && shift; master_addr=$value; multi_opts+=("$name") ;;
            --master_port|--master-port) _take_value "$@" && shift; master_port=$value; multi_opts+=("$name") ;;
            --model) _take_value "$@" && shift; model=$value ;;
            --batch-size|--batch_size|-b) _take_value "$@" && shift; batch_size=$value ;;
            --epochs) _take_value "$@" && shift; epochs=$value ;;
            --cooldown-epochs) _take_value "$@" && shift; cooldown_epochs=$value ;;
            --output) _take_value "$@" && shift; output_root=$value ;;
            --experiment) _take_value "$@" && shift; experiment=$value ;;
            --amp) (( has_value )) && die 2 "--amp takes no value (use --no-amp to turn AMP off)"; amp=1 ;;
            --no-amp) (( has_value )) && die 2 "--no-amp takes no value"; amp=0 ;;
            --eval) die 2 "--eval is chosen by the script: use train_eval_1p.sh / train_eval_8p.sh" ;;
            *)
                # Unknown to the script: main.py's. Every bare word up to the next option is its
                # value (some take several, e.g. --scale 0.5 1).
                if (( has_value )); then
                    extra_args+=("$name=$value")
                else
                    extra_args+=("$name")
                    while (( $# )) && [[ $1 != -* ]]; do
                        extra_args+=("$1")
                        shift
                    done
                fi ;;
        esac
    done
    (( ${#positional[@]} <= 2 )) || die 2 "too many positional arguments: ${positional[*]} (expected DIR [FILE])"
    [[ -n ${positional[0]:-} ]] && data_path=${positional[0]}
    [[ -n ${positional[1]:-} ]] && pth_path=${positional[1]}
    _check_args
    return 0
}

_check_args() {
    case $device in auto|npu|cuda|cpu) ;; *) die 2 "--device must be auto, npu, cuda or cpu, got '$device'" ;; esac
    _require_int --batch-size "$batch_size" 1
    _require_int --epochs "$epochs" 1
    [[ -z $cooldown_epochs ]] || _require_int --cooldown-epochs "$cooldown_epochs" 0
    [[ -z $workers ]] || _require_int --workers "$workers" 0
    if [[ $launch_mode == 1p ]]; then
        (( ${#multi_opts[@]} == 0 )) || die 2 "${multi_opts[0]} is for the 8p scripts; this 1p script runs one process"
        device_id=${device_id:-${ASCEND_DEVICE_ID:-}}
        [[ -z $device_id ]] || _require_int --device_id "$device_id" 0
        rank_size=1
    else
        [[ -z $device_id ]] || die 2 "--device_id is for the 1p scripts; 8p runs use local ranks 0..nproc-1"
        _require_int --nproc "$nproc" 1
        _require_int --nnodes "$nnodes" 1
        _require_int --node_rank "$node_rank" 0
        _require_int --master_port "$master_port" 1
        (( node_rank < nnodes )) || die 2 "--node_rank=$node_rank must be below --nnodes=$nnodes"
        (( nnodes == 1 )) || [[ -n $master_addr ]] || die 2 "--nnodes=$nnodes needs --master_addr=<address of node 0>"
        rank_size=$(( nproc * nnodes ))
    fi
    if [[ -n $data_path ]]; then
        data_path=$(_abspath "$data_path")
        [[ -d $data_path ]] || die 2 "--data_path=$data_path is not a directory; give the dataset root holding train/ and val/ (ImageFolder: <root>/train/<class>/<image>), or leave it out to use the demo dataset"
        local split
        for split in $([[ $run_kind == eval ]] && echo val || echo "train val"); do
            [[ -d $data_path/$split ]] || die 2 "--data_path=$data_path has no $split/ folder; expected the ImageFolder layout <root>/train/<class>/<image> and <root>/val/<class>/<image>"
        done
    fi
    if [[ -z $pth_path ]] && { [[ $run_kind == eval ]] || (( ${pth_required:-0} )); }; then
        die 2 "--pth_path=FILE is required: the checkpoint to $([[ $run_kind == eval ]] && echo evaluate || echo start from)"
    fi
    if [[ -n $pth_path ]]; then
        pth_path=$(_abspath "$pth_path")
        [[ -f $pth_path ]] || die 2 "--pth_path=$pth_path is not a file; give a checkpoint (.pth/.pth.tar/.safetensors)"
    fi
    [[ -z $output_root ]] || output_root=$(_abspath "$output_root")
    if [[ $run_kind == perf ]]; then
        case_suffix=perf
    else
        case_suffix=acc
    fi
    CaseName="${Network}_bs${batch_size}_${rank_size}p_${case_suffix}"
}

# Recreates test/output/<id>/ and makes sure there is data to train on.
prepare_run() {
    ASCEND_DEVICE_ID=${device_id:-0}
    export ASCEND_DEVICE_ID
    if [[ -n $device_id ]]; then
        # Pin the 1p run to one physical device; main.py then sees it as device 0.
        export ASCEND_RT_VISIBLE_DEVICES=$device_id CUDA_VISIBLE_DEVICES=$device_id
    fi
    [[ ${etp_running_flag:-} == true ]] || source "$TEST_DIR/env_npu.sh"
    out_dir="$TEST_DIR/output/$ASCEND_DEVICE_ID"
    rm -rf "$out_dir"
    mkdir -p "$out_dir" || die 1 "cannot create $out_dir"
    log_file="$out_dir/train_${ASCEND_DEVICE_ID}.log"
    [[ -n $PYTHON ]] || die 1 "no python on PATH; activate the environment from README.md (pip install -r requirements.txt -r requirements-dev.txt)"
    if [[ -z $data_path ]]; then
        data_path="$REPO_ROOT/data/demo"
        echo "No --data_path given: using the demo dataset (scikit-learn digits, 10 classes) at $data_path"
        "$PYTHON" tools/make_demo_data.py --out "$data_path" || die 1 "could not create the demo dataset (is scikit-learn installed? see README.md)"
    fi
    output_root=${output_root:-$REPO_ROOT/output/train}
    experiment=${experiment:-${CaseName}-$(date +%Y%m%d-%H%M%S)}
    run_dir="$output_root/$experiment"
}

# Fills the array main_cmd with the full command line (torchrun for 8p).
build_command() {
    main_cmd=("$PYTHON")
    if [[ $launch_mode == 8p ]]; then
        # torchrun itself, reporting a stop or a failed worker in one line instead of a traceback
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
    [[ -n $workers ]] && main_cmd+=(-j "$workers")
    case $run_kind in
        eval) main_cmd+=(--eval --pretrained "$pth_path") ;;
        *) [[ -n $pth_path ]] && main_cmd+=(--pretrained "$pth_path") ;;
    esac
    main_cmd+=("${extra_args[@]}")
}

# --- log parsing: each takes the log path and prints one value (nothing when absent) ---
parse_fps() {          # last "Epoch N FPS:x" line (global images/s)
    grep -a 'FPS:' "$1" | awk -F 'FPS:' 'END {if (NR) print $2}' | awk '{print $1}'
}

parse_losses() {       # the current loss of every "Train:" line, one per line
    grep -a 'Train: ' "$1" | grep -a 'Loss: ' | awk -F 'Loss: ' '{print $2}' | awk '{print $1}'
}

parse_best_top1() {    # "*** Best metric: 83.500 (epoch 3)"
    grep -a '\*\*\* Best metric:' "$1" | awk -F 'Best metric:' 'END {if (NR) print $2}' | awk '{print $1}'
}

parse_eval_top1() {    # last "* Acc@1 83.500 Acc@5 98.900 Loss 0.610 (images N)"
    grep -a '\* Acc@1 ' "$1" | awk -F '[*] Acc@1 ' 'END {if (NR) print $2}' | awk '{print $1}'
}

parse_eval_loss() {
    grep -a '\* Acc@1 ' "$1" | awk -F ' Loss ' 'END {if (NR) print $2}' | awk '{print $1}'
}

step_time_ms() {       # step_time_ms <batch per device> <rank size> <global FPS>
    awk -v b="$1" -v r="$2" -v f="$3" 'BEGIN {printf "%.2f\n", b * r * 1000 / f}'
}

# write_summary <file> <key> <value> [<key> <value> ...]: "key = value" lines in the given order.
write_summary() {
    local file=$1
    shift
    : > "$file"
    while (( $# >= 2 )); do
        echo "$1 = $2" >> "$file"
        shift 2
    done
}

# Reads the finished log, prints the Final result block, writes the summary and loss files.
report() {
    local e2e_time=$1 fps="" accuracy="" loss training_time
    local summary="$out_dir/${CaseName}.log" loss_file="$out_dir/train_${CaseName}_loss.txt"
    if [[ $run_kind == eval ]]; then
        accuracy=$(parse_eval_top1 "$log_file")
        loss=$(parse_eval_loss "$log_file")
        [[ -n $accuracy ]] || die 1 "no '* Acc@1' line in $log_file: the evaluation did not finish"
    else
        fps=$(parse_fps "$log_file")
        [[ -n $fps ]] || die 1 "no 'FPS:' line in $log_file: training did not finish an epoch"
        parse_losses "$log_file" > "$loss_file"
        loss=$(tail -n 1 "$loss_file")
        training_time=$(step_time_ms "$batch_size" "$rank_size" "$fps")
        if [[ $run_kind == acc ]]; then
            accuracy=$(parse_best_top1 "$log_file")
            [[ -n $accuracy ]] || die 1 "no '*** Best metric' line in $log_file: validation did not run"
        fi
    fi
    echo "------------------ Final result ------------------"
    [[ -n $fps ]] && echo "Final Performance images/sec : $fps"
    [[ -n $accuracy ]] && echo "Final Train Accuracy : $accuracy"
    echo "E2E Training Duration sec : $e2e_time"

    local fields=(Network "$Network" RankSize "$rank_size" BatchSize "$batch_size"
                  DeviceType "$(uname -m)" CaseName "$CaseName")
    [[ -n $fps ]] && fields+=(ActualFPS "$fps" TrainingTime "$training_time")
    [[ -n $accuracy ]] && fields+=(TrainAccuracy "$accuracy")
    fields+=(ActualLoss "$loss" E2ETrainingTime "$e2e_time")
    write_summary "$summary" "${fields[@]}"
    echo "Summary: $summary"
    # Evaluation writes no run dir.
    [[ -d $run_dir ]] && echo "Run dir (checkpoints, summary.csv): $run_dir"
    return 0
}

_resume_hint() {
    if [[ $run_kind == eval ]]; then
        echo "(main.py exit status $status); see $log_file"
    else
        echo "(main.py exit status $status); $run_dir keeps the point where it stopped: run this script again with the same arguments plus --experiment=$experiment --resume auto to continue (log: $log_file)"
    fi
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
    [[ -n $stop_signal ]] && die "$(( $(kill -l "$stop_signal") + 128 ))" "stopped by $stop_signal $(_resume_hint)"
    (( status == 0 )) || die 1 "main.py exited with status $status; see $log_file (no summary written)"
    report $(( $(date +%s) - start_time ))
}

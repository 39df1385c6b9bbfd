# NPU runtime environment for the launch scripts (sourced unless etp_running_flag=true).
#
# On an Ascend machine it sources the CANN toolkit's set_env.sh and sets the runtime switches the
# VAN port used. On a machine without CANN it only says so: nothing here may stop a CPU or GPU run.
# Every setting below is a default: a value already in the caller's environment is kept.

# The installer records its prefix as "Install_Path=<dir>": /etc/Ascend for a root install,
# $HOME/Ascend for a user install (CANN installation guide, "File Paths").
_cann_root=/usr/local/Ascend
for _cann_info in /etc/Ascend/ascend_cann_install.info "${HOME:-}/Ascend/ascend_cann_install.info"; do
    if [[ -f $_cann_info ]]; then
        _cann_root=$(grep -m1 '^Install_Path=' "$_cann_info" | cut -d= -f2-)
        _cann_root=${_cann_root:-/usr/local/Ascend}
        break
    fi
done
_cann_env=""
# CANN >= 8.5 installs into <root>/cann/ (torch_npu install guide: "source /usr/local/Ascend/cann/set_env.sh");
# older releases into ascend-toolkit/ or nnae/; an Install_Path may also name the toolkit folder itself.
for _candidate in "$_cann_root/cann/set_env.sh" "$_cann_root/ascend-toolkit/set_env.sh" \
                  "$_cann_root/nnae/set_env.sh" "$_cann_root/set_env.sh"; do
    if [[ -f $_candidate ]]; then
        _cann_env=$_candidate
        break
    fi
done

if [[ -n $_cann_env ]]; then
    echo "env_npu.sh: CANN from $_cann_env"
    source "$_cann_env"
    # Host-side task queue: overlaps operator dispatch with device execution. Level 2 also moves the
    # workspace work to the second stage; torch_npu's docs recommend it (default 1).
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
    # Fine-grained core binding (torch_npu docs, CPU_AFFINITY_CONF): each rank's threads stay on its own
    # NPU's share of the cores, main and task-queue threads each on a fixed core, data-loader workers on
    # the rest. This is the 8p scripts' per-rank binding (ModelZoo scripts used taskset for it); no
    # taskset here, since torch_npu skips its binding in a process that already has an affinity.
    export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-2}
    # HCCL would otherwise reject ranks whose addresses are not in a whitelist file.
    export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
    # Device logs to files, errors only: printing them to stdout slows training and floods the log.
    export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
    export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
    export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
    export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
else
    echo "env_npu.sh: no CANN toolkit under $_cann_root; NPU settings skipped (CPU/GPU runs are unaffected)"
    # A torch_npu wheel installed without CANN fails on "import torch" (missing libhccl.so) through
    # torch's device-backend autoload; switching autoload off keeps torch importable.
    export TORCH_DEVICE_BACKEND_AUTOLOAD=${TORCH_DEVICE_BACKEND_AUTOLOAD:-0}
fi

# Many dataloader workers and 8 ranks open more files than the usual default of 1024.
ulimit -n 65535 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
unset _cann_info _cann_root _cann_env _candidate

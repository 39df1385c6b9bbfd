# NPU runtime environment for the launch scripts (sourced unless etp_running_flag=true).
#
# On an Ascend machine it sources the CANN toolkit's set_env.sh and sets the runtime switches the
# VAN port used. On a machine without CANN it only says so: nothing here may stop a CPU or GPU run.

_cann_info=/etc/Ascend/ascend_cann_install.info
_cann_root=/usr/local/Ascend
if [[ -f $_cann_info ]]; then
    # The installer records its prefix as "Install_Path=<dir>".
    _cann_root=$(grep -m1 '^Install_Path=' "$_cann_info" | cut -d= -f2-)
    _cann_root=${_cann_root:-/usr/local/Ascend}
fi
_cann_env=""
for _candidate in "$_cann_root/ascend-toolkit/set_env.sh" "$_cann_root/nnae/set_env.sh" "$_cann_root/set_env.sh"; do
    if [[ -f $_candidate ]]; then
        _cann_env=$_candidate
        break
    fi
done

if [[ -n $_cann_env ]]; then
    source "$_cann_env"
    # Host-side task queue: overlaps operator dispatch with device execution.
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
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

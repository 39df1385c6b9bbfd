"""Device resolution and process-group setup (the CPU parts this machine can check)."""
import datetime
import sys

import pytest
import torch

from models import compat
from processes import Watched
from utils import device as device_module
from utils.device import setup_device, resolve_device_type
from utils.errors import DeviceError


def test_cpu_and_cuda_never_import_torch_npu(monkeypatch):
    def fail():
        raise AssertionError('torch_npu probed although not asked for')
    monkeypatch.setattr(device_module, '_npu_available', fail)
    assert resolve_device_type('cpu') == 'cpu'
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match='no CUDA'):
            resolve_device_type('cuda')


def test_auto_prefers_npu_then_cuda_then_cpu(monkeypatch):
    monkeypatch.setattr(device_module, '_npu_available', lambda: True)
    assert resolve_device_type('auto') == 'npu'
    monkeypatch.setattr(device_module, '_npu_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert resolve_device_type('auto') == 'cuda'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device_type('auto') == 'cpu'


def test_absent_npu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(device_module, '_npu_available', lambda: False)
    with pytest.raises(DeviceError, match='--device npu'):
        resolve_device_type('npu')


def test_single_process_returns_a_cpu_device_without_a_process_group(monkeypatch):
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    env = setup_device('cpu')
    assert env.device == torch.device('cpu') and env.world_size == 1 and env.is_main and not env.distributed
    assert not torch.distributed.is_initialized()


def test_rank_from_torchrun_env_or_launch_flag(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '16')
    monkeypatch.setenv('RANK', '9')
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert device_module._rank_env(-1) == (9, 16, 1)  # torchrun, second node
    monkeypatch.delenv('LOCAL_RANK')
    monkeypatch.delenv('RANK')
    assert device_module._rank_env(3) == (3, 16, 3)  # torch.distributed.launch --local_rank=3


def test_backend_follows_the_device():
    assert device_module.BACKEND_BY_DEVICE == {'npu': 'hccl', 'cuda': 'nccl', 'cpu': 'gloo'}


def _torchrun_env(monkeypatch, port, restart_count, nodes='1'):
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'True')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', str(restart_count))
    monkeypatch.setenv('GROUP_WORLD_SIZE', nodes)
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(port))


def test_each_torchrun_restart_joins_through_its_own_keys(monkeypatch):
    timeout = datetime.timedelta(seconds=10)
    # Stands in for the store torchrun's agent keeps for the whole job.
    agent_store = torch.distributed.TCPStore('127.0.0.1', 0, 1, True, timeout=timeout)
    _torchrun_env(monkeypatch, agent_store.port, restart_count=0)
    first = device_module._restart_store(2, timeout)
    first.set('rank_0', 'address of a process that is dead now')
    _torchrun_env(monkeypatch, agent_store.port, restart_count=1)
    second = device_module._restart_store(2, timeout)
    with pytest.raises(RuntimeError, match='(?i)timeout'):  # the restarted group cannot read the old group's addresses
        second.wait(['rank_0'], datetime.timedelta(milliseconds=300))
    second.set('rank_0', 'new address')
    assert first.get('rank_0') == b'address of a process that is dead now'


def test_plain_launches_and_several_nodes_keep_the_env_rendezvous(monkeypatch):
    _torchrun_env(monkeypatch, 1, restart_count=0, nodes='2')  # agents count restarts apart
    assert device_module._restart_store(2, None) is None
    monkeypatch.delenv('TORCHELASTIC_USE_AGENT_STORE')  # torch.distributed.launch, or sharing disabled
    monkeypatch.setenv('GROUP_WORLD_SIZE', '1')
    assert device_module._restart_store(2, None) is None


def test_the_device_table_keeps_cpu_and_gpu_choices():
    kinds = device_module.DEVICE_KINDS
    assert set(kinds) == {'npu', 'cuda', 'cpu'}
    assert (kinds['cpu'].amp_dtype, kinds['cuda'].amp_dtype, kinds['npu'].amp_dtype) == \
        (torch.bfloat16, torch.float16, torch.float16)
    if not compat.cpu_float16_reason():  # a CPU loss scaler exists (torch >= 2.3)
        assert type(kinds['cuda'].grad_scaler('cpu', 128.0)) is torch.amp.GradScaler
    assert kinds['cuda'].fused_adamw['native'] == device_module.TORCH_FUSED and not kinds['cpu'].fused_adamw
    assert not kinds['cpu'].pin_memory and not kinds['cuda'].pin_memory
    assert torch.float64 not in kinds['npu'].reducible_dtypes  # ProcessGroupHCCL.cpp checkSupportedDataType


# --- is_peer_failure: only errors that say another process was lost -------------------------------

@pytest.mark.parametrize('message', [
    # gloo (context signalException, as DDP's buffer sync raises it) when the other process hangs
    'Application timeout caused pair closure',
    '[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:4242: Connection reset by peer',
    '[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation',
    'Socket Timeout',  # the store (TCPStore.get/wait) waiting for a peer, torch < 2.2
    '[Rank 3] Watchdog caught collective operation timeout: WorkHCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600000 ms',
])
def test_lost_peers_are_recognised(hccl, message):
    assert device_module.is_peer_failure(RuntimeError(message))


@pytest.mark.parametrize('message', [
    'HCCL allreduce: Unsupported data type fp64',  # a bug of this process, not a lost peer
    'HCCL function error: HcclAllReduce(...), error code is 4',
    'NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage',
    'gloo: unsupported tensor type',
])
def test_backend_errors_that_are_not_peer_loss_stay_tracebacks(hccl, message):
    assert not device_module.is_peer_failure(RuntimeError(message))


def test_without_a_process_group_nothing_is_a_peer_failure():
    assert not device_module.is_peer_failure(RuntimeError('Connection reset by peer'))


# --- --device auto where CANN is set up -------------------------------------------------------------

@pytest.fixture
def broken_torch_npu(tmp_path, monkeypatch):
    """An installed torch_npu whose import fails as without the CANN libraries."""
    package = tmp_path / 'site' / 'torch_npu'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text(
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    import importlib
    importlib.invalidate_caches()
    for name in ('ASCEND_HOME_PATH', 'ASCEND_TOOLKIT_HOME', 'ASCEND_OPP_PATH'):
        monkeypatch.delenv(name, raising=False)


def test_auto_with_cann_set_up_reports_why_torch_npu_does_not_import(broken_torch_npu, monkeypatch):
    monkeypatch.setenv('ASCEND_HOME_PATH', '/usr/local/Ascend/cann')
    for requested in ('auto', 'npu'):
        with pytest.raises(DeviceError, match=r'CANN is set up \(ASCEND_HOME_PATH=/usr/local/Ascend/cann\) but '
                                              r'torch_npu cannot be imported: ImportError: libhccl.so'):
            resolve_device_type(requested)
    assert resolve_device_type('cpu') == 'cpu'  # asking for another device still works


def test_auto_with_cann_set_up_but_no_torch_npu_says_so(monkeypatch):
    monkeypatch.setattr(device_module.importlib.util, 'find_spec', lambda name: None)
    monkeypatch.setenv('ASCEND_OPP_PATH', '/usr/local/Ascend/cann/opp')
    with pytest.raises(DeviceError, match='CANN is set up .* but torch_npu is not installed'):
        resolve_device_type('auto')


def test_auto_without_cann_quietly_skips_a_torch_npu_that_cannot_import(broken_torch_npu, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device_type('auto') == 'cpu'


def test_a_device_named_by_a_tool_is_resolved_by_the_same_rules(monkeypatch):
    from utils.device import resolve_device
    monkeypatch.setattr(device_module, '_npu_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('auto') == torch.device('cpu') and resolve_device('cpu') == torch.device('cpu')
    with pytest.raises(DeviceError, match='no CUDA GPU'):
        resolve_device('cuda:1')
    with pytest.raises(DeviceError, match='no NPU is usable'):
        resolve_device('npu')
    for name in ('gpu7', 'auto:0'):
        with pytest.raises(DeviceError, match='use auto, cpu, cuda'):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('auto') == torch.device('cuda') and resolve_device('cuda:1') == torch.device('cuda', 1)
    with pytest.raises(DeviceError, match='this machine has 2 cuda device'):
        resolve_device('cuda:2')


# --- leaving the process group ------------------------------------------------------------------------

_JOIN_REDUCE_LEAVE = '''
import datetime, sys
import torch, torch.distributed as dist
from utils.device import cleanup_distributed
rank, rounds, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for attempt in range(rounds):
    dist.init_process_group('gloo', init_method=f'file://{folder}/group{attempt}', rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    for _ in range(3):
        dist.all_reduce(torch.ones(4))  # dropped at once, while gloo's thread may still hold it
    cleanup_distributed()
print(f'left {rounds} groups', flush=True)
'''


@pytest.mark.slow
def test_leaving_the_process_group_right_after_a_collective_never_hangs(tmp_path, subprocess_env, repo_root):
    # On torch < 2.8 destroy_process_group() alone deadlocks here in most rounds (compat.destroy_process_group).
    rounds = 20
    ranks = [Watched([sys.executable, '-c', _JOIN_REDUCE_LEAVE, rank, rounds, tmp_path], deadline_s=60,
                     cwd=repo_root, env=subprocess_env) for rank in (0, 1)]
    with ranks[0], ranks[1]:
        for rank in ranks:
            assert rank.finish() == 0, rank.output
            assert f'left {rounds} groups' in rank.output

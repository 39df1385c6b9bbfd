"""Device resolution and process-group setup (the CPU parts this machine can check)."""
import pytest
import torch

from utils import device as device_module
from utils.device import DeviceError, init_distributed_device, resolve_device_type


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
    env = init_distributed_device('cpu')
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
    import datetime
    timeout = datetime.timedelta(seconds=10)
    # Stands in for the store torchrun's agent keeps for the whole job.
    agent_store = torch.distributed.TCPStore('127.0.0.1', 0, 1, True, timeout=timeout)
    _torchrun_env(monkeypatch, agent_store.port, restart_count=0)
    first = device_module._restart_store(2, timeout)
    first.set('rank_0', 'address of a process that is dead now')
    _torchrun_env(monkeypatch, agent_store.port, restart_count=1)
    second = device_module._restart_store(2, timeout)
    assert not second.check(['rank_0'])  # the restarted group cannot read the old group's addresses
    second.set('rank_0', 'new address')
    assert first.get('rank_0') == b'address of a process that is dead now'


def test_plain_launches_and_several_nodes_keep_the_env_rendezvous(monkeypatch):
    _torchrun_env(monkeypatch, 1, restart_count=0, nodes='2')  # agents count restarts apart
    assert device_module._restart_store(2, None) is None
    monkeypatch.delenv('TORCHELASTIC_USE_AGENT_STORE')  # torch.distributed.launch, or sharing disabled
    monkeypatch.setenv('GROUP_WORLD_SIZE', '1')
    assert device_module._restart_store(2, None) is None

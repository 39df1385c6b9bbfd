"""Safe loading reads every checkpoint format users bring and refuses code, with the same messages on every
supported torch (models/safe_pickle.py through models.weights.safe_load)."""
import argparse
import ast
import collections
import copyreg
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

from models import compat, safe_pickle
from models.weights import UnsafeFileError, safe_load

REFUSAL = re.compile(r"refusing to read \S+: it contains objects of (\S+), and unpickling those could run "
                     r"arbitrary code\. Re-save only the tensors")
REPO = Path(__file__).resolve().parents[2]


def _same(a, b):
    """Equal values of equal types, all the way down (tensors: dtype, shape, class and values)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and \
            a.requires_grad == b.requires_grad and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a) and \
            _same(getattr(a, '_metadata', None), getattr(b, '_metadata', None))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, argparse.Namespace):
        return type(b) is argparse.Namespace and _same(vars(a), vars(b))
    return type(a) is type(b) and a == b


def test_official_release_file_reads_as_torch_reads_it(reference_fixtures):
    path = reference_fixtures / 'van_b0_ref_10cls.pth.tar'
    loaded = safe_load(path)
    assert _same(loaded, torch.load(path, map_location='cpu', weights_only=False))
    assert loaded['arch'] == 'van_b0' and len(loaded['state_dict']) > 100


def _port_checkpoint():
    """The reference's and the Ascend port's training checkpoint: timm-style, with 'args' a Namespace."""
    weights = collections.OrderedDict(w=torch.randn(3, 2), b=torch.zeros(3, dtype=torch.bfloat16),
                                      steps=torch.tensor(7), mask=torch.tensor([True, False]))
    weights._metadata = collections.OrderedDict({'': {'version': 1}})
    args = argparse.Namespace(model='van_b0', lr=1e-3, mean=(0.485, 0.456, 0.406), device='npu:0', amp=True,
                              opt_betas=None, sched='cosine', lr_noise=[0.1, 0.2], seed=42)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))], lr=1e-3)
    optimizer.param_groups[0]['params'][0].grad = torch.ones(2)
    optimizer.step()
    return {'epoch': 9, 'arch': 'van_b0', 'state_dict': weights, 'optimizer': optimizer.state_dict(), 'args': args,
            'best_acc1': torch.tensor(71.5), 'version': 2, 'amp_scaler': {'scale': 65536.0, '_growth_tracker': 0},
            'extras': {'bytes': b'\x00\xffraw', 'set': {1, 2}, 'frozenset': frozenset({'a'}), 'complex': 1 + 2j,
                       'device': torch.device('cpu'), 'size': torch.Size([2, 3]), 'dtype': torch.float16,
                       'param': torch.nn.Parameter(torch.ones(2)), 'half': torch.ones(2, dtype=torch.float16),
                       'int8': torch.ones(2, dtype=torch.int8), 'view': torch.arange(6.)[2:5]}}


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_reference_and_port_checkpoints_with_a_namespace_read_whole(tmp_path, zip_format):
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save(_port_checkpoint(), path, _use_new_zipfile_serialization=zip_format)
    loaded = safe_load(path)
    assert _same(loaded, torch.load(path, map_location='cpu', weights_only=False))
    assert loaded['args'].model == 'van_b0' and loaded['state_dict']._metadata == {'': {'version': 1}}
    assert isinstance(loaded['extras']['param'], torch.nn.Parameter) and loaded['optimizer']['state'][0]['step'] == 1


# ----------------------------------------------------------------------------- files that would run code
class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class _Evals:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


class _ThroughRebuild:
    """Reaches a dangerous callable through an allowed rebuild function's arguments."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (torch._tensor._rebuild_from_type_v2, (os.system, torch.Tensor, (f'touch {self.marker}',), {}))


class _NamespaceWithPayload:
    """An allowed class whose state holds a payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (argparse.Namespace, (), {'x': _RunsShell(self.marker)})


PAYLOADS = {
    'reduce-os-system': (_RunsShell, os.system.__module__ + '.system'),
    'reduce-eval': (_Evals, 'builtins.eval'),
    'rebuild-from-type': (_ThroughRebuild, os.system.__module__ + '.system'),
    'namespace-state': (_NamespaceWithPayload, os.system.__module__ + '.system'),
    'bare-global': (lambda marker: print, 'builtins.print'),
}


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
@pytest.mark.parametrize('payload', list(PAYLOADS))
def test_files_whose_unpickling_runs_code_are_refused_naming_the_global(tmp_path, payload, zip_format):
    make, named = PAYLOADS[payload]
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'payload': make(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeFileError) as refused:
        safe_load(path)
    found = REFUSAL.search(str(refused.value))
    assert found and found.group(1) == named, str(refused.value)
    assert not marker.exists()


def test_inst_obj_and_extension_opcodes_are_refused(tmp_path):
    """Hand-written pickles with the opcodes that call without REDUCE: INST, OBJ (protocols 0/1) and EXT1
    (copyreg's extension registry), each naming os.system."""
    marker = tmp_path / 'code-ran'
    command = f'touch {marker}'.encode()
    inst = b'\x80\x02(S\'' + command + b'\'\nios\nsystem\n.'
    obj = b'\x80\x02(cos\nsystem\nS\'' + command + b'\'\no.'
    ext = b'\x80\x02\x82\xf1X' + len(command).to_bytes(4, 'little') + command + b'\x85R.'
    copyreg.add_extension('os', 'system', 0xF1)
    try:
        for name, data in (('inst', inst), ('obj', obj), ('ext', ext)):
            path = tmp_path / f'{name}.pth'
            path.write_bytes(data)
            with pytest.raises(UnsafeFileError) as refused:
                safe_load(path)
            found = REFUSAL.search(str(refused.value))
            assert found and found.group(1) == 'os.system', (name, str(refused.value))
    finally:
        copyreg.remove_extension('os', 'system', 0xF1)
    assert not marker.exists()


def test_state_set_on_an_allowed_class_itself_is_refused_and_changes_nothing(tmp_path):
    """BUILD on a global (not an instance) would replace methods of the class, or a function's defaults,
    for the rest of the process."""
    repr_before = argparse.Namespace.__repr__
    defaults_before = torch._utils._rebuild_tensor_v2.__defaults__
    on_class = b'\x80\x02cargparse\nNamespace\nN}X\x08\x00\x00\x00__repr__c_codecs\nencode\ns\x86b.'
    on_function = b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__(K\x01ts\x86b.'
    for name, data in (('class', on_class), ('function', on_function)):
        path = tmp_path / f'{name}.pth'
        path.write_bytes(data)
        with pytest.raises(UnsafeFileError, match=r'refusing to read \S+: it sets attributes of '
                                                  r'(argparse\.Namespace|torch\._utils\._rebuild_tensor_v2),'):
            safe_load(path)
    assert argparse.Namespace.__repr__ is repr_before
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults_before


def test_the_allow_list_is_explicit():
    allowed = safe_pickle.allowed_globals()
    assert allowed['argparse.Namespace'] is argparse.Namespace and allowed['torch.bfloat16'] is torch.bfloat16
    assert allowed['torch._utils._rebuild_tensor_v2'] is torch._utils._rebuild_tensor_v2
    modules = {name.rsplit('.', 1)[0] for name in allowed}
    assert modules <= {'collections', 'argparse', 'torch', 'torch.nn.parameter', 'torch.serialization',
                       'torch._tensor', 'torch._utils', '_codecs', 'builtins'}
    assert {name for name in allowed if name.startswith('builtins.')} == {
        'builtins.set', 'builtins.frozenset', 'builtins.bytearray', 'builtins.complex', 'builtins.slice'}
    with pytest.raises(safe_pickle.UnsafePickleError, match='objects of builtins.getattr'):
        safe_pickle.loads(pickle.dumps(getattr, protocol=2))


# ----------------------------------------------------------------------------- files that are no checkpoint
def test_a_plain_pickle_of_data_is_not_mistaken_for_an_unsafe_file(tmp_path):
    path = tmp_path / 'plain.pth'
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match='plain.pth is not a readable PyTorch checkpoint') as refused:
        safe_load(path)
    assert not isinstance(refused.value, UnsafeFileError)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_a_truncated_checkpoint_is_not_readable_rather_than_unsafe(tmp_path, zip_format):
    path = tmp_path / 'cut.pth'
    torch.save({'state_dict': {'w': torch.zeros(100)}}, path, _use_new_zipfile_serialization=zip_format)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match='cut.pth is not a readable PyTorch checkpoint'):
        safe_load(path)


def test_a_torchscript_program_is_named_as_such(tmp_path):
    path = tmp_path / 'scripted.pt'
    with warnings.catch_warnings():  # newer torch deprecates TorchScript; users still have such files
        warnings.simplefilter('ignore', FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match=r'scripted.pt is a TorchScript program \(torch.jit.save\), not a '
                                         r'checkpoint'):
        safe_load(path)


# ----------------------------------------------------------------------------- TORCH_FORCE_WEIGHTS_ONLY_LOAD
def test_with_torch_forcing_weights_only_official_files_read_and_code_is_refused_by_name(tmp_path, monkeypatch):
    """torch accepts no pickle_module then; safe_load uses torch's own weights-only loader with the same messages."""
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    plain = tmp_path / 'plain.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'epoch': 3}, plain)
    assert _same(safe_load(plain), {'state_dict': {'w': torch.ones(2)}, 'epoch': 3})
    marker = tmp_path / 'code-ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'payload': _RunsShell(marker)}, evil)
    with pytest.raises(UnsafeFileError) as refused:
        safe_load(evil)
    found = REFUSAL.search(str(refused.value))
    assert found and found.group(1) == os.system.__module__ + '.system', str(refused.value)
    assert not marker.exists()


def test_with_torch_forcing_weights_only_a_namespace_checkpoint_reads_or_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', 'true')
    path = tmp_path / 'port.pth.tar'
    checkpoint = {'state_dict': {'w': torch.ones(2)}, 'args': argparse.Namespace(model='van_b0')}
    torch.save(checkpoint, path)
    if compat.weights_only_allowing([argparse.Namespace]) is not None:
        assert _same(safe_load(path), checkpoint)
    else:
        with pytest.raises(UnsafeFileError, match=r'cannot read \S+ while TORCH_FORCE_WEIGHTS_ONLY_LOAD is set: it '
                                                  r'contains argparse\.Namespace.*Unset TORCH_FORCE_WEIGHTS_ONLY_LOAD'):
            safe_load(path)


# ----------------------------------------------------------------------------- one loader for the product
def test_product_code_reads_pickles_only_through_safe_load():
    """Every checkpoint the programs read goes through models.weights.safe_load (utils/checkpoint.py's reader,
    the tools, timm's pretrained path via load_pretrained): no other torch.load or pickle.load call."""
    readers = {'torch.load', 'torch.serialization.load', 'pickle.load', 'pickle.loads', 'pickle.Unpickler',
               'torch.jit.load'}
    offenders = []
    for path in [REPO / 'main.py', *sorted((REPO / 'models').rglob('*.py')), *sorted((REPO / 'utils').rglob('*.py')),
                 *sorted((REPO / 'tools').rglob('*.py'))]:
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in readers and \
                    path.relative_to(REPO).as_posix() != 'models/weights.py':
                offenders.append(f'{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}')
    assert not offenders, '\n'.join(offenders)


def test_a_refused_checkpoint_reaches_the_user_as_one_checkpoint_error(tmp_path):
    from utils.checkpoint import read_file
    from utils.errors import CheckpointError, UserError
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'payload': _RunsShell(marker)}, path)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*evil.pth.tar.*: refusing to read .*objects "
                                              r"of \w+\.system") as refused:
        read_file(str(path))
    assert isinstance(refused.value, UserError) and not marker.exists()
    port = tmp_path / 'port.pth.tar'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'args': argparse.Namespace(model='van_b0')}, port)
    assert read_file(str(port))['args'].model == 'van_b0'

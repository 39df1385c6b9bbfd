"""The code is laid out as utils/__init__.py says: every module listed there, each with a docstring."""
import ast
from pathlib import Path

import utils

UTILS = Path(utils.__file__).parent


def test_every_utils_module_is_named_in_the_package_map_and_has_a_docstring():
    modules = sorted(p.stem for p in UTILS.glob('*.py') if p.stem != '__init__')
    assert sorted(utils.__all__) == modules
    for name in modules:
        assert f'    {name} ' in utils.__doc__, f'{name} is missing from the map in utils/__init__.py'
        assert ast.get_docstring(ast.parse((UTILS / f'{name}.py').read_text())), f'utils/{name}.py has no docstring'


# APIs whose presence or signature depends on the torch/triton release: only models/compat.py may use them.
VERSION_DEPENDENT = ['TorchVersion', 'is_in_torch_dispatch_mode', '_get_current_dispatch_mode',
                     'torch.compiler.is_compiling', 'torch._dynamo.is_compiling', 'torch.is_autocast_enabled(',
                     'torch.get_autocast_dtype(', 'torch.is_autocast_cpu_enabled', 'torch.amp.custom_fwd',
                     'torch.amp.custom_bwd', 'torch.amp.GradScaler(', 'torch.cuda.amp.GradScaler', 'dynamo=',
                     'triton.knobs', 'serialization.safe_globals', 'add_safe_globals', 'dist.destroy_process_group(',
                     'DistStoreError']


def test_version_dependent_apis_are_used_only_in_the_gates_module():
    root = UTILS.parent
    files = [root / 'main.py', *root.glob('models/*.py'), *root.glob('utils/*.py'), *root.glob('tools/*.py')]
    offenders = [f'{path.relative_to(root)}: {name}' for path in files if path.name != 'compat.py'
                 for name in VERSION_DEPENDENT if name in path.read_text()]
    assert not offenders, 'version gates belong in models/compat.py: ' + ', '.join(offenders)

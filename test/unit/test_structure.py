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

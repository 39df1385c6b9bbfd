"""tools/flops.py: parameters and GMACs agree with the reference numbers in the notes."""
import importlib.util
from pathlib import Path

import pytest

_FLOPS_PATH = Path(__file__).resolve().parents[2] / 'tools' / 'flops.py'
_spec = importlib.util.spec_from_file_location('flops_tool', _FLOPS_PATH)
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)

# (parameters, GMACs at 224x224) from shared/notes/reference-van.md
REFERENCE = {
    'van_b0': (4_105_800, 0.864), 'van_b1': (13_861_800, 2.495), 'van_b2': (26_578_472, 4.993),
    'van_b3': (44_765_608, 8.925), 'van_b4': (60_283_176, 12.144), 'van_b5': (89_967_688, 17.129),
    'van_b6': (199_829_416, 38.710),
}


def test_small_variants_match_the_notes():
    for name, params, macs in flops.flops_table(['van_b0', 'van_b2'], 224, 224):
        assert (params, round(macs / 1e9, 3)) == REFERENCE[name]


@pytest.mark.slow
def test_all_variants_match_the_notes():
    rows = flops.flops_table(list(REFERENCE), 224, 224)
    assert {name: (params, round(macs / 1e9, 3)) for name, params, macs in rows} == REFERENCE


def test_macs_scale_with_resolution_and_aspect():
    (_, _, square), = flops.flops_table(['van_b0'], 224, 224)
    (_, _, wide), = flops.flops_table(['van_b0'], 224, 448)
    # the head's matrix product does not grow with the image; everything else doubles
    head_macs = 256 * 1000
    assert wide - head_macs == 2 * (square - head_macs)


def test_command_line_prints_the_table(capsys):
    flops.main(['--img-size', '96', '128', '--models', 'van_tiny', 'van_b0'])
    lines = capsys.readouterr().out.splitlines()
    assert '96x128' in lines[0]
    assert lines[1].split()[:2] == ['van_tiny', '4,105,800']
    assert lines[1].split()[2] == lines[2].split()[2]  # an alias counts the same as its variant


def test_command_line_rejects_three_sizes():
    with pytest.raises(SystemExit):
        flops.main(['--img-size', '1', '2', '3'])

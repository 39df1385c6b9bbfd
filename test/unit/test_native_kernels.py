"""The native C depthwise kernels equal nn.Conv2d (+ GELU); without a compiler everything still runs."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models  # noqa: F401  (registers the VAN variants)
import timm
from models import native_kernels
from models.fast_conv import FastConv2d

needs_native = pytest.mark.skipif(not native_kernels.available(),
                                  reason=f'native kernels unavailable: {native_kernels.unavailable_reason()}')

SHAPES = [
    (2, 16, 28, 28),  # even, blocked interior for every kernel
    (2, 8, 21, 19),   # odd, non-square, interior not a multiple of the block
    (1, 24, 23, 30),  # non-square, 24 channels: the 8-channel remainder after 32-channel groups
    (3, 40, 7, 7),    # 7x7 dilation 3 on 7x7: only the centre tap is live
    (2, 8, 5, 8),     # smaller than the kernel's reach
    (2, 32, 2, 3),    # tiny
    (1, 8, 1, 1),     # a single pixel
]
CONVS = [(7, 3), (5, 1), (3, 1), (3, 2), (5, 3)]  # (kernel, dilation); the last two take the generic loops


def _pair(channels, kernel, dilation):
    torch.manual_seed(kernel * 10 + dilation)
    kwargs = dict(padding=dilation * (kernel // 2), dilation=dilation, groups=channels)
    ref = nn.Conv2d(channels, channels, kernel, **kwargs)
    fast = FastConv2d(channels, channels, kernel, **kwargs)
    with torch.no_grad():
        ref.bias.normal_()  # a zero bias would hide a wrong bias gradient
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(forward, conv, x, grad):
    x = x.detach().requires_grad_()
    y = forward(x)
    y.backward(grad)
    return y, x.grad, conv.weight.grad, conv.bias.grad


def _assert_all_close(got, expected):
    for name, g, e in zip(['output', 'input grad', 'weight grad', 'bias grad'], got, expected):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=lambda m: f'{name}: {m}')


@needs_native
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('kernel,dilation', CONVS, ids=lambda v: str(v))
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_conv_matches_conv2d(shape, kernel, dilation, channels_last):
    ref, fast = _pair(shape[1], kernel, dilation)
    x, grad = torch.randn(shape), torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = _run(ref, ref, x, grad)
    got = _run(fast, fast, x, grad)
    assert 'Native' in got[0].grad_fn.name()  # the C kernels ran, not a fallback
    _assert_all_close(got, expected)
    assert got[0].stride() == expected[0].stride() or min(shape[2:]) == 1  # memory format kept


@needs_native
@pytest.mark.parametrize('shape', [(2, 16, 28, 28), (2, 8, 5, 8), (1, 24, 9, 13)], ids=lambda s: 'x'.join(map(str, s)))
def test_fused_gelu_matches_conv2d_then_gelu(shape):
    ref, fast = _pair(shape[1], 3, 1)
    x, grad = torch.randn(shape) * 3, torch.randn(shape)  # GELU's curved part and both tails
    expected = _run(lambda t: F.gelu(ref(t)), ref, x, grad)
    got = _run(fast.forward_gelu, fast, x, grad)
    assert 'Native' in got[0].grad_fn.name()
    _assert_all_close(got, expected)


@needs_native
def test_gelu_backward_matches_autograd_over_a_wide_range():
    pre = torch.linspace(-12, 12, 8 * 3000).view(1, 8, 30, 100).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(pre.shape).contiguous(memory_format=torch.channels_last)
    x = pre.double().requires_grad_()
    expected, = torch.autograd.grad(F.gelu(x), x, grad.double())
    torch.testing.assert_close(native_kernels.gelu_backward(pre, grad).double(), expected, rtol=1e-5, atol=1e-6)


@needs_native
def test_other_dtypes_and_autocast_take_pytorchs_route():
    x = torch.randn(1, 8, 6, 6)
    assert native_kernels.supports(x)
    assert not native_kernels.supports(x.bfloat16())
    assert not native_kernels.supports(torch.randn(1, 12, 6, 6))  # channels not a multiple of 8
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not native_kernels.supports(x)
    with native_kernels.disabled():
        assert not native_kernels.supports(x)
    assert native_kernels.supports(x)


@needs_native
def test_flop_counter_sees_the_depthwise_convs():
    """Under a dispatch mode (FlopCounterMode, as in tools/flops.py) the C kernels, which it cannot
    see, step aside: the count is the one of PyTorch's route."""
    from torch.utils.flop_counter import FlopCounterMode
    model = timm.create_model('van_b0', num_classes=10).eval()
    counts = []
    for route in (contextlib.nullcontext, native_kernels.disabled):
        with route(), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, 64, 64))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@needs_native
@pytest.mark.slow
def test_training_steps_match_pytorchs_route():
    """Two SGD steps of van_b0 on the native kernels land on the weights of PyTorch's route."""
    torch.manual_seed(0)
    native = timm.create_model('van_b0', num_classes=10, lka_impl='fast')
    torch_route = timm.create_model('van_b0', num_classes=10, lka_impl='fast')
    torch_route.load_state_dict(native.state_dict())
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    for model, route in ((native, contextlib.nullcontext), (torch_route, native_kernels.disabled)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with route():
            for _ in range(2):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
    for (name, a), b in zip(native.state_dict().items(), torch_route.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=lambda m: f'{name}: {m}')


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as in a new process, building into an empty cache."""
    monkeypatch.setattr(native_kernels, '_tried', False)
    monkeypatch.setattr(native_kernels, '_lib', None)
    monkeypatch.setattr(native_kernels, '_reason', None)
    monkeypatch.setenv('VAN_KERNEL_CACHE', str(tmp_path / 'cache'))
    return tmp_path


@pytest.mark.parametrize('setting, reason', [
    (dict(CC='/nonexistent/cc'), "no C compiler '/nonexistent/cc'"),
    (dict(CC='false'), 'building depthwise.c with false failed'),
])
def test_without_a_compiler_one_warning_names_why_and_models_still_train(fresh_loader, monkeypatch,
                                                                         setting, reason):
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    conv = FastConv2d(8, 8, 7, padding=9, dilation=3, groups=8)
    with pytest.warns(RuntimeWarning, match='native depthwise kernels are off') as record:
        y = conv(torch.randn(2, 8, 10, 10, requires_grad=True))
    assert reason in str(record[0].message)
    assert native_kernels.unavailable_reason().startswith(reason)
    y.sum().backward()
    assert conv.weight.grad is not None and 'Native' not in y.grad_fn.name()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # said once, not at every call
        conv(torch.randn(2, 8, 10, 10))


def test_switched_off_by_environment_without_a_warning(fresh_loader, monkeypatch):
    monkeypatch.setenv('VAN_NATIVE_KERNELS', '0')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not native_kernels.available()
    assert native_kernels.unavailable_reason() == 'VAN_NATIVE_KERNELS=0'


@needs_native
def test_build_is_cached_per_machine(fresh_loader):
    assert native_kernels.available()
    built = list((fresh_loader / 'cache').glob('depthwise-*.so'))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native_kernels._tried = False  # a new process: finds the build and does not compile again
    assert native_kernels.available()
    assert built[0].stat().st_mtime_ns == stamp
    assert list((fresh_loader / 'cache').iterdir()) == built  # no temporary files left behind


@needs_native
def test_unwritable_home_builds_in_a_temporary_folder(fresh_loader, monkeypatch):
    blocker = fresh_loader / 'not-a-folder'
    blocker.write_text('')  # a home below a file cannot be created, not even by root
    monkeypatch.delenv('VAN_KERNEL_CACHE')
    monkeypatch.setenv('HOME', str(blocker / 'home'))
    (fresh_loader / 'tmp').mkdir()
    monkeypatch.setattr(native_kernels.tempfile, 'tempdir', str(fresh_loader / 'tmp'))
    assert native_kernels.available()
    assert len(list((fresh_loader / 'tmp').glob('van-kernels-*/depthwise-*.so'))) == 1

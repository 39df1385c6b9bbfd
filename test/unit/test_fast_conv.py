"""The fast depthwise convs compute what nn.Conv2d computes: outputs and every gradient."""
import pytest
import torch
from torch import nn

import models  # noqa: F401  (registers the VAN variants)
import timm
from models.fast_conv import FastConv2d, polyphase_merge, polyphase_split

SHAPES = [
    (2, 4, 56, 56),   # polyphase route, size a multiple of nothing useful
    (2, 3, 28, 28),   # even, polyphase
    (2, 5, 14, 14),   # even, weight gradient by batched matmul
    (2, 3, 21, 21),   # odd, a multiple of the dilation
    (1, 2, 23, 30),   # non-square, polyphase
    (3, 2, 7, 7),     # dead taps cut (7x7 dilation 3 on 7x7)
    (2, 3, 5, 8),     # non-square, smaller than the kernel's reach
    (2, 3, 2, 3),     # tiny
    (1, 1, 1, 1),     # a single pixel
]
CONVS = [(7, 3), (5, 1), (3, 1), (3, 2)]  # (kernel, dilation)


def _pair(channels, kernel, dilation, dtype):
    torch.manual_seed(kernel * 10 + dilation)
    kwargs = dict(padding=dilation * (kernel // 2), dilation=dilation, groups=channels)
    ref = nn.Conv2d(channels, channels, kernel, **kwargs).to(dtype)
    fast = FastConv2d(channels, channels, kernel, **kwargs).to(dtype)
    with torch.no_grad():
        ref.bias.normal_()  # a zero bias would hide a wrong bias gradient route
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _forward_backward(conv, x, grad):
    x = x.detach().requires_grad_()
    y = conv(x)
    y.backward(grad)
    return y, x.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('kernel,dilation', CONVS, ids=lambda v: str(v))
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_matches_conv2d_float32(shape, kernel, dilation, channels_last):
    ref, fast = _pair(shape[1], kernel, dilation, torch.float32)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape)
    expected = _forward_backward(ref, x, grad)
    got = _forward_backward(fast, x, grad)
    for name, e, g in zip(['output', 'input grad', 'weight grad', 'bias grad'], expected, got):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=lambda m: f'{name}: {m}')
    # The caller's memory format is kept, so a channels_last network stays channels_last.
    assert got[0].stride() == expected[0].stride() or min(shape[2:]) == 1


def _float64_reference(fast, x, grad):
    """(exact, magnitude): float64 nn.Conv2d results (output, input, weight and bias gradients) for the
    values of `fast`, `x` and `grad` (bfloat16-rounded already), and the same with every value replaced
    by its absolute value: the sum of |terms| behind each result, which bounds its rounding error.

    bfloat16 results are compared with float64 only: PyTorch's own bfloat16 depthwise kernels are no
    yardstick (on AVX-512 CPUs such as Zen 5 the channels_last dilated one returns NaN weight gradients
    for 4 channels, and the call can crash the process).
    """
    kwargs = dict(padding=fast.padding, dilation=fast.dilation, groups=fast.groups)
    out = []
    for transform in (lambda t: t, torch.abs):
        ref = nn.Conv2d(fast.in_channels, fast.out_channels, fast.kernel_size, **kwargs).double()
        ref.load_state_dict({name: transform(t.double()) for name, t in fast.state_dict().items()})
        out.append(_forward_backward(ref, transform(x.double()), transform(grad.double())))
    return out


def _assert_bfloat16_close(got, exact, magnitude, expected_dtypes):
    """Each result within two bfloat16 roundings (2**-7 relative) of the magnitude of its terms: one
    for the result, one for an intermediate bfloat16 sum (the batched-matmul weight gradient)."""
    for name, g, e, m, dtype in zip(['output', 'input grad', 'weight grad', 'bias grad'], got, exact, magnitude,
                                     expected_dtypes):
        assert g.dtype == dtype and g.shape == e.shape, name
        excess = (g.double() - e).abs() - 2 ** -7 * m
        assert excess.max() <= 0, f'{name}: error above bfloat16 precision by up to {excess.max().item():.3g}'


# VAN's channel counts (multiples of 32); maps for both weight-gradient routes of the dilated conv
# (phases of 19x19 by oneDNN, 5x5 by batched matmul), dead taps cut (7x7) and maps smaller than the reach.
BF16_SHAPES = [(2, 32, 56, 56), (2, 64, 14, 14), (2, 160, 7, 7), (2, 32, 5, 8)]


@pytest.mark.parametrize('shape', BF16_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('kernel,dilation', [(7, 3), (5, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_matches_conv2d_bfloat16(shape, kernel, dilation, channels_last):
    """bfloat16 results agree with a float64 nn.Conv2d to bfloat16 precision."""
    _, fast = _pair(shape[1], kernel, dilation, torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).to(torch.bfloat16)
    exact, magnitude = _float64_reference(fast, x, grad)
    _assert_bfloat16_close(_forward_backward(fast, x, grad), exact, magnitude, [torch.bfloat16] * 4)


@pytest.mark.parametrize('size', [(7, 7), (10, 13), (56, 56)])
def test_polyphase_split_merge_round_trip(size):
    x = torch.randn(2, 3, *size)
    phases = polyphase_split(x, 3)
    assert phases.shape == (18, 3, -(-size[0] // 3), -(-size[1] // 3))
    phase = x[1, :, 1::3, 1::3]  # phase (1, 1) of sample 1 is batch entry (1 * 3 + 1) * 2 + 1
    h, w = phase.shape[1:]
    assert torch.equal(phases[9][:, :h, :w], phase)
    assert not phases[9][:, h:].any() and not phases[9][:, :, w:].any()  # zero padding at the end
    assert torch.equal(polyphase_merge(phases, size, 3), x)


def test_non_depthwise_and_strided_convs_are_plain_conv2d():
    for kwargs in [dict(in_channels=4, out_channels=8, kernel_size=1),
                   dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=4),
                   dict(in_channels=4, out_channels=4, kernel_size=3, padding=0, groups=4)]:
        assert not FastConv2d(**kwargs).routed_depthwise, kwargs


def test_state_dict_names_are_conv2d_names():
    fast = FastConv2d(8, 8, 7, padding=9, dilation=3, groups=8)
    assert list(fast.state_dict()) == list(nn.Conv2d(8, 8, 7, padding=9, dilation=3, groups=8).state_dict())


@pytest.mark.slow
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_whole_model_fast_equals_plain(channels_last):
    """van_b0 with the fast path: same state-dict names, same logits and same gradients."""
    torch.manual_seed(0)
    plain = timm.create_model('van_b0', num_classes=10, lka_impl='plain')
    fast = timm.create_model('van_b0', num_classes=10, lka_impl='fast')
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 48)  # stage maps 16x12 .. 2x2: both dilated routes and dead taps
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    outputs = []
    for model in (plain, fast):
        model.train()
        out = model(x)
        out.square().sum().backward()
        outputs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_plain, grads_plain), (out_fast, grads_fast) = outputs
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_fast[name], g, rtol=1e-3, atol=1e-5, msg=lambda m: f'{name}: {m}')


def test_auto_resolves_to_fast():
    assert timm.create_model('van_b0', lka_impl='auto').lka_impl == 'fast'


@pytest.mark.parametrize('shape', [(2, 5, 14, 14), (3, 2, 7, 7), (2, 3, 5, 8)], ids=lambda s: 'x'.join(map(str, s)))
def test_inference_route_matches_conv2d(shape):
    """Without gradients small maps take the polyphase route too; the result is the same."""
    ref, fast = _pair(shape[1], 7, 3, torch.float32)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dilation, size', [(3, (2, 32, 40, 40)), (3, (2, 32, 24, 24)), (3, (2, 32, 9, 11)),
                                            (1, (2, 32, 10, 10))])
def test_backward_under_cpu_bfloat16_autocast(dilation, size):
    # main.py --amp on CPU: float32 weights, bfloat16 autocast; the hand-written backward must cope
    # (phases of 14x14 take oneDNN's weight gradient, of 8x8 the batched matmul).
    torch.manual_seed(0)
    kernel = 7 if dilation > 1 else 5
    _, fast = _pair(size[1], kernel, dilation, torch.float32)
    x, grad = torch.randn(size), torch.randn(size).to(torch.bfloat16)
    xi = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = fast(xi)
    y.backward(grad)
    got = (y, xi.grad, fast.weight.grad, fast.bias.grad)
    # Autocast computes with bfloat16 copies of the input, weight and bias, and hands float32 gradients back.
    rounded = FastConv2d(size[1], size[1], kernel, padding=dilation * (kernel // 2), dilation=dilation,
                         groups=size[1]).to(torch.bfloat16)
    rounded.load_state_dict(fast.state_dict())
    exact, magnitude = _float64_reference(rounded, x.to(torch.bfloat16), grad)
    _assert_bfloat16_close(got, exact, magnitude, [torch.bfloat16] + [torch.float32] * 3)


@pytest.mark.parametrize('in_channels, out_channels', [(16, 16), (8, 64), (32, 8), (64, 8)])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_pointwise_conv_matches_conv2d(in_channels, out_channels, channels_last):
    """1x1 convs of channels_last float32 maps take the GEMM weight gradient unless they reduce
    channels 8-fold; every route gives nn.Conv2d's output and gradients."""
    torch.manual_seed(0)
    ref = nn.Conv2d(in_channels, out_channels, 1)
    fast = FastConv2d(in_channels, out_channels, 1)
    with torch.no_grad():
        ref.bias.normal_()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, in_channels, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, out_channels, 9, 7)
    expected = _forward_backward(ref, x, grad)
    got = _forward_backward(fast, x, grad)
    takes_gemm_route = channels_last and in_channels < 8 * out_channels
    assert ('PointwiseConv' in got[0].grad_fn.name()) == takes_gemm_route
    for name, e, g in zip(['output', 'input grad', 'weight grad', 'bias grad'], expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=lambda m: f'{name}: {m}')


def test_pointwise_conv_without_bias_and_frozen_weight():
    fast = FastConv2d(8, 16, 1, bias=False)
    fast.weight.requires_grad_(False)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = fast(x)
    assert 'PointwiseConv' in y.grad_fn.name()
    y.sum().backward()
    expected = nn.functional.conv2d(torch.ones(2, 16, 5, 5), fast.weight.transpose(0, 1))
    torch.testing.assert_close(x.grad, expected)

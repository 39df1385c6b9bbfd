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


@pytest.mark.parametrize('shape', [(2, 4, 56, 56), (2, 5, 14, 14), (2, 3, 5, 8)], ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('kernel,dilation', [(7, 3), (5, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_matches_conv2d_bfloat16(shape, kernel, dilation, channels_last):
    """bfloat16 results agree with a float64 nn.Conv2d as closely as bfloat16's own nn.Conv2d does."""
    ref64, _ = _pair(shape[1], kernel, dilation, torch.float64)
    ref16, fast = _pair(shape[1], kernel, dilation, torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).to(torch.bfloat16)
    exact = _forward_backward(ref64, x.double(), grad.double())
    plain = _forward_backward(ref16, x, grad)
    got = _forward_backward(fast, x, grad)
    for name, e, p, g in zip(['output', 'input grad', 'weight grad', 'bias grad'], exact, plain, got):
        assert g.dtype == torch.bfloat16, name
        plain_err = (p.double() - e).abs().max().item()
        fast_err = (g.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert fast_err <= max(2 * plain_err, 1e-2 * scale), f'{name}: {fast_err} vs bf16 nn.Conv2d {plain_err}'


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
        assert not FastConv2d(**kwargs)._fast_shape, kwargs


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


@pytest.mark.parametrize('dilation, size', [(3, (2, 8, 24, 24)), (3, (2, 8, 9, 11)), (1, (2, 8, 10, 10))])
def test_backward_under_cpu_bfloat16_autocast(dilation, size):
    # main.py --amp on CPU: float32 weights, bfloat16 autocast; the hand-written backward must cope.
    torch.manual_seed(0)
    kernel = 7 if dilation > 1 else 5
    plain = nn.Conv2d(8, 8, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=8)
    fast = FastConv2d(8, 8, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=8)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(size)
    grads = []
    for conv in (plain, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = conv(xi)
        y.float().square().sum().backward()
        grads.append((y.float(), xi.grad, conv.weight.grad, conv.bias.grad))
    for expected, got in zip(*grads):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


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

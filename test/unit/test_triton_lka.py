"""Triton depthwise kernels (models/triton_lka.py, lka_impl='triton'): on a CUDA device where there is one,
else on CPU in Triton's interpreter (test/unit/conftest.py sets TRITON_INTERPRET=1 before triton is imported).

Every result is compared with nn.Conv2d (and GELU) in float64 on the same inputs: outputs and the input,
weight and bias gradients.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import VAN, triton_lka

needs_triton = pytest.mark.skipif(not triton_lka.available(), reason=triton_lka.unavailable_reason() or 'triton')

# (kernel size, dilation, GELU fused): the LKA's two convs and the MLP's conv (with and without its GELU).
VAN_CONVS = [(5, 1, False), (7, 3, False), (3, 1, True), (3, 1, False)]
# Largest error allowed, relative to the largest reference value: float32 accumulates like float64
# up to rounding; half-precision maps and gradients are rounded once to their 11 (8) significant bits.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def device():
    """Where the kernels run: the GPU, or the CPU under Triton's interpreter."""
    if torch.cuda.is_available():
        return torch.device('cuda')
    if not triton_lka.interpreting():
        pytest.skip('no CUDA device, and TRITON_INTERPRET=1 is not set (test/unit/conftest.py sets it)')
    return torch.device('cpu')


def _inputs(device, channels=32, size=(9, 11), kernel=5, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, *size, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, kernel, kernel, generator=generator) / kernel
    bias = torch.randn(channels, generator=generator)
    grad = torch.randn(2, channels, *size, generator=generator).to(dtype)
    return tuple(t.to(device) for t in (x, weight, bias, grad))


def _reference(x, weight, bias, grad, dilation, gelu):
    """Output and (input, weight, bias) gradients of nn.Conv2d (+ GELU) in float64."""
    x, weight, bias = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    k = weight.shape[-1]
    y = F.conv2d(x, weight, bias, 1, dilation * (k // 2), dilation, x.shape[1])
    if gelu:
        y = F.gelu(y)
    return tuple(t.cpu() for t in (y.detach(), *torch.autograd.grad(y, (x, weight, bias), grad.double())))


def _triton(x, weight, bias, grad, dilation, gelu):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = triton_lka.depthwise_conv(x, weight, bias, dilation, gelu)
    return tuple(t.cpu() for t in (y.detach(), *torch.autograd.grad(y, (x, weight, bias), grad)))


def _assert_close(results, reference, dtype):
    for name, got, want in zip(('output', 'input grad', 'weight grad', 'bias grad'), results, reference):
        assert got.shape == want.shape, name
        error = (got.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert error <= TOLERANCE[dtype] * scale, f'{name}: max error {error:.3g} vs scale {scale:.3g}'


@needs_triton
@pytest.mark.parametrize('kernel,dilation,gelu', VAN_CONVS)
def test_float32_matches_conv2d_in_float64(device, kernel, dilation, gelu):
    x, weight, bias, grad = _inputs(device, kernel=kernel)
    results = _triton(x, weight, bias, grad, dilation, gelu)
    _assert_close(results, _reference(x, weight, bias, grad, dilation, gelu), torch.float32)
    assert results[0].dtype == torch.float32 and results[0].is_contiguous(memory_format=torch.channels_last)
    assert results[2].dtype == weight.dtype and results[3].dtype == bias.dtype


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('kernel,dilation,gelu', [(7, 3, False), (3, 1, True)])
def test_half_precision_maps_with_float32_weights(device, dtype, kernel, dilation, gelu):
    """As under autocast: a half-precision map, float32 weights; the result and input gradient take
    the map's dtype, the weight and bias gradients stay float32."""
    x, weight, bias, grad = _inputs(device, kernel=kernel, dtype=dtype, channels=64, size=(8, 8))
    results = _triton(x, weight, bias, grad, dilation, gelu)
    assert results[0].dtype == results[1].dtype == dtype
    assert results[2].dtype == results[3].dtype == torch.float32
    _assert_close(results, _reference(x, weight, bias, grad, dilation, gelu), dtype)


@needs_triton
@pytest.mark.slow
def test_small_tiles_cover_every_pixel_channel_and_chunk(device, monkeypatch):
    """Tiles that fit the map nowhere evenly: 48 channels in blocks of 32 (the second half-masked), 70
    pixels in conv blocks of 32, and weight-gradient chunks of 3 blocks of 8 pixels (the last one short)."""
    monkeypatch.setattr(triton_lka, 'conv_tiles', lambda pixels, channels: (32, 32))
    monkeypatch.setattr(triton_lka, 'weight_grad_tiles', lambda pixels, channels, taps, device: (8, 32, 3))
    for kernel, dilation, gelu in [(7, 3, False), (3, 1, True)]:
        x, weight, bias, grad = _inputs(device, channels=48, size=(5, 7), kernel=kernel, seed=1)
        _assert_close(_triton(x, weight, bias, grad, dilation, gelu),
                      _reference(x, weight, bias, grad, dilation, gelu), torch.float32)


@needs_triton
def test_nchw_input_and_taps_past_the_map(device):
    """An NCHW map is taken as it is (the result is channels_last); on a 4x5 map most taps of the
    dilated 7x7 kernel see only padding, and their weight gradient is exactly zero."""
    x, weight, bias, grad = _inputs(device, size=(4, 5), kernel=7)
    x = x.contiguous()
    results = _triton(x, weight, bias, grad, 3, False)
    _assert_close(results, _reference(x, weight, bias, grad, 3, False), torch.float32)
    dead = torch.ones(7, 7, dtype=torch.bool)
    dead[2:5, 2:5] = False  # offsets -3, 0, 3 reach inside a 4x5 map; +-6, +-9 never do
    assert (results[2][:, 0][:, dead] == 0).all()


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize('op_name', ['dwconv', 'dwconv_gelu', 'dwconv_input_grad', 'dwconv_gelu_grad',
                                     'dwconv_weight_grad'])
def test_custom_ops_pass_opcheck(device, op_name):
    """Schema, fake (meta) functions matching the real outputs' shapes and strides, autograd registration
    and AOT tracing with dynamic shapes: what torch.compile relies on."""
    x, weight, bias, grad = _inputs(device, kernel=7)
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    op, args = {
        'dwconv': (triton_lka._OPS.dwconv, (x, weight, bias, 3, False)),
        'dwconv_gelu': (triton_lka._OPS.dwconv, (x, weight, None, 1, True)),
        'dwconv_input_grad': (triton_lka._OPS.dwconv_input_grad, (grad, weight.detach(), 3)),
        'dwconv_gelu_grad': (triton_lka._OPS.dwconv_gelu_grad, (grad, x.detach(), weight.detach(), bias.detach(), 1)),
        'dwconv_weight_grad': (triton_lka._OPS.dwconv_weight_grad, (grad, x.detach(), 7, 3)),
    }[op_name]
    torch.library.opcheck(op, args)


@needs_triton
@pytest.mark.slow
def test_torch_compile_traces_the_module_without_graph_breaks(device):
    """fullgraph=True fails on any graph break: TritonConv2d's checks and the custom ops are traceable."""
    conv = triton_lka.TritonConv2d(32, 32, 7, padding=9, dilation=3, groups=32).to(device)
    x = _inputs(device, kernel=7)[0]
    compiled = torch.compile(conv, backend='aot_eager', fullgraph=True)
    expected = F.conv2d(x, conv.weight, conv.bias, 1, 9, 3, 32)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.slow
def test_van_training_step_matches_plain(device):
    """A small VAN with lka_impl='triton' computes the same loss and gradients as 'plain'."""
    config = dict(embed_dims=(32, 64, 32, 32), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), num_classes=5)
    torch.manual_seed(0)
    plain = VAN(**config, lka_impl='plain')
    fast = VAN(**config, lka_impl='triton')
    fast.load_state_dict(plain.state_dict())
    plain.to(device), fast.to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    losses = []
    for model in (plain, fast):
        loss = model(images).logsumexp(1).sum()
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@needs_triton
def test_module_keeps_conv2d_parameters_and_falls_back_on_cpu(monkeypatch):
    """Without the interpreter a CPU map runs nn.Conv2d, saying so once; the state dict is nn.Conv2d's."""
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    monkeypatch.setattr(triton_lka, '_cpu_fallback_said', False)
    conv = triton_lka.TritonConv2d(32, 32, 3, padding=1, groups=32)
    plain = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 32, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.testing.assert_close(conv(x), plain(x))
        torch.testing.assert_close(conv.forward_gelu(x), F.gelu(plain(x)))
    said = [w for w in caught if 'Triton kernels run on CUDA' in str(w.message)]
    assert len(said) == 1
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        triton_lka.depthwise_conv(x, conv.weight, conv.bias, 1)  # the op itself never runs unsupported


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_lka, 'unavailable_reason', lambda: 'the triton package cannot be imported (test)')
    with pytest.raises(ValueError, match="lka_impl 'triton' is unavailable: the triton package cannot be imported"):
        VAN(embed_dims=(32,) * 4, depths=(1,) * 4, mlp_ratios=(2,) * 4, lka_impl='triton')

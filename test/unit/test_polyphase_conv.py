"""lka_impl='polyphase' (models/polyphase_conv.py): the dilated depthwise conv as a dense conv on its phases,
exact against F.conv2d in float64 (output and all gradients) in both memory formats."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import VAN
from models.polyphase_conv import PolyphaseConv2d, polyphase_conv2d


@pytest.mark.parametrize('size', [(9, 11), (7, 7), (12, 12), (3, 5), (1, 1)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_matches_dilated_conv2d_exactly(size, channels_last):
    """Sizes divisible by the dilation and not, and maps so small that most taps see only padding."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, *size, dtype=torch.float64, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 1, 7, 7, dtype=torch.float64, generator=generator)
    bias = torch.randn(8, dtype=torch.float64, generator=generator)
    grad = torch.randn(2, 8, *size, dtype=torch.float64, generator=generator)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = polyphase_conv2d(*inputs, 3)
    got = (y, *torch.autograd.grad(y, inputs, grad))
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_ref = F.conv2d(inputs[0], inputs[1], inputs[2], 1, 9, 3, 8)
    want = (y_ref, *torch.autograd.grad(y_ref, inputs, grad))
    for name, a, b in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_only_dilated_depthwise_convs_take_the_polyphase_route(monkeypatch):
    calls = []
    monkeypatch.setattr('models.polyphase_conv.polyphase_conv2d', lambda *a: calls.append(a) or a[0])
    dilated = PolyphaseConv2d(8, 8, 7, padding=9, dilation=3, groups=8)
    dense = PolyphaseConv2d(8, 8, 5, padding=2, groups=8)
    pointwise = PolyphaseConv2d(8, 8, 1)
    x = torch.randn(1, 8, 6, 6)
    for conv in (dense, pointwise):
        torch.testing.assert_close(conv(x), nn.Conv2d.forward(conv, x))
    assert not calls
    dilated(x)
    assert len(calls) == 1
    assert dilated.state_dict().keys() == nn.Conv2d(8, 8, 7).state_dict().keys()


def test_van_with_polyphase_matches_plain():
    config = dict(embed_dims=(16, 32, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), num_classes=3)
    torch.manual_seed(0)
    plain = VAN(**config, lka_impl='plain').double()
    polyphase = VAN(**config, lka_impl='polyphase').double()
    polyphase.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    for model in (plain, polyphase):
        model(images).logsumexp(1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), polyphase.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)

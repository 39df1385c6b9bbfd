"""The polyphase rewrite of the LKA's dilated conv for any device (`lka_impl='polyphase'`): opt-in, not yet measured.

A stride-1 'same' conv with dilation d only ever combines pixels of the same residue (row mod d,
col mod d). Splitting the map into its d*d phases, folding them into the batch and running a *dense*
depthwise conv on them gives every output phase exactly (the same products, summed in another order);
interleaving the phases gives the output. Taps whose offset reaches past the map only ever see padding
and are cut (their weight gradient stays exactly zero). models/fast_conv.py does this on CPU with its
own backward; here the split and merge are one pad + reshape each and autograd differentiates them, so
the dense conv and its backward are the vendor's (cuDNN on CUDA) and torch.compile can fuse the copies.

Why try it on CUDA: PyTorch's NCHW dilated depthwise conv never reaches cuDNN (aten/src/ATen/native/
Convolution.cpp, ConvParams::use_cudnn_depthwise, pytorch/pytorch@954cecd: the NCHW branch requires
`!is_dilated()` and float16), and its own kernel's weight gradient re-reads the map K*K times; a dense
5x5-or-smaller conv on the phases can go to cuDNN. Whether the copies cost less than they save is what
tools/gpu_benchmark.sh measures, so no default uses this.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .fast_conv import _live_radius, _memory_format
from .routed_conv import RoutedConv2d, plain_conv2d_same

__all__ = ['PolyphaseConv2d', 'polyphase_conv2d']


def polyphase_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, dilation: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, 1, dilation * (K // 2), dilation, C) for a depthwise weight (C, 1, K, K),
    computed as a dense conv on the d*d phases of x. The result has x's memory format."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    d = dilation
    rh, rw = _live_radius(kh // 2, h, d), _live_radius(kw // 2, w, d)
    live = weight[:, :, kh // 2 - rh:kh // 2 + rh + 1, kw // 2 - rw:kw // 2 + rw + 1]
    hq, wq = -(-h // d), -(-w // d)
    memory_format = _memory_format(x)
    # Zeros at the end make every phase hq x wq; they are exactly the conv's zero padding there.
    x = F.pad(x, (0, wq * d - w, 0, hq * d - h))
    if memory_format == torch.channels_last:  # split and merge in NHWC order: the copies stay channels_last
        phases = (x.permute(0, 2, 3, 1).reshape(n, hq, d, wq, d, c).permute(2, 4, 0, 1, 3, 5)
                  .reshape(d * d * n, hq, wq, c).permute(0, 3, 1, 2))
    else:
        phases = x.reshape(n, c, hq, d, wq, d).permute(3, 5, 0, 1, 2, 4).reshape(d * d * n, c, hq, wq)
    y = F.conv2d(phases, live, bias, 1, (rh, rw), 1, c)
    if memory_format == torch.channels_last:
        y = (y.permute(0, 2, 3, 1).reshape(d, d, n, hq, wq, c).permute(2, 3, 0, 4, 1, 5)
             .reshape(n, hq * d, wq * d, c)[:, :h, :w].permute(0, 3, 1, 2))
    else:
        y = y.reshape(d, d, n, c, hq, wq).permute(2, 3, 4, 0, 5, 1).reshape(n, c, hq * d, wq * d)[:, :, :h, :w]
    return y.contiguous(memory_format=memory_format)


def _polyphase_route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                     depthwise: bool, gelu: bool) -> torch.Tensor:
    if x.dim() == 4:
        y = polyphase_conv2d(x, weight, bias, dilation)
    else:  # an unbatched map, as nn.Conv2d takes it
        y = plain_conv2d_same(x, weight, bias, dilation, True)
    return F.gelu(y) if gelu else y


class PolyphaseConv2d(RoutedConv2d):
    """nn.Conv2d whose stride-1 'same' dilated depthwise convs (the LKA's 7x7 dilation 3) run as
    `polyphase_conv2d` on every device; all other convs run nn.Conv2d's forward. Parameters are
    nn.Conv2d's, so every checkpoint loads."""

    scripting_note = 'its polyphase rewrite runs in eager mode only'

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routed_depthwise = self.same_depthwise() and self.dilation[0] > 1

    conv2d_route = staticmethod(_polyphase_route)

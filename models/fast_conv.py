"""Fast depthwise convolutions for VAN's LKA and MLP, exact replacements for nn.Conv2d.

`FastConv2d` subclasses nn.Conv2d (parameters stay `weight`/`bias`, so every checkpoint loads) and
computes what nn.Conv2d computes; it only changes *how* on devices where PyTorch's own kernels
are slow. Where a shape is not a stride-1 'same' depthwise conv, or the device is not a CPU, it
runs nn.Conv2d's own forward (cuDNN on CUDA is already fast; we never replace it unmeasured).

On CPU there are two routes, chosen per call:
1. The native C kernels (models/native_kernels.py, models/csrc/depthwise.c) for float32 maps with
   a multiple of 8 channels, which is every VAN layer: forward, input gradient (the forward kernel
   with the flipped weights) and weight/bias gradients, with the MLP's GELU fused into its conv
   (`FastConv2d.forward_gelu`). They are opaque to tracing, torch.compile and dispatch modes (FLOP
   counters), which therefore get route 2.
   1x1 convs of channels_last float32 maps keep oneDNN's forward and input gradient but get their
   weight gradient from one GEMM over all pixels (`_PointwiseConv`), faster than oneDNN's kernel
   at most VAN shapes.
2. PyTorch's own kernels, arranged to avoid their slow cases: bfloat16/autocast, other channel
   counts, and machines without a C compiler. Three things make VAN's depthwise convs slow in
   stock PyTorch (oneDNN):
   - a dilated depthwise conv has no fast kernel, and in channels_last it is slower still;
   - the NCHW backward of dense depthwise convs is many times slower than the channels_last one;
   - kernel taps whose offset exceeds the map (the 7x7 dilation-3 kernel on a 7x7 map) are
     computed over zero padding for nothing.
   The remedies, all exact (the same products, summed in a different order):
   - polyphase split: a conv with dilation d and 'same' padding d*r only ever combines pixels of
     the same residue (row mod d, col mod d). Splitting the input into its d*d phases, folding them
     into the batch and running a *dense* conv with padding r gives every output phase;
     interleaving the phases back gives the output. Dense depthwise convs have fast kernels.
   - dead-tap cropping: taps whose offset is at least the map size only ever see padding; they
     are cut from the kernel (their weight gradient is exactly zero, as in nn.Conv2d).
   - a hand-written backward for the dilated conv: the input gradient is a forward depthwise conv
     of the output gradient with the flipped kernel (polyphase-split too); the weight gradient
     comes from oneDNN on large phases and from one batched matmul on small ones.
   - channels_last for dense depthwise convs, whose NCHW backward is many times slower.

The choices were measured on the 2-core AMD EPYC (AVX2) CPU this repository is developed on; the
decision tables are next to `_BMM_MAX_AREA` (route 2) and `_native_ok` (route 1).

Both routes are FastConv2d's `conv2d_route` (`fast_conv2d_same`); how TorchScript and torch.fx meet them
is models/routed_conv.py's (scripted: F.conv2d; traced: one call that runs the routes as eager does).
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import compat, native_kernels
from .routed_conv import RoutedConv2d, plain_conv2d_same

__all__ = ['FastConv2d', 'fast_conv2d_same', 'depthwise_conv2d', 'polyphase_split', 'polyphase_merge']


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way (and is not also plain contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _phase_len(size: int, phase: int, d: int) -> int:
    return -(-(size - phase) // d)


def polyphase_split(x: torch.Tensor, d: int) -> torch.Tensor:
    """(N, C, H, W) -> (d*d*N, C, ceil(H/d), ceil(W/d)): phase (a, b) = x[..., a::d, b::d], zero-filled.

    Phases shorter than ceil(H/d) are padded with zeros at their end, which is exactly the
    conv's zero padding there. The result keeps x's memory format.
    """
    n, c, h, w = x.shape
    hq, wq = -(-h // d), -(-w // d)
    out = torch.zeros((d * d * n, c, hq, wq), dtype=x.dtype, device=x.device).contiguous(
        memory_format=_memory_format(x))
    phases = out.unflatten(0, (d, d, n))
    for a in range(d):
        for b in range(d):
            phases[a, b, :, :, :_phase_len(h, a, d), :_phase_len(w, b, d)].copy_(x[:, :, a::d, b::d])
    return out


def polyphase_merge(y: torch.Tensor, size: Tuple[int, int], d: int) -> torch.Tensor:
    """Inverse of `polyphase_split`: interleave the d*d phases of y back into an (N, C, H, W) map."""
    h, w = size
    n = y.shape[0] // (d * d)
    out = torch.empty((n, y.shape[1], h, w), dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
    phases = y.unflatten(0, (d, d, n))
    for a in range(d):
        for b in range(d):
            out[:, :, a::d, b::d].copy_(phases[a, b, :, :, :_phase_len(h, a, d), :_phase_len(w, b, d)])
    return out


def _live_radius(radius: int, size: int, d: int) -> int:
    """Largest tap radius whose offset d*r still reaches inside a map of `size` (others see padding only)."""
    return min(radius, (size - 1) // d)


def _weight_grad(x, grad, weight_shape, padding, dilation):
    """oneDNN's depthwise weight gradient alone (the input gradient is computed as a forward conv)."""
    x = x.to(grad.dtype)  # under autocast the saved input is float32 and the gradient bfloat16
    w = torch.empty(weight_shape, dtype=x.dtype, device=x.device)
    return torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], list(padding), [dilation, dilation], False, [0, 0], x.shape[1],
        [False, True, False])[1]


@functools.lru_cache(maxsize=32)
def _tap_matrix(height: int, width: int, kh: int, kw: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(kh*kw, P*P) 0/1 matrix, P = height*width: entry (tap, q*P + p) is 1 where input position q
    feeds output position p through that tap of a 'same' stride-1 conv (positions row-major)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
    out_pos = (rows * width + cols).flatten()
    area = height * width
    taps = torch.zeros(kh * kw, area * area, dtype=dtype)
    for i in range(kh):
        for j in range(kw):
            r, c = rows + i - kh // 2, cols + j - kw // 2
            inside = ((r >= 0) & (r < height) & (c >= 0) & (c < width)).flatten()
            in_pos = (r * width + c).flatten()
            taps[i * kw + j, in_pos[inside] * area + out_pos[inside]] = 1
    return taps.to(device)


def _weight_grad_bmm(xs: torch.Tensor, gs: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Depthwise weight gradient of a dense 'same' conv on small maps, as one batched matmul.

    For each channel, the (input position x output position) correlation matrix X^T G summed over
    the batch holds every product the weight gradient needs; each tap sums one of its diagonals,
    picked out by `_tap_matrix`. On small maps this is a few GEMMs instead of oneDNN's slow
    small-map weight-gradient kernel.
    """
    batch, channels, height, width = xs.shape
    area = height * width
    x = xs.to(gs.dtype).permute(1, 0, 2, 3).reshape(channels, batch, area)
    g = gs.permute(1, 0, 2, 3).reshape(channels, batch, area)
    corr = torch.bmm(x.transpose(1, 2), g).view(channels, area * area)
    taps = _tap_matrix(height, width, kh, kw, gs.dtype, gs.device)
    return (corr @ taps.t()).view(channels, 1, kh, kw)


# Decision table, measured on the 2-core AMD EPYC (AVX2), torch 2.14.1, van_b0 shapes at batch 32,
# freed host memory kept (utils/device.py keep_freed_host_memory) so that page faults do not blur
# the kernels' cost; ms, median of 5:
#   7x7 dilation-3 depthwise          forward+backward    weight gradient alone
#                                     NCHW native, ours   NCHW native  polyphase oneDNN  polyphase bmm
#     32ch 56x56  (phases 19x19)          -                  136           28.5            60.9
#     64ch 28x28  (phases 10x10)          -                   78           21.4            19.9
#     160ch 14x14 (phases 5x5)          91.9                  30           79.0            10.8
#     256ch 7x7   (phases 3x3, 5x5 live) 22.3                 18           84.9             8.2
#   The polyphase forward (a dense conv on the phases) is the fastest forward at every size
#   (160ch 14x14: 4.9 ms, against about 25 ms for oneDNN's NCHW dilated kernel), and so is the
#   input gradient, which is the same forward conv with the flipped kernel.
#   dense 5x5 / 3x3 depthwise: channels_last native beats NCHW native at every shape (e.g. 5x5 64ch
#     28x28: 40/160 vs 23/10400; 3x3 512ch 28x28: 194/546 vs 534/1203), and a hand-written backward
#     did not beat channels_last's (3x3 512ch 28x28: 197/660).
# So: dilated convs always take the polyphase route; their weight gradient comes from the batched
# matmul when a phase has at most _BMM_MAX_AREA pixels, from oneDNN otherwise; dense depthwise convs
# run in channels_last.
_BMM_MAX_AREA = 10 * 10


class _DilatedDepthwiseConv(torch.autograd.Function):
    """Stride-1 'same' depthwise conv with dilation > 1 by polyphase split, dead taps cut, own backward."""

    # The fast route runs on CPU only. Under autocast the forward's convs run in bfloat16 while the
    # saved weight stays float32: custom_bwd replays the forward's autocast state in backward so the
    # backward convs see matching dtypes (autograd casts the returned gradients to the inputs' dtypes).
    @staticmethod
    @compat.custom_fwd('cpu')
    def forward(ctx, x, weight, bias, dilation):
        n, c, h, w = x.shape
        kh, kw = weight.shape[-2:]
        rh = _live_radius(kh // 2, h, dilation)
        rw = _live_radius(kw // 2, w, dilation)
        live = weight[:, :, kh // 2 - rh:kh // 2 + rh + 1, kw // 2 - rw:kw // 2 + rw + 1]
        # Dense convs are fastest in channels_last; the phases are folded into the batch.
        xs = polyphase_split(x.contiguous(memory_format=torch.channels_last), dilation)
        y = polyphase_merge(F.conv2d(xs, live, bias, 1, (rh, rw), 1, c), (h, w), dilation)
        ctx.save_for_backward(xs, live)
        ctx.meta = (dilation, (rh, rw), (kh, kw), (h, w), _memory_format(x))
        return y.contiguous(memory_format=ctx.meta[-1])

    @staticmethod
    @compat.custom_bwd('cpu')
    def backward(ctx, grad):
        xs, live = ctx.saved_tensors
        dilation, (rh, rw), (kh, kw), size, memory_format = ctx.meta
        c = xs.shape[1]
        grad = grad.contiguous(memory_format=torch.channels_last)
        gs = polyphase_split(grad, dilation)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # d(conv)/dx is the conv of the output gradient with the flipped kernel: a forward conv,
            # which oneDNN runs much faster than its own backward-data kernel for these shapes.
            gx = F.conv2d(gs, live.flip(-1, -2), None, 1, (rh, rw), 1, c)
            grad_x = polyphase_merge(gx, size, dilation).contiguous(memory_format=memory_format)
        if ctx.needs_input_grad[1]:
            if gs.shape[2] * gs.shape[3] <= _BMM_MAX_AREA:
                gw_live = _weight_grad_bmm(xs, gs, 2 * rh + 1, 2 * rw + 1)
            else:
                gw_live = _weight_grad(xs, gs, live.shape, (rh, rw), 1)
            if (rh, rw) == (kh // 2, kw // 2):
                grad_w = gw_live
            else:  # cut taps only ever multiplied zero padding: their gradient is exactly zero
                grad_w = gw_live.new_zeros((c, 1, kh, kw))
                grad_w[:, :, kh // 2 - rh:kh // 2 + rh + 1, kw // 2 - rw:kw // 2 + rw + 1] = gw_live
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


class _NativeDepthwiseConv(torch.autograd.Function):
    """Stride-1 'same' depthwise conv (any dilation) by the C kernels of models/native_kernels.py,
    optionally followed by GELU in the same pass (the MLP's dwconv + act).

    Taps that reach outside the map are skipped inside the kernels, so there is nothing to crop;
    the input gradient is the forward kernel run on the output gradient with the flipped weights.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dilation, with_gelu):
        c, _, k, _ = weight.shape
        memory_format = _memory_format(x)
        x = x.contiguous(memory_format=torch.channels_last)
        y = native_kernels.conv_forward(x, weight.reshape(c, k * k).t(), bias, dilation, with_gelu)
        if with_gelu:
            pre, y = y
            ctx.save_for_backward(x, weight, pre)
        else:
            ctx.save_for_backward(x, weight)
        ctx.meta = (dilation, memory_format, bias is not None, with_gelu)
        return y.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):
        x, weight, *pre = ctx.saved_tensors
        dilation, memory_format, has_bias, with_gelu = ctx.meta
        c, _, k, _ = weight.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        if with_gelu:
            grad = native_kernels.gelu_backward(pre[0], grad)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(-1, -2).reshape(c, k * k).t()
            grad_x = native_kernels.conv_forward(grad, flipped, None, dilation).contiguous(
                memory_format=memory_format)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            taps, grad_b = native_kernels.conv_weight_grad(x, grad, k, dilation, has_bias and ctx.needs_input_grad[2])
            grad_w = taps.t().reshape(c, 1, k, k) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad_b, None, None


# Route 1 against route 2: FastConv2d at van_b0 shapes, batch 32, float32, channels_last, ms per call
# (forward | backward: input, weight and bias gradients), medians of 6 interleaved rounds in one
# process, 2-core AMD EPYC (AVX2), torch 2.14.1:
#                            native         PyTorch route
#   5x5      32ch 56x56     3.1 |  7.3      3.8 | 33.5   (oneDNN channels_last)
#   7x7 d3   32ch 56x56     6.0 | 14.3     17.7 | 47.6   (polyphase)
#   3x3     256ch 56x56    19.3 | 42.6     30.4 | 55.1   (oneDNN channels_last)
#   7x7 d3   64ch 28x28     3.1 |  7.3      8.8 | 33.9
#   3x3     512ch 28x28    12.9 | 30.7     13.9 | 40.4
#   7x7 d3  160ch 14x14     1.7 |  3.6      4.5 | 15.6
#   7x7 d3  256ch 7x7       0.7 |  1.3      2.9 | 13.8
# The native kernels win at every VAN shape. The MLP's GELU is fused into its conv besides (PyTorch's
# takes about 28 ms forward and 38 ms backward on the 256ch 56x56 map). Whole van_b0 training step:
# README, from `tools/benchmark.py --impls plain,fast-no-native,fast`.
def _native_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C kernels take this call: they are opaque to tracing, compiling and dispatch
    modes (FLOP counters), which then see PyTorch's own ops instead."""
    kh, kw = weight.shape[-2:]
    return (kh == kw and weight.dtype == x.dtype and native_kernels.supports(x)
            and not torch.jit.is_tracing() and not compat.is_compiling()
            and not compat.in_dispatch_mode())


# 1x1 convs, channels_last, batch 32, float32, ms (oneDNN: its weight + bias gradient | ours: GEMM
# weight gradient + bias sum), 2-core AMD EPYC, torch 2.14.1:
#    32->32 @56 5.1 | 3.6    32->256 @56 31.1 | 23.6    256->32 @56 22.4 | 27.3
#    64->64 @28 3.5 | 2.8    64->512 @28 22.7 | 18.8    512->64 @28 18.6 | 19.7
#   160->160@14 6.6 | 3.2   160->640 @14 14.5 | 10.3    640->160@14 13.0 |  9.9
#   256->256 @7 3.1 | 1.9   256->1024 @7 12.2 |  6.7   1024->256 @7 10.3 |  6.5
# The GEMM wins unless the conv reduces channels 8-fold (the MLP's fc2 in stages 1-2).
_POINTWISE_MAX_RATIO = 8


def _pointwise_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 1x1 conv takes _PointwiseConv: a float32 channels_last CPU map outside autocast,
    tracing and compiling, with a backward to come (its forward is F.conv2d's)."""
    return (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and x.device.type == 'cpu' and x.dim() == 4 and x.dtype == weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last) and not compat.autocast_enabled('cpu')
            and not torch.jit.is_tracing() and not compat.is_compiling())


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, dilation: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, 1, dilation * (k // 2), dilation, C) for a depthwise weight (C, 1, k, k).

    The result has x's memory format; only the route differs (see the decision table above).
    """
    if _native_ok(x, weight):
        return _NativeDepthwiseConv.apply(x, weight, bias, dilation, False)
    if dilation > 1:
        return _DilatedDepthwiseConv.apply(x, weight, bias, dilation)
    # Dense depthwise convs: oneDNN's channels_last kernels (forward and backward) are the fastest
    # measured; an NCHW input is converted there and back (autograd turns the copies around).
    memory_format = _memory_format(x)
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, 1, (kh // 2, kw // 2), 1,
                 weight.shape[0])
    return y.contiguous(memory_format=memory_format)


class _PointwiseConv(torch.autograd.Function):
    """1x1 conv of a channels_last CPU map: oneDNN's forward and input gradient, and the weight
    gradient as one GEMM over all pixels (oneDNN's 1x1 weight-gradient kernel is the slow part of
    its backward at most VAN shapes; table next to `_pointwise_ok`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        out_channels, in_channels = weight.shape[:2]
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        pixels_grad = grad.permute(0, 2, 3, 1).reshape(-1, out_channels)  # a view: channels_last
        if ctx.needs_input_grad[1]:
            pixels_x = x.permute(0, 2, 3, 1).reshape(-1, in_channels)
            grad_w = (pixels_grad.t() @ pixels_x).view(out_channels, in_channels, 1, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = pixels_grad.sum(0)
        return grad_x, grad_w, grad_b


def fast_conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                     depthwise: bool, gelu: bool) -> torch.Tensor:
    """plain_conv2d_same(x, weight, bias, dilation, depthwise), then GELU if `gelu`, by the fastest route."""
    if depthwise and x.device.type == 'cpu' and x.dim() == 4 and not compat.is_compiling():
        # Under torch.compile the compiler picks its own kernels; the autograd.Function would only
        # break its graph.
        if gelu and _native_ok(x, weight):  # CPU, 4-D, not compiling: checked above
            return _NativeDepthwiseConv.apply(x, weight, bias, dilation, True)
        y = depthwise_conv2d(x, weight, bias, dilation)
    elif not depthwise and _pointwise_ok(x, weight):
        y = _PointwiseConv.apply(x, weight, bias)
    else:
        y = plain_conv2d_same(x, weight, bias, dilation, depthwise)
    return F.gelu(y) if gelu else y


class FastConv2d(RoutedConv2d):
    """nn.Conv2d that takes the fast CPU path for stride-1 'same' depthwise convs and 1x1 convs,
    nn.Conv2d otherwise.

    On other devices (CUDA, NPU) the vendor libraries' own depthwise kernels are used unchanged:
    cuDNN has fast dilated depthwise kernels, so the CPU remedies would only add copies there.
    TorchScript and torch.fx meet it as models/routed_conv.py describes; `forward_gelu` fuses the
    MLP's GELU into its conv where the C kernels run.
    """

    scripting_note = ('its fast CPU routes and native kernels are Python-only; CPU training and inference are '
                      'slower than eager')

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routed_depthwise = self.same_depthwise()
        kh, kw = self.kernel_size
        self.routed_pointwise = (
            (kh, kw) == (1, 1) and self.groups == 1 and self.stride == (1, 1) and self.padding == (0, 0)
            and self.dilation == (1, 1) and self.padding_mode == 'zeros'
            and self.in_channels < _POINTWISE_MAX_RATIO * self.out_channels)

    conv2d_route = staticmethod(fast_conv2d_same)

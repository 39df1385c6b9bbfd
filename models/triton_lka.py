"""Triton kernels for VAN's depthwise convolutions on CUDA (`lka_impl='triton'`): opt-in, not yet measured.

What they compute is exactly nn.Conv2d's stride-1 'same' depthwise convolution (the LKA's 5x5 and
7x7 dilation-3 convs, and the MLP's 3x3 conv with its GELU fused in), forward and backward, on
channels_last maps in float16, bfloat16 or float32, accumulating in float32.

Why: on CUDA, PyTorch sends a depthwise conv to cuDNN only for channels_last inputs, or for NCHW
float16 inputs that are not dilated (aten/src/ATen/native/Convolution.cpp, ConvParams::use_cudnn_depthwise,
pytorch/pytorch@954cecd: "always use cudnn_depthwise for channels_last format"; the NCHW branch requires
`input.scalar_type() == kHalf` and `!is_dilated()`). Everything else runs PyTorch's own kernels
(aten/src/ATen/native/cuda/DepthwiseConv2d.cu, pytorch/pytorch@989f691: conv_depthwise2d_grad_weight_out
launches `blocks = outputChannels * kH * kW`, each reducing over all N*H*W pixels, so input and gradient
are re-read K*K times; the forward is specialised for 1x1 and 3x3 kernels only). And
torch.compile calls depthwise convs and `convolution_backward` as external kernels, so they are not
fused with the GELU next to them. These kernels read each channels_last map once per tap from cache,
reduce the weight gradient per pixel chunk (one read of input and gradient), and fuse the MLP's GELU
into its conv (forward) and the GELU derivative into the backward.

Design:
- One conv kernel (`_conv_kernel`): a program computes BLOCK_P pixels x BLOCK_C channels; each tap loads
  a (pixels x channels) tile, contiguous along channels. Its epilogue adds the bias and, on request,
  applies GELU (forward) or multiplies an incoming gradient by GELU's derivative at the recomputed
  pre-activation (backward), so the MLP never stores its pre-GELU map.
- The input gradient is the same conv of the output gradient with the flipped kernel (stride 1, 'same'
  padding).
- The weight gradient (`_weight_grad_kernel`): each program reduces a chunk of pixels for BLOCK_C channels
  and every tap at once (a pixels x taps x channels gather), writing float32 partial sums that one
  `sum` adds up: deterministic, no atomics. The bias gradient comes from the same pass.
- Registered as torch.library custom ops (`van_triton::*`) with autograd and fake (meta) functions, so
  torch.compile traces through them and fuses the elementwise code around them.

Status: correctness is tested on CPU with Triton's interpreter (test/unit/test_triton_lka.py,
TRITON_INTERPRET=1, against nn.Conv2d in float64). Tile sizes are first choices, not tuned; the speed is
unmeasured until `bash tools/gpu_benchmark.sh` runs on a GPU, so nothing selects this implementation by
default.

Triton decides between compiling and interpreting when a function is decorated (`triton.jit` reads
TRITON_INTERPRET at that moment), and its own library functions (`tl.zeros`, `tl.sum`, ...) are decorated
when triton is imported - which timm, and so `import models`, does. The interpreter therefore needs
TRITON_INTERPRET=1 in the environment before anything imports triton (test/unit/conftest.py sets it on
machines without a CUDA device). This module decorates its kernels on first use, in the mode then in force.
"""
from __future__ import annotations  # the kernels' `tl.constexpr` annotations stay unevaluated text, as Triton reads them

import contextlib
import functools
import os
import types
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import compat
from .routed_conv import RoutedConv2d, plain_conv2d_same

__all__ = ['TritonConv2d', 'available', 'unavailable_reason', 'depthwise_conv']

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
    """Why the Triton kernels cannot run here ('' when they can)."""
    reason = compat.custom_ops_reason()
    if reason:
        return reason
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # ImportError, or a broken install that fails while importing
        return (f'the triton package cannot be imported ({type(error).__name__}: {error}); install the '
                f'triton release that matches torch {torch.__version__} (CUDA builds of torch ship one)')
    return ''


def available() -> bool:
    return not unavailable_reason()


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def _library_interpreted() -> bool:
    """Whether triton was imported in interpreter mode (its own jit functions, e.g. tl.zeros, interpreted)."""
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction
    zeros = getattr(triton.language.standard, 'zeros', None)
    return zeros is None or isinstance(zeros, InterpretedFunction)


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions, decorated by `_kernels` in the mode Triton is in when first used)
# ---------------------------------------------------------------------------------------------
def _conv_kernel(x_ptr, w_ptr, b_ptr, g_ptr, y_ptr, pixels, height, width, channels,
                 KSIZE: tl.constexpr, DILATION: tl.constexpr, HAS_BIAS: tl.constexpr,
                 EPILOGUE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[p, c] = epilogue(sum_taps w[tap, c] * x[p + offset(tap), c] + b[c]) on channels_last maps.

    x, g, y: (pixels, channels) rows of an (N, H, W, C) map; w: (KSIZE*KSIZE, channels).
    EPILOGUE 0: none; 1: GELU; 2: y = g * GELU'(pre) (the backward of the fused GELU).
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < pixels
    c_ok = c < channels
    col = p % width
    row = (p // width) % height
    image = p // (width * height)
    radius = KSIZE // 2
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KSIZE):
        src_row = row + (i - radius) * DILATION
        row_ok = p_ok & (src_row >= 0) & (src_row < height)
        for j in tl.static_range(KSIZE):
            src_col = col + (j - radius) * DILATION
            ok = row_ok & (src_col >= 0) & (src_col < width)
            src = (image * height + src_row) * width + src_col
            xv = tl.load(x_ptr + src[:, None] * channels + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + (i * KSIZE + j) * channels + c, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out = p[:, None] * channels + c[None, :]
    out_ok = p_ok[:, None] & c_ok[None, :]
    if EPILOGUE == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if EPILOGUE == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        pdf = tl.exp(-0.5 * acc * acc) * 0.3989422804014327
        g = tl.load(g_ptr + out, mask=out_ok, other=0.0).to(tl.float32)
        acc = g * (cdf + acc * pdf)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def _weight_grad_kernel(x_ptr, g_ptr, wg_ptr, bg_ptr, pixels, height, width, channels, chunk_pixels,
                        KSIZE: tl.constexpr, DILATION: tl.constexpr, TAPS_PAD: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sums over one chunk of pixels: wg[chunk, tap, c] = sum_p g[p, c] * x[p + offset(tap), c],
    bg[chunk, c] = sum_p g[p, c]. chunk_pixels is a multiple of BLOCK_P."""
    chunk = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    tap = tl.arange(0, TAPS_PAD)
    tap_ok = tap < KSIZE * KSIZE
    radius = KSIZE // 2
    tap_dy = (tap // KSIZE - radius) * DILATION
    tap_dx = (tap % KSIZE - radius) * DILATION
    acc = tl.zeros((TAPS_PAD, BLOCK_C), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = chunk.to(tl.int64) * chunk_pixels
    for offset in range(0, chunk_pixels, BLOCK_P):
        p = first + offset + tl.arange(0, BLOCK_P)
        p_ok = p < pixels
        col = p % width
        row = (p // width) % height
        image = p // (width * height)
        g = tl.load(g_ptr + p[:, None] * channels + c[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        src_row = row[:, None] + tap_dy[None, :]
        src_col = col[:, None] + tap_dx[None, :]
        ok = (p_ok[:, None] & tap_ok[None, :] & (src_row >= 0) & (src_row < height)
              & (src_col >= 0) & (src_col < width))
        src = (image[:, None] * height + src_row) * width + src_col
        xv = tl.load(x_ptr + src[:, :, None] * channels + c[None, None, :],
                     mask=ok[:, :, None] & c_ok[None, None, :], other=0.0)
        acc += tl.sum(xv.to(tl.float32) * g[:, None, :], axis=0)
        acc_bias += tl.sum(g, axis=0)
    tl.store(wg_ptr + (chunk * KSIZE * KSIZE + tap)[:, None] * channels + c[None, :], acc,
             mask=tap_ok[:, None] & c_ok[None, :])
    tl.store(bg_ptr + chunk * channels + c, acc_bias, mask=c_ok)


# triton.language, bound when the kernels are first decorated: the kernels name it as a global.
tl = None


@functools.lru_cache(maxsize=2)
def _compiled_kernels(interpret: bool) -> types.SimpleNamespace:
    global tl
    import triton
    import triton.language
    tl = triton.language
    return types.SimpleNamespace(conv=triton.jit(_conv_kernel), weight_grad=triton.jit(_weight_grad_kernel))


def _kernels() -> types.SimpleNamespace:
    """The kernels, jitted for the mode Triton is in now (compiled for CUDA, or interpreted on CPU)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"lka_impl 'triton': {reason}")
    interpret = compat.triton_interpreting()
    if interpret and not _library_interpreted():
        raise RuntimeError('TRITON_INTERPRET=1 was set after triton was imported (timm imports it); set it in the '
                           'environment before starting Python')
    return _compiled_kernels(interpret)


# ---------------------------------------------------------------------------------------------
# Tile sizes. First choices, not tuned on a GPU (tools/gpu_benchmark.sh measures the result): a conv
# tile of 4096 float32 accumulators (32 per thread at 4 warps), 64 channels = one 128-byte line of a
# half-precision pixel. Under the interpreter every program costs Python overhead, so tiles cover as
# much of the (tiny) test maps as possible.
# ---------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def conv_tiles(pixels: int, channels: int) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the conv kernel."""
    if interpreting():
        block_c = min(128, _pow2(channels))
        return min(_pow2(pixels), max(16, 65536 // block_c)), block_c
    block_c = min(64, _pow2(channels))
    return max(16, 4096 // block_c), block_c


def weight_grad_tiles(pixels: int, channels: int, taps_pad: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, number of pixel chunks) of the weight-gradient kernel."""
    if interpreting():
        block_c = min(64, _pow2(channels))
        block_p = min(_pow2(pixels), max(1, (1 << 20) // (taps_pad * block_c)))
        return block_p, block_c, 1
    block_c = min(32, _pow2(channels))
    block_p = max(1, 8192 // (taps_pad * block_c))
    # Enough programs to fill the GPU several times over; each then reduces a long run of pixels.
    programs = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    chunks = max(1, min(-(-pixels // block_p), programs // -(-channels // block_c)))
    return block_p, block_c, chunks


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' (several GPUs in one process)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, K, K) -> (K*K, C): a tap's weights for all channels are contiguous, like the map's pixels."""
    channels, _, kh, kw = weight.shape
    return weight.reshape(channels, kh * kw).t().contiguous()


def _run_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
              epilogue: int, grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    kernels = _kernels()
    x = _channels_last(x)
    n, c, h, w = x.shape
    out_dtype = grad.dtype if grad is not None else x.dtype
    y = torch.empty_like(x, dtype=out_dtype, memory_format=torch.channels_last)
    grad = _channels_last(grad) if grad is not None else y
    pixels = n * h * w
    block_p, block_c = conv_tiles(pixels, c)
    grid = (-(-pixels // block_p), -(-c // block_c))
    with _on_device(x):
        kernels.conv[grid](x, _taps(weight), bias if bias is not None else y, grad, y, pixels, h, w, c,
                           KSIZE=weight.shape[-1], DILATION=dilation, HAS_BIAS=bias is not None, EPILOGUE=epilogue,
                           BLOCK_P=block_p, BLOCK_C=block_c)
    return y


def _check(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> None:
    c, one, kh, kw = weight.shape
    if x.dim() != 4 or x.shape[1] != c or one != 1 or kh != kw or kh % 2 == 0 or dilation < 1:
        raise ValueError(f'van_triton ops take an (N, C, H, W) map and a (C, 1, K, K) depthwise weight with odd K; '
                         f'got {tuple(x.shape)} and {tuple(weight.shape)}, dilation {dilation}')
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f'van_triton ops support float16, bfloat16 and float32 maps, got {x.dtype}')
    if x.device.type == 'cpu' and not interpreting():
        raise RuntimeError('van_triton ops run on CUDA tensors, or on CPU tensors only under Triton\'s '
                           'interpreter (TRITON_INTERPRET=1)')


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to autograd and torch.compile, which see their fake functions and the
# registered backward.
# ---------------------------------------------------------------------------------------------
# Registered at import where torch has torch.library.custom_op (2.4+, models/compat.py): importing this module
# must work on every supported torch, and a registration first met inside torch.compile would break its graph.
def _define_ops() -> types.SimpleNamespace:
    """The custom ops (call once per process)."""
    @torch.library.custom_op('van_triton::dwconv', mutates_args=())
    def _dwconv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                gelu: bool) -> torch.Tensor:
        """Stride-1 'same' depthwise conv (+ GELU); the result is channels_last, in x's dtype."""
        _check(x, weight, dilation)
        return _run_conv(x, weight, bias, dilation, 1 if gelu else 0)


    @_dwconv.register_fake
    def _(x, weight, bias, dilation, gelu):
        return torch.empty_like(x, memory_format=torch.channels_last)


    @torch.library.custom_op('van_triton::dwconv_input_grad', mutates_args=())
    def _dwconv_input_grad(grad: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        """Input gradient of the depthwise conv: the same conv of `grad` with the flipped kernel."""
        _check(grad, weight, dilation)
        return _run_conv(grad, weight.flip(-1, -2), None, dilation, 0)


    @_dwconv_input_grad.register_fake
    def _(grad, weight, dilation):
        return torch.empty_like(grad, memory_format=torch.channels_last)


    @torch.library.custom_op('van_triton::dwconv_gelu_grad', mutates_args=())
    def _dwconv_gelu_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          dilation: int) -> torch.Tensor:
        """grad * GELU'(conv(x) + bias): the gradient at the fused GELU's input, the conv recomputed."""
        _check(x, weight, dilation)
        return _run_conv(x, weight, bias, dilation, 2, grad=grad)


    @_dwconv_gelu_grad.register_fake
    def _(grad, x, weight, bias, dilation):
        return torch.empty_like(grad, memory_format=torch.channels_last)


    @torch.library.custom_op('van_triton::dwconv_weight_grad', mutates_args=())
    def _dwconv_weight_grad(grad: torch.Tensor, x: torch.Tensor, kernel_size: int,
                            dilation: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight gradient (C, 1, K, K), bias gradient (C,)) in float32."""
        _check(x, x.new_empty((x.shape[1], 1, kernel_size, kernel_size)), dilation)
        kernels = _kernels()
        x, grad = _channels_last(x), _channels_last(grad)
        n, c, h, w = x.shape
        pixels, taps = n * h * w, kernel_size * kernel_size
        taps_pad = _pow2(taps)
        block_p, block_c, chunks = weight_grad_tiles(pixels, c, taps_pad, x.device)
        chunk_pixels = -(-(-(-pixels // chunks)) // block_p) * block_p
        chunks = -(-pixels // chunk_pixels)
        partial_w = torch.empty((chunks, taps, c), dtype=torch.float32, device=x.device)
        partial_b = torch.empty((chunks, c), dtype=torch.float32, device=x.device)
        with _on_device(x):
            kernels.weight_grad[(chunks, -(-c // block_c))](
                x, grad, partial_w, partial_b, pixels, h, w, c, chunk_pixels, KSIZE=kernel_size, DILATION=dilation,
                TAPS_PAD=taps_pad, BLOCK_P=block_p, BLOCK_C=block_c)
        return partial_w.sum(0).t().reshape(c, 1, kernel_size, kernel_size).contiguous(), partial_b.sum(0)


    @_dwconv_weight_grad.register_fake
    def _(grad, x, kernel_size, dilation):
        c = x.shape[1]
        return (x.new_empty((c, 1, kernel_size, kernel_size), dtype=torch.float32),
                x.new_empty((c,), dtype=torch.float32))


    def _setup_context(ctx, inputs, output):
        x, weight, bias, dilation, gelu = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.dilation, ctx.gelu = dilation, gelu


    def _backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if ctx.gelu:
            grad = _dwconv_gelu_grad(grad, x, weight, bias, ctx.dilation)
        grad_x = _dwconv_input_grad(grad, weight, ctx.dilation) if needs_x else None
        grad_w = grad_b = None
        if needs_w or needs_b:
            grad_w, grad_b = _dwconv_weight_grad(grad, x, weight.shape[-1], ctx.dilation)
            grad_w = grad_w.to(weight.dtype) if needs_w else None
            grad_b = grad_b.to(bias.dtype) if needs_b else None
        return grad_x, grad_w, grad_b, None, None


    _dwconv.register_autograd(_backward, setup_context=_setup_context)
    return types.SimpleNamespace(dwconv=_dwconv, dwconv_input_grad=_dwconv_input_grad,
                                 dwconv_gelu_grad=_dwconv_gelu_grad, dwconv_weight_grad=_dwconv_weight_grad)


_OPS = None if compat.custom_ops_reason() else _define_ops()


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                   gelu: bool = False) -> torch.Tensor:
    """F.conv2d(x, weight, bias, 1, dilation * (K // 2), dilation, C), then GELU if `gelu`, by the Triton kernels.

    Under autocast the map is cast to the autocast dtype, as nn.Conv2d's inputs are; the weights keep
    their dtype (the kernels read them into float32 accumulators either way), so their gradients stay
    float32. The result is channels_last.
    """
    if compat.autocast_enabled(x.device.type):
        x = x.to(compat.autocast_dtype(x.device.type))
    return _OPS.dwconv(x, weight, bias, dilation, gelu)


_cpu_fallback_said = False


def _say_cpu_fallback(device: torch.device) -> None:
    global _cpu_fallback_said
    if not _cpu_fallback_said:
        _cpu_fallback_said = True
        warnings.warn(f"lka_impl='triton': the Triton kernels run on CUDA (on CPU only under TRITON_INTERPRET=1); "
                      f"running nn.Conv2d's kernels on {device} instead", stacklevel=4)


def _use_triton(x: torch.Tensor) -> bool:
    """Whether the kernels take this map: 4-D, a supported (autocast) dtype, on CUDA or in the interpreter."""
    if x.dim() != 4:
        return False
    dtype = compat.autocast_dtype(x.device.type) if compat.autocast_enabled(x.device.type) else x.dtype
    if dtype not in _SUPPORTED_DTYPES:
        return False
    if x.device.type == 'cuda':
        return True
    if x.device.type == 'cpu' and interpreting():
        return True
    _say_cpu_fallback(x.device)
    return False


def _triton_route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                  depthwise: bool, gelu: bool) -> torch.Tensor:
    if _use_triton(x):
        return depthwise_conv(x, weight, bias, dilation, gelu)
    y = plain_conv2d_same(x, weight, bias, dilation, True)
    return F.gelu(y) if gelu else y


class TritonConv2d(RoutedConv2d):
    """nn.Conv2d whose stride-1 'same' depthwise convs run the Triton kernels on CUDA; any other conv
    (the 1x1 projections), device or dtype runs nn.Conv2d's own forward.

    Parameters are nn.Conv2d's (`weight`, `bias`), so every checkpoint loads. `forward_gelu` is the MLP's
    GELU(dwconv(x)) in one kernel.
    """

    scripting_note = 'its Triton kernels are custom ops that TorchScript cannot call'

    def __init__(self, *args, **kwargs):
        reason = unavailable_reason()
        if reason:
            raise ValueError(f"lka_impl 'triton' is unavailable: {reason}; choose another --lka-impl")
        super().__init__(*args, **kwargs)
        self.routed_depthwise = self.same_depthwise() and self.kernel_size[0] == self.kernel_size[1]

    conv2d_route = staticmethod(_triton_route)

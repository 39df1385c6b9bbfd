"""Export a VAN checkpoint to ONNX for deployment (the ModelZoo path: ONNX opset 11, then Ascend ATC).

    python tools/export_onnx.py output/my-run/model_best.pth.tar            # -> output/my-run/model_best.onnx
    python tools/export_onnx.py van_tiny_754.pth.tar --model van_b0 --out van_b0.onnx --fold-bn

The graph has one input `image` (N, 3, H, W), float32, and one output `class` (N, num_classes) of
logits; the batch dimension N is dynamic, H and W are fixed at export (`--img-size`, default the
size the run trained at, else the model's 224). The input is what evaluation feeds the model: the
image decoded as utils.images.load_rgb does and preprocessed by utils.images.eval_transform with the
run's options (utils.inference.eval_preprocessing); the tool prints that preprocessing (resize,
crop, mean, std) for the deployment to repeat. The checkpoint may be any file the models package
reads; the variant comes from the file (`arch`, `args['model']`, or the weights' shapes) unless
`--model` is given.

The exported graph is run with onnxruntime at two batch sizes and compared with PyTorch; when the
largest absolute difference exceeds `--atol` (1e-4) the export fails (exit status 1) and the output
file is not written (an earlier file of that name is left as it was).

`--fold-bn` folds BatchNorm layers into neighbouring convolutions where that is exact in eval mode:
- each patch embedding's BatchNorm into the convolution before it;
- each block's `norm2` into the MLP's first 1x1 convolution `fc1`, its only consumer.
Each block's `norm1` stays: its output feeds `attn.proj_1` and also the attention's own shortcut
(`attn(u) = proj_2(...proj_1(u)) + u`), so folding it into `proj_1` would change the shortcut.
"""
import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import compat  # noqa: E402
from models.van import Block, OverlapPatchEmbed  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.inference import eval_preprocessing, load_model  # noqa: E402
from utils.options import IMG_SIZE  # noqa: E402

INPUT_NAME, OUTPUT_NAME = 'image', 'class'
# Opsets the TorchScript exporter writes for this model (9: constant folding; 20: the exporter's newest).
OPSETS = range(9, 21)


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------
def _bn_scale_shift(bn: nn.BatchNorm2d):
    """Eval-mode BatchNorm as y = scale * x + shift (per channel), in float64 to keep the fold exact."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError('BatchNorm without running statistics normalises with batch statistics; cannot fold')
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=torch.float64, device=conv.weight.device)
    return conv.bias.double()


def _set_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    conv.weight.data = weight.to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    else:
        conv.bias.data = bias.to(conv.bias.dtype)


def fold_bn_after_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """bn(conv(x)) == conv'(x): scale each output channel's filter and bias."""
    scale, shift = _bn_scale_shift(bn)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    _set_conv(conv, weight, _conv_bias(conv) * scale + shift)


def fold_bn_before_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
    """conv(bn(x)) == conv'(x) for a dense convolution without padding.

    Padding would be wrong: the original conv pads bn(x) with zeros, the folded one pads x with zeros,
    which bn maps to `shift`, not zero. A grouped conv would mix the wrong input channels' factors.
    """
    if conv.groups != 1 or any(p != 0 for p in conv.padding) or conv.padding_mode != 'zeros':
        raise ValueError('BatchNorm folds into the following convolution only when it is dense and unpadded')
    scale, shift = _bn_scale_shift(bn)
    weight = conv.weight.double()
    bias = _conv_bias(conv) + (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    _set_conv(conv, weight * scale.view(1, -1, 1, 1), bias)


def fold_batchnorms(model: nn.Module) -> list:
    """Fold every BatchNorm of a VAN that can be folded exactly (see the module docstring), in place.

    The folded BatchNorms become nn.Identity. Returns their names. The model must be in eval mode:
    folding uses the running statistics.
    """
    if model.training:
        raise ValueError('fold BatchNorm only in eval mode (call model.eval() first)')
    folded = []
    for name, module in list(model.named_modules()):
        if isinstance(module, OverlapPatchEmbed) and isinstance(module.norm, nn.BatchNorm2d):
            fold_bn_after_conv(module.proj, module.norm)
            module.norm = nn.Identity()
            folded.append(f'{name}.norm')
        elif isinstance(module, Block) and isinstance(module.norm2, nn.BatchNorm2d):
            fold_bn_before_conv(module.norm2, module.mlp.fc1)
            module.norm2 = nn.Identity()
            folded.append(f'{name}.norm2')
    return folded


# ---------------------------------------------------------------------------------------------
# Export and verification
# ---------------------------------------------------------------------------------------------
def export(model: nn.Module, out_path, img_size, opset: int = 11) -> None:
    """Write `model` (eval mode) as ONNX with a dynamic batch dimension."""
    height, width = img_size
    example = torch.randn(2, 3, height, width)
    # The TorchScript exporter (named explicitly where torch also has the dynamo one) writes opset 11 directly (the torch.export-based one
    # targets opset 18 and needs onnxscript); Ascend ATC and older runtimes want opset 11.
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one; that is the choice above.
        warnings.filterwarnings('ignore', category=DeprecationWarning, message='.*TorchScript-based ONNX export')
        torch.onnx.export(
            model, (example,), str(out_path), opset_version=opset, **compat.onnx_export_kwargs(),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}},
            do_constant_folding=True)


def max_abs_diff_onnxruntime(onnx_path, reference: nn.Module, img_size, batch_sizes=(1, 3), seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| over random inputs at each of `batch_sizes` (checks the dynamic batch)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        x = torch.randn(batch, 3, *img_size, generator=generator)
        with torch.no_grad():
            expected = reference(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise RuntimeError(f'onnxruntime returned shape {got.shape} for batch {batch}, PyTorch {expected.shape}')
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def _export_and_verify(model, reference, path, img_size, opset, atol, what_is_compared):
    """Export `model` to `path` and compare it with `reference`; None when it matches, else the error."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    try:
        export(model, path, img_size, opset=opset)
    except (torch.onnx.errors.OnnxExporterError, torch.onnx.errors.UnsupportedOperatorError, OSError) as err:
        return f'exporting failed: {err}'
    try:
        diff = max_abs_diff_onnxruntime(path, reference, img_size)
    except (RuntimeError, ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidArgument,
            ort_errors.NotImplemented, ort_errors.RuntimeException) as err:
        return f'onnxruntime cannot run the exported model: {err}'
    print(f'onnxruntime vs PyTorch ({what_is_compared}batch 1 and 3): max abs diff {diff:.3e} '
          f'(tolerance {atol:g}) {"OK" if diff <= atol else "FAILED"}')
    if diff > atol:
        return f'the ONNX model does not reproduce PyTorch within --atol {atol:g}'
    return None


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', help='checkpoint or weights file (main.py run file, official .pth.tar, '
                                           '.safetensors, HuggingFace file or directory)')
    parser.add_argument('--out', default=None,
                        help='ONNX file to write (default: the checkpoint path with the suffix .onnx)')
    parser.add_argument('--model', default=None,
                        help='VAN variant, e.g. van_b0; needed only when the checkpoint does not say')
    parser.add_argument('--img-size', type=IMG_SIZE, default=None,
                        help='input height and width (default: the training size stored in the checkpoint, else 224)')
    parser.add_argument('--opset', type=int, default=11,
                        help=f'ONNX opset version, {OPSETS[0]}..{OPSETS[-1]} (default 11, what Ascend ATC expects)')
    parser.add_argument('--fold-bn', action='store_true',
                        help='fold BatchNorm into the neighbouring convolutions where exact (see --help text above)')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='largest allowed |onnxruntime - PyTorch| difference (default 1e-4)')
    return parser


def _default_out(checkpoint: Path) -> Path:
    name = checkpoint.name
    for suffix in ('.pth.tar', '.pth', '.pt', '.bin', '.safetensors', '.tar'):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return checkpoint.with_name(name + '.onnx')


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset not in OPSETS:
        parser.error(f'--opset {args.opset}: choose {OPSETS[0]}..{OPSETS[-1]}')
    try:
        import onnxruntime  # noqa: F401  (verification needs it; fail before the slow export)
    except ImportError:
        print('export_onnx: error: onnxruntime is not installed; it verifies the exported file. '
              'Install it with: pip install -r requirements-dev.txt', file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir() and args.out is None:
        args.out = str(checkpoint / 'model.onnx')
    out_path = Path(args.out) if args.out else _default_out(checkpoint)

    try:
        loaded = load_model(checkpoint, model_name=args.model)
    except UserError as err:
        print(f'export_onnx: error: {err}', file=sys.stderr)
        return 2
    transform, config = eval_preprocessing(loaded, args.img_size)
    img_size = tuple(config.input_size[1:])
    reference = loaded.model
    print(f'{checkpoint}: {loaded.variant}, {loaded.num_classes} classes, input {INPUT_NAME} (N, 3, {img_size[0]}, '
          f'{img_size[1]}), opset {args.opset}')
    print(f'preprocessing of {INPUT_NAME} (as evaluation, of an RGB image): '
          + ', '.join(' '.join(repr(step).split()) for step in getattr(transform, 'transforms', [transform])))

    model = reference
    if args.fold_bn:
        # Fold a copy, so the unfolded original stays the reference the ONNX file is checked against.
        model = copy.deepcopy(reference)
        folded = fold_batchnorms(model)
        x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            fold_diff = (model(x) - reference(x)).abs().max().item()
        print(f'folded {len(folded)} BatchNorm layers into convolutions (max abs diff vs unfolded PyTorch '
              f'{fold_diff:.3e}); kept {sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())} '
              f'(block norm1: its output also feeds the attention shortcut)')

    # Export and verify under a temporary name: `out_path` only ever holds a verified file, and an
    # earlier good export there survives a failed one.
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + '.partial')
    try:
        error = _export_and_verify(model, reference, partial, img_size, args.opset, args.atol,
                                   'folded export vs unfolded model, ' if args.fold_bn else '')
        if error is None:
            os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    if error is not None:
        print(f'export_onnx: error: {error}; {out_path} was not written', file=sys.stderr)
        return 1
    print(f'wrote {out_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

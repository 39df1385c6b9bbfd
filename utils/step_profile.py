"""Where a training step's time goes: torch.profiler kernels sorted into VAN's kernel classes.

    records = profile_step(step, device)      # one call of step() under torch.profiler
    table = breakdown(records)                # [{'class', 'ms', 'share', 'top': [(kernel, ms), ...]}, ...]

On CUDA a record is one GPU kernel, attributed to the operator that launched it and that operator's
callers (`FunctionEvent.cpu_parent`); on CPU a record is one operator's self time. `classify` decides a
record's class from the operator names and, for convolutions, the weight shape the operator received
(recorded with record_shapes=True): a (C, 1, k, k) weight with k > 1 is a depthwise conv, a (Co, Ci, 1, 1)
weight a 1x1 conv (a GEMM). The backward of a depthwise conv is split into input and weight gradient by the
kernel name where the library says which it is (cuDNN's dgrad/wgrad, PyTorch's conv_depthwise2d_backward /
grad_weight, the van_triton ops); other kernels of that backward stay 'depthwise backward (unsplit)'.
Used by tools/benchmark.py --profile (and so tools/gpu_report.py).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

DEPTHWISE_FORWARD = 'depthwise forward'
DEPTHWISE_INPUT_GRAD = 'depthwise input-grad'
DEPTHWISE_WEIGHT_GRAD = 'depthwise weight-grad'
DEPTHWISE_BACKWARD = 'depthwise backward (unsplit)'
POINTWISE = '1x1 conv / GEMM'
DENSE_CONV = 'dense conv (patch embed)'
BATCH_NORM = 'batch norm'
OPTIMIZER = 'optimizer + loss scaling'
ELEMENTWISE = 'elementwise / other'
CLASSES = (DEPTHWISE_FORWARD, DEPTHWISE_INPUT_GRAD, DEPTHWISE_WEIGHT_GRAD, DEPTHWISE_BACKWARD, POINTWISE,
           DENSE_CONV, BATCH_NORM, OPTIMIZER, ELEMENTWISE)

_INPUT_GRAD_HINTS = ('dgrad', 'conv_depthwise2d_backward', 'backward_input', 'input_grad')
_WEIGHT_GRAD_HINTS = ('wgrad', 'grad_weight', 'weight_grad', 'backward_weight')
_OPTIMIZER_HINTS = ('optimizer.', 'multi_tensor_apply', '_amp_foreach_non_finite', '_amp_update_scale', 'adamw')
_GEMM_OPS = ('aten::addmm', 'aten::mm', 'aten::bmm', 'aten::linear', 'aten::matmul')


def classify(kernel: str, ops: Sequence[str], weight_shape: Optional[Sequence[int]]) -> str:
    """Class of one kernel: its name, the operators from the launching one outwards, and the weight
    shape of the innermost convolution operator among them (None if there is none)."""
    name = kernel.lower()
    stack = ' | '.join(ops).lower()
    if 'van_triton::dwconv_weight_grad' in stack:
        return DEPTHWISE_WEIGHT_GRAD
    if 'van_triton::dwconv_input_grad' in stack or 'van_triton::dwconv_gelu_grad' in stack:
        return DEPTHWISE_INPUT_GRAD
    if 'van_triton::dwconv' in stack:
        return DEPTHWISE_FORWARD
    if 'depthwiseconvbackward' in stack:  # models/fast_conv.py's autograd functions (CPU)
        return DEPTHWISE_BACKWARD
    if any(hint in stack or hint in name for hint in _OPTIMIZER_HINTS):
        return OPTIMIZER
    if weight_shape is not None and len(weight_shape) == 4:
        out_channels, in_per_group, kh, kw = weight_shape
        if in_per_group == 1 and out_channels > 1 and kh * kw > 1:
            if 'backward' not in stack:
                return DEPTHWISE_FORWARD
            if any(hint in name for hint in _WEIGHT_GRAD_HINTS):
                return DEPTHWISE_WEIGHT_GRAD
            if any(hint in name for hint in _INPUT_GRAD_HINTS):
                return DEPTHWISE_INPUT_GRAD
            return DEPTHWISE_BACKWARD
        return POINTWISE if kh * kw == 1 else DENSE_CONV
    if any(op in stack for op in _GEMM_OPS) or 'gemm' in name:
        return POINTWISE
    if 'batch_norm' in stack or 'batch_norm' in name or 'batchnorm' in name:
        return BATCH_NORM
    return ELEMENTWISE


def _conv_weight_shape(events) -> Optional[Tuple[int, ...]]:
    """Weight shape seen by the innermost convolution operator of a caller chain (innermost first)."""
    for event in events:
        name = event.name.lower()
        if 'conv' not in name or not name.startswith('aten::'):
            continue
        shapes = [s for s in (event.input_shapes or [])]
        index = 2 if 'backward' in name else 1  # convolution_backward(grad, input, weight, ...)
        if len(shapes) > index and len(shapes[index]) == 4:
            return tuple(shapes[index])
    return None


def _chain(event) -> List:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    return chain


def records_from(prof, device: torch.device) -> List[Dict]:
    """[{'kernel', 'us', 'ops', 'weight_shape'}] of a finished torch.profiler.profile."""
    records = []
    for event in prof.events():
        if device.type == 'cuda':
            kernels = [(k.name, k.duration) for k in getattr(event, 'kernels', [])]
        elif event.self_cpu_time_total > 0 and not event.is_async:
            kernels = [(event.name, event.self_cpu_time_total)]
        else:
            kernels = []
        if not kernels:
            continue
        chain = _chain(event)
        ops = [e.name for e in chain]
        weight_shape = _conv_weight_shape(chain)
        records.extend(dict(kernel=name, us=float(us), ops=ops, weight_shape=weight_shape) for name, us in kernels)
    return records


def profile_step(step: Callable[[], None], device: torch.device) -> List[Dict]:
    """Records of one call of `step` (warm it up first: compilation and autotuning are not its cost)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    return records_from(prof, device)


def breakdown(records: Sequence[Dict], top: int = 3) -> List[Dict]:
    """Time per class (ms, share of the total), largest first, with each class's `top` kernels."""
    per_class: Dict[str, Dict[str, float]] = {}
    for record in records:
        kernels = per_class.setdefault(classify(record['kernel'], record['ops'], record['weight_shape']), {})
        kernels[record['kernel']] = kernels.get(record['kernel'], 0.0) + record['us']
    total = sum(sum(k.values()) for k in per_class.values()) or 1.0
    rows = []
    for cls, kernels in per_class.items():
        us = sum(kernels.values())
        ranked = sorted(kernels.items(), key=lambda item: -item[1])[:top]
        rows.append({'class': cls, 'ms': us / 1e3, 'share': us / total,
                     'top': [(name, kernel_us / 1e3) for name, kernel_us in ranked]})
    return sorted(rows, key=lambda row: -row['ms'])

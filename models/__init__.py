"""VAN models for timm: `import models` registers van_b0 ... van_b6 and van_tiny/small/base/large.

    model = timm.create_model('van_b2', num_classes=10, drop_path_rate=0.1)  # drop path defaults to 0
    model = timm.create_model('van_base', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file='van_base_828.pth.tar'))

Weights come from local files only (no download source is registered). timm's own loader would read
the file with its reader and drop any head whose class count differs from the config's 1000, so a
fine-tuned 10-class file could not load whole; VAN files are therefore loaded by
`models.weights.load_pretrained` right after the model is built and before timm wraps it for
`features_only`.
"""
from functools import partial

from . import compat

compat.require_working_stack()  # before timm: an older timm fails on imports further down

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from .van import ALIASES, RECIPE_DROP_PATH, VAN, VARIANTS, lka_impls, register_lka_impl, resolve_lka_impl
from .fast_conv import FastConv2d
from .polyphase_conv import PolyphaseConv2d
from .triton_lka import TritonConv2d
from .weights import UnsafeFileError, load_pretrained, load_weights, safe_load

__all__ = ['VAN', 'VARIANTS', 'ALIASES', 'MODEL_NAMES', 'UnsafeFileError', 'safe_load', 'load_pretrained', 'load_weights',
           'lka_impls', 'register_lka_impl', 'resolve_lka_impl', 'RECIPE_DROP_PATH', 'recipe_drop_path']

MODEL_NAMES = (*VARIANTS, *ALIASES)

# 'auto' = 'fast': measured faster on CPU (tools/benchmark.py, README), and identical to nn.Conv2d
# on CUDA/NPU, where FastConv2d runs the vendor kernels itself.
register_lka_impl('fast', FastConv2d, use_for_auto=True)
# GPU candidates, opt-in only: unmeasured, so 'auto' never picks them (tools/gpu_benchmark.sh measures them).
# 'polyphase': the dilated LKA conv as a dense conv on its 3x3 phases, on any device.
# 'triton': Triton kernels for every depthwise conv on CUDA (MLP GELU fused); nn.Conv2d elsewhere.
register_lka_impl('polyphase', PolyphaseConv2d)
register_lka_impl('triton', TritonConv2d)


def recipe_drop_path(model_name: str) -> float:
    """The drop path rate of `model_name`'s ImageNet training recipe (models.van.RECIPE_DROP_PATH).

    Models built by timm.create_model default to 0; training scripts pass this value. Raises
    ValueError naming the choices for a name that is no VAN variant.
    """
    variant = ALIASES.get(model_name, model_name)
    if variant not in RECIPE_DROP_PATH:
        raise ValueError(f'unknown model {model_name!r}; choose one of {", ".join(MODEL_NAMES)}')
    return RECIPE_DROP_PATH[variant]


def _cfg(**kwargs):
    return dict(
        url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
        interpolation='bicubic', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        first_conv='patch_embed1.proj', classifier='head', license='apache-2.0', **kwargs)


default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_NAMES})


def _build_and_load(variant, weights, **kwargs):
    model = VAN(**VARIANTS[ALIASES.get(variant, variant)], **kwargs)
    if isinstance(weights, dict):
        load_weights(model, weights, variant, source='pretrained_cfg state_dict')
    elif weights is not None:
        load_pretrained(model, weights, variant)
    return model


def _create_van(variant, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
    pretrained_cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
    weights = None
    if pretrained:
        # timm's priority: an in-memory state dict, then a local file.
        weights = pretrained_cfg.state_dict or pretrained_cfg.file
        if not weights:
            raise ValueError(f'{variant} weights load from local files only; pass the weights file with '
                             f'pretrained_cfg_overlay=dict(file=PATH)')
    return build_model_with_cfg(
        partial(_build_and_load, variant, weights), variant, pretrained=False,
        pretrained_cfg=pretrained_cfg, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _make_entrypoint(name):
    def entrypoint(pretrained=False, **kwargs):
        return _create_van(name, pretrained=pretrained, **kwargs)
    target = ALIASES.get(name, name)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'VAN {target}' + (f' (older name {name})' if name != target else '') + \
        f': {VARIANTS[target]}'
    return entrypoint


for _name in MODEL_NAMES:
    globals()[_name] = register_model(_make_entrypoint(_name))
del _name

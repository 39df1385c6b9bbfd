"""VAN (Visual Attention Network) architecture, faithful to the reference implementation.

Guo et al., "Visual Attention Network" (2022); reference code Visual-Attention-Network/VAN-Classification
at commit e19779b. The module tree and parameter names are the reference's (`patch_embed{i}`,
`block{i}.{j}`, `norm{i}`, `head`) so the official checkpoints load with `strict=True`; the
arithmetic is the reference's so their outputs are reproduced to float rounding.

Every variant is one row of `VARIANTS`; `ALIASES` keeps the older names (van_tiny ... van_large).
Registration with timm lives in `models/__init__.py`, weight files in `models/weights.py`.
"""
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, SelectAdaptivePool2d, trunc_normal_
from timm.models import checkpoint_seq, register_notrace_module
from timm.models._features import feature_take_indices  # timm's own models import it from there

__all__ = ['VAN', 'VARIANTS', 'RECIPE_DROP_PATH', 'ALIASES', 'GLOBAL_POOL_TYPES', 'register_lka_impl', 'resolve_lka_impl',
           'lka_impls']

# name: (embed dims, depths, MLP ratios) of the four stages.
VARIANTS: Dict[str, dict] = {
    'van_b0': dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4)),
    'van_b1': dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4)),
    'van_b2': dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), mlp_ratios=(8, 8, 4, 4)),
    'van_b3': dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), mlp_ratios=(8, 8, 4, 4)),
    'van_b4': dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(8, 8, 4, 4)),
    'van_b5': dict(embed_dims=(96, 192, 480, 768), depths=(3, 3, 24, 3), mlp_ratios=(8, 8, 4, 4)),
    'van_b6': dict(embed_dims=(96, 192, 384, 768), depths=(6, 6, 90, 6), mlp_ratios=(8, 8, 4, 4)),
}

# Stochastic depth (drop_path_rate) of each variant's ImageNet-1K training recipe. The model itself
# defaults to 0, like the reference's factories and every timm model (inference and fine-tuning
# choose their own); main.py applies these when --drop-path is not given.
# b0-b3: the reference (README and train.sh at e19779b: 0.1, 0.1, 0.1, 0.2). b4-b6: the reference
# documents none (its README lists b4 as TODO); taken from OpenMMLab mmpretrain's VAN model configs
# (configs/_base_/models/van/van_b4/b5/b6.py: 0.2, 0.2, 0.3), which agree with the reference on b0-b3.
RECIPE_DROP_PATH: Dict[str, float] = {
    'van_b0': 0.1, 'van_b1': 0.1, 'van_b2': 0.1, 'van_b3': 0.2, 'van_b4': 0.2, 'van_b5': 0.2, 'van_b6': 0.3,
}

# Names of the first release; the Ascend ModelZoo scripts train `van_base`.
ALIASES: Dict[str, str] = {'van_tiny': 'van_b0', 'van_small': 'van_b1', 'van_base': 'van_b2', 'van_large': 'van_b3'}

NUM_STAGES = 4

# Pooling before the head (timm's SelectAdaptivePool2d types); '' keeps the feature map.
GLOBAL_POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax')
_FAST_POOL_TYPES = ('fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax')  # timm's names of the same pools


# ---------------------------------------------------------------------------------------------
# Convolution implementations of the block's depthwise/pointwise convs, chosen by `lka_impl`.
# Each entry is an nn.Conv2d (sub)class, so parameter names and shapes never change and any
# implementation loads any checkpoint. models/fast_conv.py registers its classes here.
# ---------------------------------------------------------------------------------------------
_LKA_IMPLS: Dict[str, Callable[..., nn.Conv2d]] = {'plain': nn.Conv2d}
# What 'auto' resolves to; an implementation measured faster takes this over when it registers.
_AUTO_LKA_IMPL = 'plain'


def register_lka_impl(name: str, conv_cls: Callable[..., nn.Conv2d], use_for_auto: bool = False) -> None:
    """Make `lka_impl=name` build the block's convolutions with `conv_cls` (same signature as nn.Conv2d).

    To the outside the class is a convolution: timm's torch.fx tracers (features_only with
    feature_cls='fx', timm.layers.create_feature_extractor) keep it a leaf module, as they keep
    nn.Conv2d. Whatever TorchScript or a tracer walking into it cannot handle, the class settles itself
    (the project's classes share models/routed_conv.py's RoutedConv2d: scripted, they compute F.conv2d
    and say so once; traced, each conv is one wrapped function call).
    """
    global _AUTO_LKA_IMPL
    if name == 'auto':
        raise ValueError("'auto' is reserved: it resolves to the preferred registered implementation")
    _LKA_IMPLS[name] = conv_cls
    if isinstance(conv_cls, type) and conv_cls is not nn.Conv2d:
        register_notrace_module(conv_cls)
    if use_for_auto:
        _AUTO_LKA_IMPL = name


def lka_impls() -> List[str]:
    """Accepted values of `lka_impl`."""
    return ['auto', *_LKA_IMPLS]


def resolve_lka_impl(name: str) -> str:
    """Map 'auto' to the preferred implementation and reject unknown names."""
    if name == 'auto':
        return _AUTO_LKA_IMPL
    if name not in _LKA_IMPLS:
        raise ValueError(f"unknown lka_impl {name!r}; choose one of {', '.join(lka_impls())}")
    return name


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
class OverlapPatchEmbed(nn.Module):
    """Strided convolution with overlapping windows, then BatchNorm: starts each stage."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)
        # Set on the first embedding of a 'fast' model: on CPU the whole network runs faster in
        # channels_last (measured; models/fast_conv.py) and every layer keeps that format, so the input
        # is converted once, here, where timm's feature extractor passes too.
        self.channels_last_on_cpu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_on_cpu:
            x = channels_last_on_cpu(x)
        return self.norm(self.proj(x))


# The layout decisions below depend on the tensor (its device, its strides). Wrapped for torch.fx, each
# is one call in a traced graph, evaluated when the graph runs, instead of a branch a tracer cannot take.
@torch.fx.wrap
def channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last if it is on the CPU, else x."""
    if x.device.type == 'cpu':
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.fx.wrap
def channel_layer_norm(x: torch.Tensor, normalized_shape: List[int], weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW map; the result has the memory format of x."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x = F.layer_norm(x.permute(0, 2, 3, 1), normalized_shape, weight, bias, eps).permute(0, 3, 1, 2)
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


class LKA(nn.Module):
    """Large kernel attention: 5x5 depthwise, 7x7 depthwise dilated by 3, 1x1; gates its input."""

    def __init__(self, dim: int, conv_cls: Callable[..., nn.Conv2d]):
        super().__init__()
        self.conv0 = conv_cls(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = conv_cls(dim, dim, 7, stride=1, padding=9, groups=dim, dilation=3)
        self.conv1 = conv_cls(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class SpatialAttention(nn.Module):
    """1x1 projection, GELU, LKA, 1x1 projection, with its own shortcut (as in the reference)."""

    def __init__(self, dim: int, conv_cls: Callable[..., nn.Conv2d]):
        super().__init__()
        self.proj_1 = conv_cls(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(dim, conv_cls)
        self.proj_2 = conv_cls(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        return x + shortcut


class DWConv(nn.Module):
    """3x3 depthwise conv inside the MLP; a wrapper only to keep the reference name `mlp.dwconv.dwconv`."""

    def __init__(self, dim: int, conv_cls: Callable[..., nn.Conv2d]):
        super().__init__()
        self.dwconv = conv_cls(dim, dim, 3, stride=1, padding=1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    """Convolutional MLP: 1x1 expand, 3x3 depthwise, GELU, dropout, 1x1 reduce, dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float, conv_cls: Callable[..., nn.Conv2d]):
        super().__init__()
        self.fc1 = conv_cls(dim, hidden_dim, 1)
        self.dwconv = DWConv(hidden_dim, conv_cls)
        self.act = nn.GELU()
        self.fc2 = conv_cls(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        # Decided by the modules alone (TorchScript evaluates hasattr/isinstance when compiling).
        if hasattr(self.dwconv.dwconv, 'forward_gelu') and isinstance(self.act, nn.GELU) \
                and self.act.approximate == 'none':
            x = self.dwconv.dwconv.forward_gelu(x)  # RoutedConv2d: the same GELU(dwconv(x)), maybe fused
        else:
            x = self.act(self.dwconv(x))
        return self.drop(self.fc2(self.drop(x)))


class Block(nn.Module):
    """Pre-norm block: two residual branches (attention, MLP), each with layer scale and drop path."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float, drop_path: float,
                 conv_cls: Callable[..., nn.Conv2d], layer_scale_init: float = 1e-2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim, conv_cls)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, conv_cls)
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))
        return x


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the reference flattens to tokens and back).

    The result keeps the memory format of the input, so a channels_last model stays channels_last
    and an NCHW model stays NCHW-contiguous like the reference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_layer_norm(x, list(self.normalized_shape), self.weight, self.bias, self.eps)


class BlockSequence(nn.Sequential):
    """The blocks of one stage (state-dict names `block{i}.{j}` as the reference's ModuleList), run in
    order, with gradient checkpointing when `grad_checkpointing` is set."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self, x)
        for block in self:
            x = block(x)
        return x


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
class VAN(nn.Module):
    """Visual Attention Network: four stages of (patch embedding, blocks, LayerNorm), pooling, head.

    Args:
        embed_dims, depths, mlp_ratios: the four stages' widths, block counts and MLP expansions
            (one row of `VARIANTS`).
        in_chans: input channels.
        num_classes: classes of the Linear head `head`; 0 builds no head (`forward` returns the pooled
            features, or with `global_pool=''` the final feature map).
        drop_rate: dropout inside every MLP (where the reference applies its `drop_rate`).
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 over all blocks.
        lka_impl: implementation of the block's depthwise and LKA convolutions: 'plain' (nn.Conv2d,
            the reference), any name added by `register_lka_impl`, or 'auto' (the preferred one).
        global_pool: pooling before the head, one of `GLOBAL_POOL_TYPES`: 'avg' (the reference's mean
            over positions), 'max', 'avgmax' (their mean), 'catavgmax' (both, concatenated: the head
            sees twice the channels), or '' (none: only with num_classes=0).

    timm's model API: `forward_features` (final map), `forward_head(x, pre_logits)`,
    `forward_intermediates` / `prune_intermediate_layers` (the four stages' maps, each after its
    LayerNorm), `reset_classifier`, `set_grad_checkpointing`; the model compiles with TorchScript and
    traces with torch.fx.
    """

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (64, 128, 320, 512),
            depths: Tuple[int, ...] = (3, 3, 12, 3),
            mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4),
            in_chans: int = 3,
            num_classes: int = 1000,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            lka_impl: str = 'auto',
            global_pool: str = 'avg',
    ):
        super().__init__()
        if not len(embed_dims) == len(depths) == len(mlp_ratios) == NUM_STAGES:
            raise ValueError(f'VAN has {NUM_STAGES} stages: embed_dims, depths and mlp_ratios need one entry each')
        _check_head(num_classes, global_pool)
        self.lka_impl = resolve_lka_impl(lka_impl)
        conv_cls = _LKA_IMPLS[self.lka_impl]
        self.num_classes = num_classes
        self.num_stages = NUM_STAGES  # fewer after prune_intermediate_layers
        self.num_features = embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.feature_info = []

        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        prev_dim, reduction, first_block = in_chans, 1, 0
        for i, (dim, depth, mlp_ratio) in enumerate(zip(embed_dims, depths, mlp_ratios), start=1):
            patch_size, stride = (7, 4) if i == 1 else (3, 2)
            reduction *= stride
            setattr(self, f'patch_embed{i}', OverlapPatchEmbed(prev_dim, dim, patch_size, stride))
            # An nn.Sequential (the reference uses a ModuleList) gives the same state-dict names and lets
            # timm's feature extractor run the stage as one module.
            setattr(self, f'block{i}', BlockSequence(*[
                Block(dim, mlp_ratio, drop_rate, drop_path_rates[first_block + j], conv_cls) for j in range(depth)]))
            setattr(self, f'norm{i}', ChannelLayerNorm(dim, eps=1e-6))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'norm{i}'))
            prev_dim, first_block = dim, first_block + depth

        self.patch_embed1.channels_last_on_cpu = self.lka_impl == 'fast'
        self._set_head(num_classes, global_pool)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Biases, norms and layer scales are 1-D and excluded by the optimizer's 1-D rule; no other
        # parameter is exempt in the recipe.
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for i in range(1, NUM_STAGES + 1):
            blocks = getattr(self, f'block{i}')
            if isinstance(blocks, BlockSequence):  # not a pruned stage
                blocks.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (0: no head) and, if given,
        the pooling (`global_pool`, see the class docstring; '' returns the unpooled map)."""
        self._set_head(num_classes, self.global_pool.pool_type if global_pool is None else global_pool)
        self.head.apply(_init_weights)

    def _set_head(self, num_classes: int, global_pool: str) -> None:
        _check_head(num_classes, global_pool)
        reference = next(self.parameters(), None)
        factory = {} if reference is None else dict(device=reference.device, dtype=reference.dtype)
        # timm's 'fast' pools are means/maxima over the positions, x.mean((2, 3)) for 'avg': the
        # reference's own arithmetic, bit for bit (adaptive_avg_pool2d need not be).
        self.global_pool = SelectAdaptivePool2d(
            pool_type='fast' + global_pool if global_pool in GLOBAL_POOL_TYPES[1:] else global_pool,
            flatten=bool(global_pool))
        self.num_classes = num_classes
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes, **factory) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage `index` (0-3): patch embedding, blocks, LayerNorm. Spelled out because TorchScript
        cannot look modules up by a computed name, and the reference names are kept."""
        if index == 0:
            return self.norm1(self.block1(self.patch_embed1(x)))
        if index == 1:
            return self.norm2(self.block2(self.patch_embed2(x)))
        if index == 2:
            return self.norm3(self.block3(self.patch_embed3(x)))
        return self.norm4(self.block4(self.patch_embed4(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map (N, C4, H/32, W/32), after the last stage's LayerNorm."""
        for i in range(self.num_stages):
            x = self._forward_stage(i, x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The stages' feature maps as timm's models give them, and the final map.

        Args:
            x: input images.
            indices: stages to return (0-3): the last n if an int, those listed (negative counts
                from the end) if a sequence, all if None.
            norm: accepted for timm's API; every map is already after its stage's LayerNorm (the
                reference normalises each stage's output before the next stage).
            stop_early: stop after the last stage asked for (the final map is then that stage's).
            output_fmt: 'NCHW' only.
            intermediates_only: return only the list of maps.

        Returns:
            The list of maps, or (final map, list of maps); the final map is `forward_features(x)`.
        """
        if output_fmt != 'NCHW':
            raise ValueError('VAN gives its feature maps in NCHW only (output_fmt=\'NCHW\')')
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        intermediates: List[torch.Tensor] = []
        for i in range(max_index + 1 if stop_early else self.num_stages):
            x = self._forward_stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one in `indices` (and the head, if `prune_head` or stages
        went); return the stage indices kept. `prune_norm` changes nothing: each stage's LayerNorm
        belongs to the map `forward_intermediates` returns for it."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 2, NUM_STAGES + 1):
            for name in (f'patch_embed{i}', f'block{i}', f'norm{i}'):
                setattr(self, name, nn.Identity())
        pruned_end = max_index < self.num_stages - 1
        self.num_stages = max_index + 1
        if pruned_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or pruned_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_head(num_classes: int, global_pool: str) -> None:
    if global_pool not in GLOBAL_POOL_TYPES and global_pool not in _FAST_POOL_TYPES:
        raise ValueError(f'global_pool must be one of {", ".join(map(repr, GLOBAL_POOL_TYPES))}, got {global_pool!r}')
    if num_classes > 0 and not global_pool:
        raise ValueError(f"global_pool='' (no pooling) needs num_classes=0: the head classifies pooled "
                         f"features, got num_classes={num_classes}")


def _init_weights(m: nn.Module) -> None:
    """The reference initialisation, applied to every submodule."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0., (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

"""`RoutedConv2d`: the base of every `lka_impl` convolution other than nn.Conv2d ('fast', 'polyphase', 'triton').

Each such class is an nn.Conv2d (parameters `weight`/`bias`, so every checkpoint loads) whose stride-1 'same'
depthwise convs, and for some also 1x1 convs, take another route than nn.Conv2d's forward: C kernels, a
polyphase rewrite, Triton custom ops. A subclass says which of its convs take the route (`routed_depthwise`,
`routed_pointwise`, set in its __init__) and supplies the route (`conv2d_route`); the rest, how the routes
meet TorchScript and torch.fx, is settled here once:

- Every route is entered through `conv2d_same`, a function wrapped for torch.fx. timm's tracers keep the
  class a leaf module (models/van.py puts every lka_impl class on timm's notrace list); a tracer that walks
  into it anyway (torch.fx.symbolic_trace, torchvision's create_feature_extractor) records one call of
  `conv2d_same`, and the traced graph runs the route as eager does, its checks of the input's device, dtype
  and layout made when the graph runs instead of being branches the tracer cannot take.
- The routes are Python (autograd Functions, ctypes kernels, Triton launches): TorchScript compiles
  `conv2d_same` to F.conv2d, nn.Conv2d's result, and `__prepare_scriptable__` says so once per class.
"""
import warnings
from typing import Callable, Dict, Optional, Set

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['RoutedConv2d', 'conv2d_same', 'plain_conv2d_same']

# Route of each RoutedConv2d subclass, by `_route_key`: the traced graph and the module name the route by a
# string (a tracer and TorchScript take strings as constants, not functions).
_ROUTES: Dict[str, Callable[..., torch.Tensor]] = {}
# Classes whose scripting fallback has been announced (once per class and process).
_told_about_scripting: Set[str] = set()


def plain_conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                      depthwise: bool) -> torch.Tensor:
    """nn.Conv2d's stride-1 'same' conv: depthwise kxk (`depthwise`) or 1x1."""
    padding = [dilation * (weight.shape[-2] // 2), dilation * (weight.shape[-1] // 2)]
    return F.conv2d(x, weight, bias, 1, padding, dilation, weight.shape[0] if depthwise else 1)


@torch.fx.wrap
def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                depthwise: bool, gelu: bool, route: str) -> torch.Tensor:
    """Stride-1 'same' conv (depthwise kxk if `depthwise`, else 1x1), then GELU if `gelu`, by the route of
    the RoutedConv2d class `route`; compiled by TorchScript, by F.conv2d."""
    if torch.jit.is_scripting():
        y = plain_conv2d_same(x, weight, bias, dilation, depthwise)
        return F.gelu(y) if gelu else y
    else:
        return _ROUTES[route](x, weight, bias, dilation, depthwise, gelu)


def _route_key(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


class RoutedConv2d(nn.Conv2d):
    """nn.Conv2d whose stride-1 'same' depthwise convs (`routed_depthwise`) or 1x1 convs (`routed_pointwise`)
    run `conv2d_route`; all other convs run nn.Conv2d's forward.

    Subclasses set the two flags in __init__ (`same_depthwise()` helps), implement `conv2d_route` and
    describe in `scripting_note` what a scripted model loses.
    """

    # Completes 'a scripted model computes nn.Conv2d's convolutions: ...'.
    scripting_note = 'its route is Python-only'

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _ROUTES[_route_key(cls)] = cls.conv2d_route

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.route = _route_key(type(self))
        self.routed_depthwise = False
        self.routed_pointwise = False

    def same_depthwise(self) -> bool:
        """Whether this is a stride-1 'same' depthwise conv with an odd kernel larger than 1x1 and equal
        dilations (the LKA's and the MLP's depthwise convs)."""
        kh, kw = self.kernel_size
        d = self.dilation[0]
        return (self.groups == self.in_channels == self.out_channels and self.stride == (1, 1)
                and kh % 2 == 1 and kw % 2 == 1 and (kh, kw) != (1, 1) and self.dilation == (d, d)
                and self.padding_mode == 'zeros' and self.padding == (d * (kh // 2), d * (kw // 2)))

    @staticmethod
    def conv2d_route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                     depthwise: bool, gelu: bool) -> torch.Tensor:
        """What `conv2d_same` computes, by this class's route (eager, or a traced graph run)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routed_depthwise or self.routed_pointwise:
            return conv2d_same(x, self.weight, self.bias, self.dilation[0], self.routed_depthwise, False, self.route)
        return self._conv_forward(x, self.weight, self.bias)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """F.gelu(self(x)); the route may fuse the GELU into a depthwise conv (the MLP's dwconv + act)."""
        if self.routed_depthwise:
            return conv2d_same(x, self.weight, self.bias, self.dilation[0], True, True, self.route)
        return F.gelu(self.forward(x))

    def __prepare_scriptable__(self) -> 'RoutedConv2d':
        # torch.jit.script calls this on every submodule before compiling it.
        name = type(self).__name__
        if name not in _told_about_scripting:
            _told_about_scripting.add(name)
            warnings.warn(f'TorchScript: {name} runs as plain nn.Conv2d in a scripted model: {self.scripting_note}. '
                          f'Results are the same to float rounding.', UserWarning, stacklevel=2)
        return self

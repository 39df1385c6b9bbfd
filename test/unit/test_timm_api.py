"""timm's model API on VAN, for every lka_impl: head and pooling choices, forward_intermediates and
pruning, TorchScript, torch.fx tracing (torchvision's and timm's feature extractors)."""
import logging
import warnings

import pytest
import timm
import torch
from timm.models import get_graph_node_names  # timm.layers has it only from 1.0.17
from timm.models import is_notrace_module
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import models
from models import routed_conv, triton_lka
from models.weights import load_weights

LKA_IMPLS = [name for name in models.lka_impls() if name != 'auto']


def _impl_param(name, runs_the_model=True):
    """'triton' skips where its kernels cannot run (no triton, torch < 2.4); where they run in Triton's CPU
    interpreter (test/unit/conftest.py), tests that run the model are slow (5-50 s) and go with the slow tests."""
    marks = []
    if name == 'triton' and not triton_lka.available():
        marks.append(pytest.mark.skip(reason=f"lka_impl 'triton': {triton_lka.unavailable_reason()}"))
    elif name == 'triton' and runs_the_model and triton_lka.interpreting():
        marks.append(pytest.mark.slow)
    return pytest.param(name, marks=marks)


IMPLS = [_impl_param(name) for name in LKA_IMPLS]
ROUTED_IMPLS = [_impl_param(name, runs_the_model=False) for name in LKA_IMPLS if name != 'plain']
STAGE_CHANNELS = [32, 64, 160, 256]  # van_b0


def _input(batch=2, height=64, width=48):
    torch.manual_seed(1)
    return torch.randn(batch, 3, height, width)


def _model(lka_impl='plain', **kwargs):
    torch.manual_seed(0)
    return timm.create_model('van_b0', lka_impl=lka_impl, **kwargs)


def _randomise_norms(model):
    """Non-trivial BatchNorm statistics, so that a wrongly wired eval graph shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------------------------
# Head and pooling
# ---------------------------------------------------------------------------------------------
def test_default_pooling_is_the_reference_mean_bit_for_bit():
    model = _model(num_classes=10).eval()
    with torch.no_grad():
        features = model.forward_features(_input())
        assert torch.equal(model.forward_head(features, pre_logits=True), features.mean(dim=(2, 3)))
        assert torch.equal(model.forward_head(features), model.head(features.mean(dim=(2, 3))))


@pytest.mark.parametrize('global_pool, pool, multiplier', [
    ('avg', lambda f: f.mean((2, 3)), 1),
    ('max', lambda f: f.amax((2, 3)), 1),
    ('avgmax', lambda f: 0.5 * f.mean((2, 3)) + 0.5 * f.amax((2, 3)), 1),
    ('catavgmax', lambda f: torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1), 2),
])
def test_pooling_choices_keep_the_head_names(global_pool, pool, multiplier):
    model = _model(num_classes=10, global_pool=global_pool).eval()
    with torch.device('meta'):
        default_names = set(timm.create_model('van_b0', num_classes=10).state_dict())
    assert set(model.state_dict()) == default_names  # head.weight/head.bias: checkpoints still load
    assert model.head.in_features == model.head_hidden_size == 256 * multiplier
    assert model.num_features == 256
    x = _input()
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(pooled, pool(features), rtol=0, atol=0)
        torch.testing.assert_close(model(x), model.head(pooled), rtol=0, atol=0)
    assert model(x).shape == (2, 10)


def test_create_model_without_pooling_and_head_returns_the_feature_map():
    model = _model(num_classes=0, global_pool='').eval()
    x = _input()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model.forward_features(x))
    assert out.shape == (2, 256, 2, 2)
    assert not any(name.startswith('head.') for name in model.state_dict())


def test_reset_classifier_changes_head_and_pooling():
    model = _model(num_classes=10).eval()
    x = _input()
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, '')
        assert torch.equal(model(x), features)  # the unpooled map, as timm's models give it
        model.reset_classifier(0, 'avg')
        assert torch.equal(model(x), features.mean((2, 3)))
        model.reset_classifier(5, 'catavgmax')
        assert model.head.weight.shape == (5, 512) and model(x).shape == (2, 5)
        model.reset_classifier(3)  # the pooling stays as it was
        assert model.head.weight.shape == (3, 512)
    assert model.head.bias.abs().sum() == 0  # the reference initialisation


def test_head_and_pooling_mistakes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="global_pool must be one of '', 'avg', 'max', 'avgmax', 'catavgmax'"):
        _model(global_pool='median')
    with pytest.raises(ValueError, match='needs num_classes=0'):
        _model(num_classes=10, global_pool='')
    model = _model(num_classes=10)
    with pytest.raises(ValueError, match='needs num_classes=0'):
        model.reset_classifier(10, '')
    assert model.head.out_features == 10  # a refused reset leaves the model as it was


def test_weights_for_another_pooling_keep_a_fresh_head_and_say_why(caplog):
    weights = _model(num_classes=10).state_dict()  # an 'avg' head: 256 features
    model = _model(num_classes=10, global_pool='catavgmax')
    with caplog.at_level(logging.INFO, logger='models.weights'):
        load_weights(model, weights, 'van_b0', source='avg.pth')
    assert torch.equal(model.block1[0].mlp.fc1.weight, weights['block1.0.mlp.fc1.weight'])
    assert "avg.pth has a head over 256 features but the model's pooling gives 512" in caplog.text
    with pytest.raises(ValueError, match='build the model with the global_pool the weights were trained with'):
        load_weights(model, weights, 'van_b0', source='avg.pth', require_head=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='models.weights'):
        load_weights(_model(num_classes=0, global_pool=''), weights, 'van_b0', source='avg.pth')
    assert 'has a head for 10 classes but the model has 0; the model has no head (features only)' in caplog.text


def test_new_head_follows_the_model_dtype():
    model = _model(num_classes=10).to(torch.bfloat16)
    model.reset_classifier(4, 'max')
    assert model.head.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# forward_intermediates, prune_intermediate_layers, features_only='getter'
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('lka_impl', IMPLS)
def test_forward_intermediates_gives_each_stage_and_the_final_map(lka_impl):
    model = _randomise_norms(_model(lka_impl)).eval()
    x = _input()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [m.shape[1] for m in maps] == STAGE_CHANNELS
        assert [tuple(m.shape[2:]) for m in maps] == [(16, 12), (8, 6), (4, 3), (2, 2)]
        assert torch.equal(maps[-1], final)
        # timm's hook-based features_only model taps the same modules (each stage's LayerNorm)
        listed = timm.create_model('van_b0', features_only=True, lka_impl=lka_impl).eval()
        listed.load_state_dict(model.state_dict(), strict=False)
        for got, expected in zip(maps, listed(x)):
            assert torch.equal(got, expected)


def test_forward_intermediates_indices_and_options():
    model = _model().eval()
    x = _input(batch=1)
    with torch.no_grad():
        final, all_maps = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == [160, 256]
        listed = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(listed, [all_maps[0], all_maps[2]])] == [True, True]
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early_final, all_maps[1]) and torch.equal(early[0], all_maps[1])
        normed_final, normed = model.forward_intermediates(x, norm=True)  # every map is already normalised
        assert torch.equal(normed_final, final) and all(torch.equal(a, b) for a, b in zip(normed, all_maps))
    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(x, output_fmt='NHWC')
    with pytest.raises(AssertionError, match='out of range'):
        model.forward_intermediates(x, indices=[4])


def test_prune_intermediate_layers_drops_later_stages_and_the_head():
    model = _model(num_classes=10).eval()
    x = _input()
    with torch.no_grad():
        _, maps = model.forward_intermediates(x)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert not any(k.startswith(('patch_embed3', 'block3', 'norm3', 'block4', 'head')) for k in model.state_dict())
    assert model.num_features == 64 and model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(model(x), maps[1])  # no head, no pooling: the last kept map
        assert torch.equal(model.forward_intermediates(x, intermediates_only=True)[1], maps[1])

    kept_head = _model(num_classes=10)
    assert kept_head.prune_intermediate_layers((0, 1, 2, 3), prune_head=False) == [0, 1, 2, 3]
    assert kept_head.head.out_features == 10


@pytest.mark.parametrize('lka_impl', IMPLS)
def test_features_only_getter_equals_the_hook_based_extractor(lka_impl):
    getter = timm.create_model('van_b0', features_only=True, feature_cls='getter', lka_impl=lka_impl).eval()
    listed = timm.create_model('van_b0', features_only=True, lka_impl=lka_impl).eval()
    listed.load_state_dict(getter.model.state_dict(), strict=False)
    assert getter.feature_info.channels() == STAGE_CHANNELS
    assert getter.feature_info.reduction() == [4, 8, 16, 32]
    x = _input(batch=1)
    with torch.no_grad():
        for got, expected in zip(getter(x), listed(x)):
            assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('scriptable', [False, True], ids=['default', 'set_scriptable'])
@pytest.mark.parametrize('lka_impl', IMPLS)
def test_torchscript_outputs_equal_eager(lka_impl, scriptable):
    with timm.layers.set_scriptable(scriptable):
        model = _randomise_norms(_model(lka_impl, num_classes=10)).eval()
    scripted = torch.jit.script(model)
    x = _input()
    with torch.no_grad():
        expected = model(x)
        got = scripted(x)
    # a scripted 'fast' model computes nn.Conv2d's convolutions: equal to float rounding
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if lka_impl == 'plain':
        assert torch.equal(got, expected)


@pytest.mark.parametrize('lka_impl', ROUTED_IMPLS)
def test_scripting_says_once_that_the_model_runs_plain_convolutions(lka_impl, monkeypatch):
    monkeypatch.setattr(routed_conv, '_told_about_scripting', set())
    model = _model(lka_impl).eval()
    conv_cls = type(model.block1[0].attn.spatial_gating_unit.conv_spatial)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.jit.script(model)
        torch.jit.script(model)
    told = [w for w in caught if conv_cls.__name__ in str(w.message)]
    assert len(told) == 1 and 'runs as plain nn.Conv2d' in str(told[0].message)
    # scripting leaves the eager model as it was: its convolutions still take their route
    assert type(model.block1[0].attn.spatial_gating_unit.conv_spatial) is conv_cls is not nn.Conv2d


# ---------------------------------------------------------------------------------------------
# torch.fx
# ---------------------------------------------------------------------------------------------
def _outputs_and_gradients(forward, model, x):
    model.zero_grad()
    out = forward(x)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten(1) for o in out.values()], 1)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('lka_impl', IMPLS)
def test_fx_traced_model_equals_eager_forward_and_backward(lka_impl):
    """torch.fx.symbolic_trace (no leaf list: the tracer walks into every lka_impl class) and timm's
    tracer (which keeps them leaf modules) give eager's outputs and gradients, in train mode."""
    model = _model(lka_impl, num_classes=10).train()
    x = _input()
    expected = _outputs_and_gradients(model, model, x)
    for traced in (torch.fx.symbolic_trace(model),
                   timm.models.create_feature_extractor(model, return_nodes=['head'])):
        got = _outputs_and_gradients(traced, model, x)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
        for name, grad in expected[1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('lka_impl', IMPLS)
def test_torchvision_feature_extractor_gives_the_stage_maps(lka_impl):
    model = _randomise_norms(_model(lka_impl)).eval()
    extractor = create_feature_extractor(model, return_nodes={f'norm{i}': str(i) for i in range(1, 5)})
    x = _input()
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        for got, expected in zip(extractor(x).values(), maps):
            assert torch.equal(got, expected)


@pytest.mark.parametrize('lka_impl', IMPLS)
def test_timm_fx_features_equal_the_getter_features(lka_impl):
    fx = timm.create_model('van_b0', features_only=True, feature_cls='fx', lka_impl=lka_impl).eval()
    getter = timm.create_model('van_b0', features_only=True, feature_cls='getter', lka_impl=lka_impl).eval()
    weights = {k.removeprefix('graph_module.'): v for k, v in fx.state_dict().items()}
    missing, unexpected = getter.model.load_state_dict(weights, strict=False)
    assert not unexpected and not missing
    x = _input(batch=1)
    with torch.no_grad():
        for got, expected in zip(fx(x), getter(x)):
            assert torch.equal(got, expected)


class _OneConv(nn.Module):
    """One LKA conv, as the MLP calls it with its GELU (`gelu`) or as the LKA calls it."""

    def __init__(self, conv: nn.Module, gelu: bool):
        super().__init__()
        self.conv = conv
        self.gelu = gelu

    def forward(self, x):
        return self.conv.forward_gelu(x) if self.gelu else self.conv(x)


@pytest.mark.parametrize('lka_impl', ROUTED_IMPLS)
@pytest.mark.parametrize('gelu', [False, True], ids=['conv', 'conv_gelu'])
def test_a_routed_conv_traces_to_one_call_and_scripts_to_conv2d(lka_impl, gelu, monkeypatch):
    """One conv of each implementation, small enough for Triton's interpreter: walked into by
    torch.fx.symbolic_trace it is one `conv2d_same` call, and the graph gives eager's output and
    gradients; scripted, it computes F.conv2d (and GELU)."""
    monkeypatch.setattr(routed_conv, '_told_about_scripting', set())  # this test's warning stays its own
    torch.manual_seed(0)
    model = _OneConv(models.van._LKA_IMPLS[lka_impl](32, 32, 7, padding=9, dilation=3, groups=32), gelu)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == 'call_function'] == [routed_conv.conv2d_same]
    x = torch.randn(2, 32, 8, 7)
    expected = F.conv2d(x, model.conv.weight, model.conv.bias, 1, 9, 3, 32)
    expected = F.gelu(expected) if gelu else expected
    eager = _outputs_and_gradients(model, model, x)
    torch.testing.assert_close(eager[0], expected, rtol=1e-5, atol=1e-5)
    got = _outputs_and_gradients(traced, model, x)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-6, atol=1e-6)
    for name, grad in eager[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f'{name}: {m}')
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('lka_impl', ROUTED_IMPLS)
def test_lka_convolutions_are_leaf_modules_to_timms_tracer(lka_impl):
    assert is_notrace_module(models.van._LKA_IMPLS[lka_impl])
    _, eval_nodes = get_graph_node_names(_model(lka_impl))
    conv = 'block1.0.attn.spatial_gating_unit.conv_spatial'
    assert conv in eval_nodes and not any(n.startswith(conv + '.') for n in eval_nodes)


def test_a_registered_lka_impl_becomes_a_leaf_module():
    class TracedConv2d(nn.Conv2d):
        pass

    models.register_lka_impl('leaf-test', TracedConv2d)
    try:
        assert is_notrace_module(TracedConv2d)
    finally:
        models.van._LKA_IMPLS.pop('leaf-test')

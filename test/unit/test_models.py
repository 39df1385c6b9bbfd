"""VAN architecture: faithful to the reference (fixture outputs, parameter counts) and timm's model API."""

import pytest
import timm
import torch
from torch import nn

import models
from models.van import VAN, register_lka_impl, resolve_lka_impl

# Parameter counts of the reference with a 1000-class head (shared/notes/reference-van.md).
REFERENCE_PARAMS = {
    'van_b0': 4_105_800, 'van_b1': 13_861_800, 'van_b2': 26_578_472, 'van_b3': 44_765_608,
    'van_b4': 60_283_176, 'van_b5': 89_967_688, 'van_b6': 199_829_416,
}
ALIASES = {'van_tiny': 'van_b0', 'van_small': 'van_b1', 'van_base': 'van_b2', 'van_large': 'van_b3'}


@pytest.fixture(scope='module')
def reference(reference_fixtures):
    fixtures = reference_fixtures
    checkpoint, io = fixtures / 'van_b0_ref_10cls.pth.tar', fixtures / 'van_b0_ref_io.pt'
    if not (checkpoint.is_file() and io.is_file()):
        pytest.skip(f'reference fixture files missing in {fixtures}')
    return checkpoint, torch.load(io, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def reference_model(reference):
    checkpoint, _ = reference
    return timm.create_model('van_b0', pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', [*REFERENCE_PARAMS, *ALIASES])
def test_parameter_count_matches_reference(name):
    with torch.device('meta'):  # shapes only: even van_b6 is built without memory
        model = timm.create_model(name)
    assert _num_params(model) == REFERENCE_PARAMS[ALIASES.get(name, name)]


def test_fixture_checkpoint_loads_strictly_by_reference_names(reference):
    checkpoint, _ = reference
    state_dict = torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']
    model = VAN(**models.VARIANTS['van_b0'], num_classes=10)
    model.load_state_dict(state_dict, strict=True)
    assert set(model.state_dict()) == set(state_dict)


# The plain path does the reference's arithmetic in the reference's order: on the CPU family the
# fixtures were computed on (AVX2) it matches them to 1e-6. oneDNN's float32 kernels for other CPUs sum
# in other orders (AVX-512/AMX Xeon, torch 2.14.1: 1.7e-6 on logits, 8.3e-6 on features), and so does
# the fast path (channels_last GEMMs, native depthwise kernels with GELU fused: 8e-6 to 1.03e-5 on
# features of magnitude up to 1.9, hence a relative term there). Both therefore hold the fixtures'
# stated tolerance, about 1e-5 absolute (shared/fixtures/README.md), on any CPU.
@pytest.mark.parametrize('lka_impl, atol, rtol', [('plain', 1e-5, 1e-5), ('fast', 1e-5, 1e-5)])
def test_reproduces_reference_logits_and_features(reference, lka_impl, atol, rtol):
    checkpoint, io = reference
    model = timm.create_model('van_b0', pretrained=True, num_classes=10, lka_impl=lka_impl,
                              pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()
    with torch.no_grad():
        features = model.forward_features(io['input'])
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        logits_non_square = model(io['input_96x128'])
    torch.testing.assert_close(logits, io['logits'], atol=atol, rtol=0)
    assert features.shape == (2, 256, 7, 7)  # forward_features keeps the final map (timm convention)
    torch.testing.assert_close(pooled, io['features'], atol=atol, rtol=rtol)
    torch.testing.assert_close(logits_non_square, io['logits_96x128'], atol=atol, rtol=0)


def test_channels_last_input_gives_the_same_logits(reference, reference_model):
    _, io = reference
    x = io['input_96x128']
    with torch.no_grad():
        out = reference_model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, io['logits_96x128'], atol=1e-5, rtol=0)


@pytest.mark.parametrize('height, width', [(224, 224), (96, 128), (32, 32), (33, 47)])
def test_output_shapes_for_any_input_of_at_least_32_pixels(height, width):
    model = timm.create_model('van_b0', num_classes=7).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, height, width))
        logits = model.forward_head(features)
    assert features.shape == (1, 256, -(-height // 32), -(-width // 32))
    assert logits.shape == (1, 7)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = timm.create_model('van_b0', num_classes=5).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_create_model_passes_head_and_regularisation_arguments():
    model = timm.create_model('van_small', num_classes=3, drop_rate=0.2, drop_path_rate=0.3)
    assert isinstance(model, VAN) and model.num_classes == 3 and model.head.out_features == 3
    blocks = [b for i in range(1, 5) for b in getattr(model, f'block{i}')]
    assert len(blocks) == sum(models.VARIANTS['van_b1']['depths'])
    # stochastic depth rises linearly from 0 (first block) to drop_path_rate (last block)
    assert isinstance(blocks[0].drop_path, nn.Identity)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert blocks[-1].mlp.drop.p == 0.2  # the reference applies drop_rate inside the MLPs


def test_pretrained_config_describes_the_official_preprocessing():
    cfg = timm.create_model('van_base').pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.9
    assert cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == cfg['std'] == (0.5, 0.5, 0.5)
    assert cfg['classifier'] == 'head' and cfg['first_conv'] == 'patch_embed1.proj'
    assert cfg['num_classes'] == 1000
    assert set(models.MODEL_NAMES) <= set(timm.list_models('van_*'))


def test_arguments_the_model_would_ignore_are_refused():
    with pytest.raises(TypeError):
        timm.create_model('van_b0', img_size=384)
    with pytest.raises(ValueError, match='global_pool'):
        timm.create_model('van_b0', global_pool='token')
    with pytest.raises(ValueError, match='VAN has 4 stages'):
        VAN(embed_dims=(32, 64, 160), depths=(1, 1, 1), mlp_ratios=(4, 4, 4))


def test_pretrained_without_a_file_says_how_to_pass_one():
    with pytest.raises(ValueError, match='pretrained_cfg_overlay=dict\\(file=PATH\\)'):
        timm.create_model('van_b0', pretrained=True)


def test_features_only_returns_four_strided_maps():
    model = timm.create_model('van_b0', features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 64, 160, 256]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 160, 4, 6), (1, 256, 2, 3)]

    picked = timm.create_model('van_b0', features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        assert [m.shape[1] for m in picked(torch.randn(1, 3, 64, 64))] == [64, 256]


def test_features_only_maps_match_the_classifier_model(reference, reference_model):
    checkpoint, io = reference
    backbone = timm.create_model('van_b0', pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()
    with torch.no_grad():
        last = backbone(io['input_96x128'])[-1]
        expected = reference_model.forward_features(io['input_96x128'])
    torch.testing.assert_close(last, expected, atol=1e-6, rtol=0)


def test_reset_classifier_and_get_classifier():
    model = timm.create_model('van_b0', num_classes=10).eval()
    assert model.get_classifier() is model.head
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    with torch.no_grad():
        pooled = model(x)
        assert pooled.shape == (2, 256)
        torch.testing.assert_close(pooled, model.forward_head(model.forward_features(x), pre_logits=True))
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(x).shape == (2, 4)
    assert model.head.bias.abs().sum() == 0  # the new head gets the reference initialisation


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model('van_b0', num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], msg=name)


def test_no_weight_decay_names_only_real_parameters():
    model = timm.create_model('van_b0')
    assert set(model.no_weight_decay()) <= set(dict(model.named_parameters()))


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = timm.create_model('van_b2')
    conv = model.block3[0].attn.spatial_gating_unit.conv_spatial  # 7x7 depthwise: fan_out = 49
    assert conv.weight.std().item() == pytest.approx((2 / 49) ** 0.5, rel=0.1)
    assert conv.bias.abs().sum() == 0
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.norm4.weight == 1) and torch.all(model.block1[0].layer_scale_1 == 1e-2)


def test_lka_impl_chooses_the_convolution_class_without_renaming_parameters():
    assert resolve_lka_impl('auto') in models.lka_impls()
    with pytest.raises(ValueError, match='lka_impl'):
        timm.create_model('van_b0', lka_impl='no-such-impl')

    class CountingConv2d(nn.Conv2d):
        calls = 0

        def forward(self, x):
            CountingConv2d.calls += 1
            return super().forward(x)

    register_lka_impl('counting-test', CountingConv2d)
    try:
        torch.manual_seed(0)
        plain = timm.create_model('van_b0', lka_impl='plain').eval()
        counting = timm.create_model('van_b0', lka_impl='counting-test').eval()
        assert isinstance(counting.block1[0].attn.spatial_gating_unit.conv_spatial, CountingConv2d)
        counting.load_state_dict(plain.state_dict(), strict=True)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(counting(x), plain(x))
        assert CountingConv2d.calls == 8 * 13  # every conv of the 13 blocks: 3 in LKA, 2 projections, 3 in the MLP
    finally:
        models.van._LKA_IMPLS.pop('counting-test')

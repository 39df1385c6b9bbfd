"""Weight files: every format users bring loads through timm.create_model; wrong or unsafe files are refused."""
import argparse
import logging
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import models
from models.weights import UnsafeFileError, safe_load


@pytest.fixture(scope='module')
def source():
    """A 10-class van_b0 with non-default BatchNorm statistics, and its state dict."""
    torch.manual_seed(1)
    model = timm.create_model('van_b0', num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return model.eval(), model.state_dict()


def _load(path, name='van_b0', **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def _assert_same_weights(model, state_dict, skip=()):
    loaded = model.state_dict()
    for key, tensor in state_dict.items():
        if not key.startswith(skip):
            assert torch.equal(loaded[key], tensor), key


def _assert_same_outputs(model, reference_model):
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_model(x))


# transformers' VanForImageClassification names, written from the table in the notes.
_TO_HF_LAYER = {
    'norm1': 'pre_normomalization', 'attn.proj_1': 'attention.pre_projection.conv',
    'attn.spatial_gating_unit.conv0': 'attention.attention_layer.attention.depth_wise',
    'attn.spatial_gating_unit.conv_spatial': 'attention.attention_layer.attention.depth_wise_dilated',
    'attn.spatial_gating_unit.conv1': 'attention.attention_layer.attention.point_wise',
    'attn.proj_2': 'attention.post_projection', 'norm2': 'post_normalization',
    'mlp.fc1': 'mlp.in_dense', 'mlp.dwconv.dwconv': 'mlp.depth_wise', 'mlp.fc2': 'mlp.out_dense',
}


def _to_hf_name(name):
    if name.startswith('head.'):
        return 'classifier.' + name[len('head.'):]
    if name.startswith('patch_embed'):
        i, part, tensor = re.match(r'patch_embed(\d)\.(proj|norm)\.(.+)', name).groups()
        part = 'convolution' if part == 'proj' else 'normalization'
        return f'van.encoder.stages.{int(i) - 1}.embeddings.{part}.{tensor}'
    if name.startswith('norm'):
        i, tensor = re.match(r'norm(\d)\.(.+)', name).groups()
        return f'van.encoder.stages.{int(i) - 1}.normalization.{tensor}'
    i, j, rest = re.match(r'block(\d)\.(\d+)\.(.+)', name).groups()
    prefix = f'van.encoder.stages.{int(i) - 1}.layers.{j}.'
    if rest == 'layer_scale_1':
        return prefix + 'attention_scaling.weight'
    if rest == 'layer_scale_2':
        return prefix + 'mlp_scaling.weight'
    module, tensor = rest.rsplit('.', 1)
    return prefix + _TO_HF_LAYER[module] + '.' + tensor


def _hf_state_dict(state_dict):
    hf = {_to_hf_name(k): v for k, v in state_dict.items()}
    # transformers creates a final LayerNorm that its forward never uses
    hf['van.layernorm.weight'], hf['van.layernorm.bias'] = torch.ones(256), torch.zeros(256)
    return hf


def test_official_release_format(tmp_path, source):
    model, state_dict = source
    path = tmp_path / 'van_tiny_754.pth.tar'
    torch.save({'state_dict': state_dict}, path)
    loaded = _load(path, 'van_tiny', num_classes=10)
    _assert_same_weights(loaded, state_dict)
    _assert_same_outputs(loaded, model)


def test_plain_state_dict(tmp_path, source):
    model, state_dict = source
    torch.save(state_dict, tmp_path / 'plain.pth')
    _assert_same_outputs(_load(tmp_path / 'plain.pth', num_classes=10), model)


def test_training_checkpoint_with_optimizer_namespace_and_ddp_prefix(tmp_path, source):
    model, state_dict = source
    optimizer = torch.optim.AdamW(model.parameters())
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state_dict.items()}
    checkpoint = {
        'epoch': 12, 'arch': 'van_b0', 'version': 2, 'metric': 71.5,
        'state_dict': {'module.' + k: v for k, v in state_dict.items()},
        'state_dict_ema': ema,
        'optimizer': optimizer.state_dict(), 'amp_scaler': {'scale': 65536.0, '_growth_tracker': 3},
        'args': argparse.Namespace(model='van_b0', lr=1e-3, drop_path=0.1, input_size=None),
    }
    path = tmp_path / 'last.pth.tar'
    torch.save(checkpoint, path)
    assert isinstance(safe_load(path)['args'], argparse.Namespace)
    loaded = _load(path, num_classes=10)
    _assert_same_weights(loaded, state_dict)  # the regular weights win over the EMA copy


def test_compiled_and_ddp_wrapped_model_names(tmp_path, source):
    _, state_dict = source
    torch.save({'state_dict': {'module._orig_mod.' + k: v for k, v in state_dict.items()}}, tmp_path / 'c.pth')
    _assert_same_weights(_load(tmp_path / 'c.pth', num_classes=10), state_dict)


def test_ema_only_checkpoint(tmp_path, source):
    model, state_dict = source
    torch.save({'epoch': 3, 'state_dict_ema': state_dict}, tmp_path / 'ema.pth.tar')
    _assert_same_weights(_load(tmp_path / 'ema.pth.tar', num_classes=10), state_dict)


@pytest.mark.parametrize('filename', ['pytorch_model.bin', 'model.safetensors'])
def test_huggingface_transformers_weights(tmp_path, source, filename):
    model, state_dict = source
    hf = _hf_state_dict(state_dict)
    path = tmp_path / filename
    if filename.endswith('.safetensors'):
        save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    else:
        torch.save(hf, path)
    loaded = _load(path, num_classes=10)
    _assert_same_weights(loaded, state_dict)
    _assert_same_outputs(loaded, model)
    # a downloaded model directory works too
    _assert_same_weights(_load(tmp_path, num_classes=10), state_dict)


def test_huggingface_bare_backbone_without_classifier(tmp_path, source, caplog):
    model, state_dict = source
    backbone = {k[len('van.'):]: v for k, v in _hf_state_dict(state_dict).items() if k.startswith('van.')}
    torch.save(backbone, tmp_path / 'pytorch_model.bin')
    with caplog.at_level(logging.INFO, logger='models.weights'):
        loaded = _load(tmp_path / 'pytorch_model.bin', num_classes=10)
    _assert_same_weights(loaded, state_dict, skip=('head.',))
    assert any('head for 0 classes' in r.getMessage() for r in caplog.records)


def test_in_memory_state_dict_through_the_pretrained_config(source):
    model, state_dict = source
    loaded = timm.create_model('van_b0', pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(state_dict={'state_dict': state_dict}))
    _assert_same_weights(loaded, state_dict)


def test_huggingface_file_without_batchnorm_counters(tmp_path, source):
    model, state_dict = source
    hf = {k: v for k, v in _hf_state_dict(state_dict).items() if not k.endswith('num_batches_tracked')}
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / 'model.safetensors'))
    _assert_same_outputs(_load(tmp_path / 'model.safetensors', num_classes=10), model)


@pytest.mark.parametrize('num_classes', [1000, 3, 0])
def test_head_of_another_class_count_is_reinitialised(tmp_path, source, caplog, num_classes):
    model, state_dict = source
    torch.save({'state_dict': state_dict}, tmp_path / 'ten.pth.tar')
    with caplog.at_level(logging.INFO, logger='models.weights'):
        loaded = _load(tmp_path / 'ten.pth.tar', num_classes=num_classes)
    _assert_same_weights(loaded, state_dict, skip=('head.',))
    assert loaded.num_classes == num_classes
    if num_classes:
        assert loaded.head.weight.shape == (num_classes, 256)
        assert loaded.head.bias.abs().sum() == 0  # fresh reference init, not the file's bias
    head_lines = [r.getMessage() for r in caplog.records if 'head' in r.getMessage()]
    assert len(head_lines) == 1 and '10 classes' in head_lines[0]


def test_matching_head_keeps_its_weights_whatever_the_class_count(tmp_path, source, caplog):
    model, state_dict = source
    torch.save({'state_dict': state_dict}, tmp_path / 'ten.pth.tar')
    with caplog.at_level(logging.INFO, logger='models.weights'):
        loaded = _load(tmp_path / 'ten.pth.tar', num_classes=10)
    assert torch.equal(loaded.head.weight, state_dict['head.weight'])
    assert not [r for r in caplog.records if 'head' in r.getMessage()]


def test_features_only_model_loads_the_backbone(tmp_path, source):
    model, state_dict = source
    torch.save({'state_dict': state_dict}, tmp_path / 'ten.pth.tar')
    backbone = _load(tmp_path / 'ten.pth.tar', features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[-1], model.forward_features(x))


def test_file_of_another_variant_names_both_variants_and_the_keys(tmp_path, source):
    _, state_dict = source
    torch.save({'state_dict': state_dict}, tmp_path / 'b0.pth.tar')
    with pytest.raises(ValueError) as error:
        _load(tmp_path / 'b0.pth.tar', 'van_b1')
    message = str(error.value)
    assert 'van_b1' in message and 'looks like van_b0' in message
    assert 'patch_embed1.proj.weight (32, 3, 7, 7) in the file, (64, 3, 7, 7) in the model' in message


def test_file_of_another_architecture_is_refused(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    torch.save({'state_dict': other.state_dict()}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=r'does not fit van_base \(= van_b2\).*not look like a VAN.*missing keys: '
                                         r'patch_embed1\.proj\.weight.*unexpected keys: 0\.weight'):
        _load(tmp_path / 'other.pth', 'van_base')


class _Payload:
    """Stands for any object whose unpickling would import and run code."""


def test_file_needing_arbitrary_code_is_refused(tmp_path, source):
    _, state_dict = source
    path = tmp_path / 'pickled.pth'
    torch.save({'state_dict': state_dict, 'extra': _Payload()}, path)
    with pytest.raises(UnsafeFileError, match=r'_Payload.*arbitrary code'):
        safe_load(path)
    with pytest.raises(UnsafeFileError):
        _load(path, num_classes=10)
    assert issubclass(UnsafeFileError, RuntimeError)


def test_unreadable_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        safe_load(tmp_path / 'missing.pth')
    (tmp_path / 'notes.pth').write_text('not a checkpoint')
    with pytest.raises(ValueError, match='notes.pth is not a PyTorch checkpoint'):
        safe_load(tmp_path / 'notes.pth')
    (tmp_path / 'broken.safetensors').write_bytes(b'\x00' * 16)
    with pytest.raises(ValueError, match='broken.safetensors is not a readable safetensors file'):
        safe_load(tmp_path / 'broken.safetensors')
    torch.save({'epoch': 3, 'metric': 1.0}, tmp_path / 'no_weights.pth')
    with pytest.raises(ValueError, match='holds no model weights'):
        _load(tmp_path / 'no_weights.pth')
    with pytest.raises(FileNotFoundError, match='directory without'):
        safe_load(tmp_path)


def test_safe_load_is_what_the_package_exports():
    assert models.safe_load is safe_load and models.UnsafeFileError is UnsafeFileError


def _with_class_map(state_dict, names):
    """A checkpoint whose head row i is the class names[i] (as a run on folders numbered that way saves it)."""
    return {'state_dict': state_dict, 'class_to_idx': {name: i for i, name in enumerate(names)}}


NAMES = [f'class{i}' for i in range(10)]


@pytest.mark.parametrize('require_head', [True, False])  # evaluation and fine-tuning
def test_head_rows_follow_the_datasets_classes_by_name(source, require_head):
    from models.weights import load_weights
    _, state_dict = source
    file_order = NAMES[::-1]  # the file numbers the same classes the other way round
    checkpoint = _with_class_map(state_dict, file_order)
    dataset = {name: i for i, name in enumerate(NAMES)}
    model = timm.create_model('van_b0', num_classes=10)
    notes = load_weights(model, checkpoint, 'van_b0', 'w.pth', require_head=require_head, class_to_idx=dataset)
    for name, index in dataset.items():  # output `index` is the file's row of the class of that name
        assert torch.equal(model.head.weight[index], state_dict['head.weight'][file_order.index(name)]), name
        assert model.head.bias[index] == state_dict['head.bias'][file_order.index(name)]
    assert len(notes) == 1 and 'reordered by class name' in notes[0]
    same = timm.create_model('van_b0', num_classes=10)
    assert load_weights(same, _with_class_map(state_dict, NAMES), 'van_b0', 'w.pth', require_head=require_head,
                        class_to_idx=dataset) == []
    assert torch.equal(same.head.weight, state_dict['head.weight'])


def test_evaluating_weights_of_other_classes_is_refused_naming_them(source):
    from models.weights import load_weights
    _, state_dict = source
    dataset = {name: i for i, name in enumerate(NAMES[:9] + ['zebra'])}
    with pytest.raises(ValueError, match=r'w\.pth was trained on other classes .*only in the dataset: zebra; only in '
                                         r'the weights: class9'):
        load_weights(timm.create_model('van_b0', num_classes=10), _with_class_map(state_dict, NAMES), 'van_b0',
                     'w.pth', require_head=True, class_to_idx=dataset)
    # Fine-tuning may start from any head of the right size, and a re-initialised head has nothing to match.
    model = timm.create_model('van_b0', num_classes=10)
    assert load_weights(model, _with_class_map(state_dict, NAMES), 'van_b0', 'w.pth', class_to_idx=dataset) == []
    assert torch.equal(model.head.weight, state_dict['head.weight'])
    notes = load_weights(timm.create_model('van_b0', num_classes=4), _with_class_map(state_dict, NAMES), 'van_b0',
                         'w.pth', class_to_idx={'a': 0, 'b': 1, 'c': 2, 'd': 3})
    assert len(notes) == 1 and 'freshly initialised head' in notes[0]


def test_evaluating_on_a_subset_of_the_files_classes_maps_them(source):
    from models.weights import load_weights
    _, state_dict = source
    dataset = {'class7': 0, 'class2': 1}  # --num-classes 10 on a dataset of two of the ten classes
    model = timm.create_model('van_b0', num_classes=10)
    load_weights(model, _with_class_map(state_dict, NAMES), 'van_b0', 'w.pth', require_head=True, class_to_idx=dataset)
    assert torch.equal(model.head.weight[0], state_dict['head.weight'][7])
    assert torch.equal(model.head.weight[1], state_dict['head.weight'][2])
    assert sorted(model.head.bias.tolist()) == sorted(state_dict['head.bias'].tolist())  # every row kept once

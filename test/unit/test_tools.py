"""The user-facing tools: ONNX export (with BatchNorm folding), prediction, training curves,
TensorBoard scalars and progress bars, on CPU with van_b0 and checkpoints written here."""
import copy
import importlib.util
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import timm  # noqa: E402

import models  # noqa: E402,F401  (registers the VAN variants with timm)
from models.weights import safe_load  # noqa: E402
from utils import reporting  # noqa: E402
from utils.reporting import plot_curves  # noqa: E402
from utils.inference import eval_preprocessing, load_model  # noqa: E402
from utils.reporting import NullWriter, TensorBoardWriter, create_writer  # noqa: E402

CLASSES = {'cat': 0, 'dog': 1, 'fish': 2, 'owl': 3}
IMG = 64  # small inputs keep the export and onnxruntime runs short


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', REPO_ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_onnx = _load_tool('export_onnx')
predict = _load_tool('predict')
plot_curves_tool = _load_tool('plot_curves')


def _trained_looking_van_b0(num_classes=len(CLASSES), seed=0):
    """van_b0 whose BatchNorm statistics and layer scales are far from their init, so every BN and
    every branch changes the output (a fold that ignored the mean or variance would show)."""
    torch.manual_seed(seed)
    model = timm.create_model('van_b0', num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.3, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
        for name, param in model.named_parameters():
            if 'layer_scale' in name:
                param.uniform_(0.3, 1.0)
    return model.eval()


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """A main.py-style training checkpoint and an official-format file with the same weights."""
    root = tmp_path_factory.mktemp('ckpt')
    model = _trained_looking_van_b0()
    state_dict = model.state_dict()
    main_style = root / 'run' / 'model_best.pth.tar'
    main_style.parent.mkdir()
    torch.save({'epoch': 4, 'arch': 'van_b0', 'state_dict': state_dict, 'optimizer': {'state': {}},
                'scheduler': {}, 'version': 2, 'metric': 75.0, 'class_to_idx': CLASSES,
                'args': {'model': 'van_b0', 'img_size': IMG, 'lr': 1e-3}}, main_style)
    official = root / 'van_b0_official.pth.tar'
    torch.save({'state_dict': state_dict}, official)
    return dict(main=main_style, official=official, model=model)


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------
def test_fold_bn_is_exact_and_keeps_norm1(checkpoints):
    reference = checkpoints['model']
    folded_model = copy.deepcopy(reference)
    folded = export_onnx.fold_batchnorms(folded_model)

    # 4 patch embeddings + 13 blocks' norm2 fold; the 13 norm1 feed the attention shortcut too.
    assert len(folded) == 4 + 13
    assert all(name.endswith(('.norm', '.norm2')) for name in folded)
    remaining = [n for n, m in folded_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(remaining) == 13 and all(n.endswith('norm1') for n in remaining)

    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (folded_model(x) - reference(x)).abs().max().item()
    assert diff < 1e-5


def test_fold_bn_refuses_what_would_not_be_exact():
    model = timm.create_model('van_b0', num_classes=2)
    with pytest.raises(ValueError, match='eval mode'):
        export_onnx.fold_batchnorms(model.train())
    padded = torch.nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match='unpadded'):
        export_onnx.fold_bn_before_conv(torch.nn.BatchNorm2d(4).eval(), padded)


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------
def _onnx_vs_torch(onnx_path, torch_model, batch):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(onnx_path), providers=['CPUExecutionProvider'])
    x = torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(batch))
    (got,) = session.run(['class'], {'image': x.numpy()})
    with torch.no_grad():
        expected = torch_model(x).numpy()
    assert got.shape == expected.shape == (batch, len(CLASSES))
    return float(np.abs(got - expected).max())


@pytest.mark.slow
def test_export_training_checkpoint_matches_pytorch(checkpoints, tmp_path, capsys):
    import onnx
    out = tmp_path / 'van.onnx'
    # No --img-size: the run's size (64) comes from the checkpoint's args.
    assert export_onnx.main([str(checkpoints['main']), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'max abs diff' in printed and 'OK' in printed

    graph = onnx.load(str(out))
    assert graph.opset_import[0].version == 11
    (image,), (logits,) = graph.graph.input, graph.graph.output
    assert (image.name, logits.name) == ('image', 'class')
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, IMG, IMG]
    # The dynamic batch works at sizes other than the export example's.
    for batch in (1, 5):
        assert _onnx_vs_torch(out, checkpoints['model'], batch) < 1e-4


@pytest.mark.slow
def test_export_official_file_with_fold_bn(checkpoints, tmp_path, capsys):
    import onnx
    out = tmp_path / 'folded.onnx'
    code = export_onnx.main([str(checkpoints['official']), '--fold-bn', '--img-size', str(IMG), '--out', str(out)])
    assert code == 0
    assert 'folded 17 BatchNorm' in capsys.readouterr().out
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count('BatchNormalization') == 13
    # Compared with the unfolded model: the folding is checked end to end.
    assert _onnx_vs_torch(out, checkpoints['model'], 2) < 1e-4


@pytest.mark.slow
def test_export_of_the_reference_fixture_reproduces_reference_logits(tmp_path, reference_fixtures):
    checkpoint, io_file = reference_fixtures / 'van_b0_ref_10cls.pth.tar', reference_fixtures / 'van_b0_ref_io.pt'
    if not (checkpoint.is_file() and io_file.is_file()):
        pytest.skip(f'van_b0_ref_10cls.pth.tar or van_b0_ref_io.pt missing from {reference_fixtures}')
    import onnxruntime
    out = tmp_path / 'reference.onnx'
    assert export_onnx.main([str(checkpoint), '--fold-bn', '--out', str(out)]) == 0
    reference = safe_load(io_file)
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    (logits,) = session.run(['class'], {'image': reference['input'].numpy()})
    assert np.abs(logits - reference['logits'].numpy()).max() < 1e-4


@pytest.mark.slow
def test_export_that_fails_verification_leaves_no_file_and_keeps_an_earlier_one(checkpoints, tmp_path, capsys):
    out = tmp_path / 'deployed.onnx'
    out.write_bytes(b'an earlier, good export')
    # No float32 export reproduces PyTorch to 1e-12: verification must fail.
    assert export_onnx.main([str(checkpoints['official']), '--img-size', str(IMG), '--atol', '1e-12',
                             '--out', str(out)]) == 1
    assert 'FAILED' in capsys.readouterr().out
    assert out.read_bytes() == b'an earlier, good export'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['deployed.onnx']


@pytest.mark.slow
def test_export_default_output_path_from_the_command_line(checkpoints):
    result = subprocess.run([sys.executable, str(REPO_ROOT / 'tools' / 'export_onnx.py'), str(checkpoints['main'])],
                            capture_output=True, text=True, cwd=str(checkpoints['main'].parent.parent))
    assert result.returncode == 0, result.stderr
    assert (checkpoints['main'].parent / 'model_best.onnx').is_file()
    assert 'DeprecationWarning' not in result.stderr


class NotATensor:
    """Pickled by reference into an 'unsafe' checkpoint: loading it would need arbitrary code."""


def test_export_refuses_bad_files_with_a_clear_message(checkpoints, tmp_path, capsys):
    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'extra': NotATensor()}, unsafe)
    truncated = tmp_path / 'truncated.pth'  # an interrupted copy
    truncated.write_bytes(checkpoints['official'].read_bytes()[:100_000])
    other_net = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(8, 3, 3, 3), 'fc.weight': torch.zeros(4, 8)}}, other_net)

    for path, expected in ((tmp_path / 'missing.pth', 'not found'), (unsafe, 'refusing to read'),
                           (truncated, 'not a readable'), (other_net, 'pass --model')):
        assert export_onnx.main([str(path), '--out', str(tmp_path / 'x.onnx')]) == 2
        err = capsys.readouterr().err
        assert expected in err and str(path) in err and 'Traceback' not in err
    assert not (tmp_path / 'x.onnx').exists()


def test_export_rejects_a_model_the_weights_do_not_fit(checkpoints, tmp_path, capsys):
    assert export_onnx.main([str(checkpoints['main']), '--model', 'van_b1', '--out', str(tmp_path / 'x.onnx')]) == 2
    assert 'looks like van_b0' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'images'
    (folder / 'nested').mkdir(parents=True)
    paths = []
    for i, (h, w) in enumerate(((90, 120), (100, 100), (70, 50))):
        path = folder / f'img{i}.png'
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    gray = folder / 'nested' / 'gray.jpg'
    Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8)).save(gray)
    paths.append(gray)
    return folder, paths


def _printed_predictions(text):
    """{image path: [(name, percent), ...]} from predict's stdout."""
    results, current = {}, None
    for line in text.splitlines():
        if not line.startswith('  '):
            current = results.setdefault(line, [])
        else:
            rank, name, percent = line.split()[:3]
            current.append((name, float(percent.rstrip('%'))))
    return results


def test_predict_prints_top_classes_by_name(checkpoints, images, capsys):
    folder, paths = images
    assert predict.main([str(checkpoints['main']), str(folder), '-b', '3']) == 0
    results = _printed_predictions(capsys.readouterr().out)
    assert set(results) == {str(p) for p in paths}  # the folder is searched recursively

    # Same numbers as the model applied to the eval transform of the run's size (64: resize 71, crop 64).
    loaded = load_model(checkpoints['main'])
    transform, config = eval_preprocessing(loaded)
    assert config.input_size == (3, IMG, IMG) and config.interpolation == 'bicubic'
    names = {index: name for name, index in CLASSES.items()}
    for path in paths:
        with torch.no_grad():
            probs = loaded.model(transform(Image.open(path).convert('RGB'))[None]).softmax(-1)[0]
        top = probs.topk(len(CLASSES))
        expected = [(names[i], round(p * 100, 2)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        got = results[str(path)]
        assert [n for n, _ in got] == [n for n, _ in expected]  # all 4 classes: fewer than 5 exist
        assert np.allclose([p for _, p in got], [p for _, p in expected], atol=0.011)


def test_predict_default_preprocessing_is_the_official_eval_transform(checkpoints):
    from torchvision import transforms
    loaded = load_model(checkpoints['official'])
    transform, _ = eval_preprocessing(loaded)
    steps = {type(t): t for t in transform.transforms}
    assert steps[transforms.Resize].size == 248  # 224 / 0.9
    assert steps[transforms.Resize].interpolation == transforms.InterpolationMode.BICUBIC
    assert tuple(steps[transforms.CenterCrop].size) == (224, 224)
    assert tuple(steps[transforms.Normalize].mean) == tuple(steps[transforms.Normalize].std) == (0.5, 0.5, 0.5)


def test_predict_uses_the_runs_eval_options(checkpoints, tmp_path):
    from torchvision import transforms
    state_dict = checkpoints['model'].state_dict()
    run_options = tmp_path / 'run_options.pth.tar'
    torch.save({'arch': 'van_b0', 'state_dict': state_dict, 'class_to_idx': CLASSES,
                'args': {'model': 'van_b0', 'img_size': 96, 'crop_pct': 1.0, 'interpolation': 'bilinear',
                         'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}}, run_options)
    unset_options = tmp_path / 'unset_options.pth.tar'  # main.py stores None for options left unset
    torch.save({'arch': 'van_b0', 'state_dict': state_dict, 'class_to_idx': CLASSES,
                'args': {'model': 'van_b0', 'img_size': None, 'crop_pct': None, 'interpolation': None,
                         'mean': None, 'std': None}}, unset_options)

    loaded = load_model(run_options)
    _, config = eval_preprocessing(loaded)
    assert config.input_size == (3, 96, 96) and config.crop_pct == 1.0
    assert config.interpolation == 'bilinear' and config.mean == (0.485, 0.456, 0.406)
    _, config = eval_preprocessing(loaded, img_size=128)  # --img-size wins
    assert config.input_size == (3, 128, 128)

    loaded = load_model(unset_options)
    transform, config = eval_preprocessing(loaded)
    assert config.input_size == (3, 224, 224) and config.mean == (0.5, 0.5, 0.5)
    assert [t.size for t in transform.transforms if isinstance(t, transforms.Resize)] == [248]


def _rgba_and_16_bit_dataset(root):
    """An ImageFolder whose val images need load_rgb's rules: an RGBA image whose transparent half hides
    dark colours, and a 16-bit grey image (values up to 65535)."""
    rng = np.random.default_rng(3)
    for split in ('train', 'val'):
        (root / split / 'cat').mkdir(parents=True)
    rgba = rng.integers(0, 60, (60, 80, 4), dtype=np.uint8)
    rgba[:, :40, 3] = 0  # transparent: white in training, the hidden dark colours if alpha were dropped
    rgba[:, 40:, 3] = 255
    Image.fromarray(rgba, 'RGBA').save(root / 'val' / 'cat' / 'rgba.png')
    gray = (np.linspace(1000, 65000, 60 * 80).reshape(60, 80)).astype(np.uint16)
    gray[:10] = 30000  # 30000 / 257 -> 117 in training; clipping to 8 bit would make it 255
    Image.fromarray(gray).save(root / 'val' / 'cat' / 'gray16.png')
    Image.new('RGB', (8, 8)).save(root / 'train' / 'cat' / 'x.png')
    return sorted((root / 'val' / 'cat').iterdir())


def test_predict_sees_the_pixels_evaluation_sees_for_rgba_and_16_bit_images(checkpoints, tmp_path):
    from utils.data import build_datasets
    paths = _rgba_and_16_bit_dataset(tmp_path / 'data')
    loaded = load_model(checkpoints['main'])
    transform, config = eval_preprocessing(loaded)
    _, val_set, _ = build_datasets(str(tmp_path / 'data'), config, {}, seed=0, with_train=False)
    assert [Path(p) for p, _ in val_set.samples] == paths
    evaluated = torch.stack([val_set[i].image for i in range(len(paths))])
    predicted = torch.stack([predict.preprocess(path, transform) for path in paths])
    assert torch.equal(predicted, evaluated)
    # Not what a plain Image.convert('RGB') gives: that path would see other pixels in both images.
    for path, tensor in zip(paths, predicted):
        assert not torch.allclose(transform(Image.open(path).convert('RGB')), tensor, atol=0.05)
    # The printed probabilities are the model's on those very tensors.
    with torch.no_grad():
        expected = loaded.model(evaluated).softmax(-1)
    results = dict(predict.predict(loaded.model, transform, paths, torch.device('cpu'), topk=4))
    for path, row in zip(paths, expected):
        assert [i for i, _ in results[path]] == row.argsort(descending=True).tolist()
        assert np.allclose([p for _, p in results[path]], row.sort(descending=True).values.tolist(), atol=1e-6)


@pytest.mark.parametrize('class_map_kind', ['txt', 'json_list', 'json_class_to_idx', 'json_index_to_name'])
def test_predict_names_from_a_class_map_file(checkpoints, images, tmp_path, capsys, class_map_kind):
    names = ['alpha', 'beta', 'gamma', 'delta']
    class_map = tmp_path / ('names.txt' if class_map_kind == 'txt' else 'names.json')
    if class_map_kind == 'txt':
        class_map.write_text('\n'.join(names) + '\n')
    elif class_map_kind == 'json_list':
        class_map.write_text(json.dumps(names))
    elif class_map_kind == 'json_class_to_idx':
        class_map.write_text(json.dumps({n: i for i, n in enumerate(names)}))
    else:  # ImageNet's imagenet_class_index.json layout: {"0": ["n01440764", "tench"], ...}
        class_map.write_text(json.dumps({str(i): [f'n{i:08d}', n] for i, n in enumerate(names)}))
    _, paths = images
    assert predict.main([str(checkpoints['official']), str(paths[0]), '--class-map', str(class_map)]) == 0
    (got,) = _printed_predictions(capsys.readouterr().out).values()
    assert sorted(n for n, _ in got) == sorted(names)


def test_predict_without_names_prints_indices(checkpoints, images, capsys):
    _, paths = images
    assert predict.main([str(checkpoints['official']), str(paths[0]), '--topk', '2']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all('class' in line for line in lines[1:])


def test_predict_skips_unreadable_images_and_reports_them(checkpoints, images, capsys):
    folder, paths = images
    (folder / 'broken.jpg').write_text('this is not a JPEG')
    assert predict.main([str(checkpoints['main']), str(folder)]) == 1
    captured = capsys.readouterr()
    assert set(_printed_predictions(captured.out)) == {str(p) for p in paths}
    assert 'broken.jpg' in captured.err and 'cannot read image' in captured.err


def test_predict_skips_images_too_elongated_to_preprocess(checkpoints, images, capsys):
    folder, paths = images
    Image.new('RGB', (300, 2), (10, 20, 30)).save(folder / 'strip.png')  # 150:1
    assert predict.main([str(checkpoints['main']), str(folder)]) == 1
    captured = capsys.readouterr()
    assert set(_printed_predictions(captured.out)) == {str(p) for p in paths}
    assert f"skipped {folder / 'strip.png'}: cannot read image (300 x 2 pixels is too elongated" in captured.err


def test_predict_user_errors(checkpoints, images, tmp_path, capsys):
    _, paths = images
    wrong_map = tmp_path / 'three.txt'
    wrong_map.write_text('a\nb\nc\n')
    assert predict.main([str(checkpoints['main']), str(paths[0]), '--class-map', str(wrong_map)]) == 2
    assert '3 names but the model has 4' in capsys.readouterr().err
    assert predict.main([str(checkpoints['main']), str(tmp_path / 'nope.jpg')]) == 2
    assert 'no such file' in capsys.readouterr().err
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert predict.main([str(checkpoints['main']), str(empty)]) == 2
    assert 'no image files' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------
SUMMARY = ('epoch,train_loss,lr,eval_loss,eval_top1,eval_top5\n'
           '0,2.30,1.0e-04,2.10,22.5,61.0\n'
           '1,1.80,1.0e-03,,,\n'  # an epoch without validation
           '2,1.20,5.0e-04,1.05,71.0,96.5\n')


def test_plot_curves_writes_a_png(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'summary.csv').write_text(SUMMARY)
    written = plot_curves(run / 'summary.csv', run / 'curves.png')
    with Image.open(written) as png:
        assert png.format == 'PNG' and png.width > 800 and png.height > 300
        # Not a blank canvas: the lines put many distinct colours on it.
        assert len(png.convert('RGB').getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
    assert not list(run.glob('*.tmp'))


def test_plot_curves_command_line(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'summary.csv').write_text(SUMMARY)
    assert plot_curves_tool.main([str(run)]) == 0
    assert (run / 'curves.png').is_file()
    (run / 'other.csv').write_text('epoch,loss\n0,1.0\n')
    assert plot_curves_tool.main([str(run / 'other.csv')]) == 2
    assert 'missing' in capsys.readouterr().err
    assert plot_curves_tool.main([str(tmp_path / 'no-run')]) == 2


# ---------------------------------------------------------------------------------------------
# TensorBoard and progress
# ---------------------------------------------------------------------------------------------
def test_tensorboard_missing_says_so_and_continues(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # import now raises ImportError
    logger = logging.getLogger('test_tools.tb')
    with caplog.at_level(logging.INFO, logger='test_tools.tb'):
        writer = create_writer(True, tmp_path / 'tb', is_main=True, logger=logger)
    assert isinstance(writer, NullWriter)
    assert 'tensorboard package is not installed' in caplog.text
    writer.write_epoch({'epoch': 0, 'train_loss': 1.0})
    writer.close()
    assert not (tmp_path / 'tb').exists()


def test_tensorboard_only_when_asked_and_on_rank_0(tmp_path):
    assert isinstance(create_writer(False, tmp_path / 'a', is_main=True), NullWriter)
    assert isinstance(create_writer(True, tmp_path / 'b', is_main=False), NullWriter)


def test_tensorboard_writes_epoch_scalars(tmp_path):
    pytest.importorskip('tensorboard', reason='the tensorboard package is optional and not installed here')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = create_writer(True, tmp_path / 'tb', is_main=True)
    assert isinstance(writer, TensorBoardWriter)
    writer.write_epoch({'epoch': 0, 'train_loss': 2.5, 'lr': 1e-4, 'eval_loss': 2.0, 'eval_top1': 30.0,
                        'eval_top5': 70.0})
    writer.write_epoch({'epoch': 1, 'train_loss': 1.5, 'lr': 1e-3, 'eval_loss': '', 'eval_top1': '',
                        'eval_top5': ''})
    writer.close()
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars('train/loss')] == [(0, 2.5), (1, 1.5)]
    assert [s.step for s in events.Scalars('eval/acc1')] == [0]  # no fake value for the epoch without eval


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_an_interactive_rank_0():
    assert not reporting.progress_enabled(True, io.StringIO())
    assert not reporting.progress_enabled(False, _FakeTerminal())
    assert reporting.progress_enabled(True, _FakeTerminal())
    items = [1, 2, 3]
    assert reporting.progress(items, 3, 'x', enabled=False) is items


def test_progress_bar_keeps_log_lines_and_file_unchanged(monkeypatch, tmp_path):
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    console_out = io.StringIO()
    monkeypatch.setattr(sys, 'stdout', console_out)
    logger = logging.getLogger('test_tools.progress')
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    log_file = tmp_path / 'train.log'
    file_handler = logging.FileHandler(log_file)
    logger.handlers = [console, file_handler]
    logger.setLevel(logging.INFO)
    try:
        seen = []
        for step, item in enumerate(reporting.progress(iter(range(10)), total=4, desc='Train 0',
                                                             enabled=True, logger=logger)):
            if step >= 4:  # the training loop stops like this at --max-steps-per-epoch
                break
            seen.append(item)
            logger.info(f'Train: 0 [{step + 1:>4d}/   4]  Loss: 1.0000 (1.0000)')
        assert logger.handlers == [console, file_handler]  # restored after the loop, also after break
    finally:
        file_handler.close()
        logger.handlers = []
    assert seen == [0, 1, 2, 3]
    expected = ''.join(f'Train: 0 [{s:>4d}/   4]  Loss: 1.0000 (1.0000)\n' for s in range(1, 5))
    assert log_file.read_text() == expected
    assert console_out.getvalue() == expected  # console lines printed whole, above the bar
    assert 'Train 0' in terminal.getvalue() and '/4 ' in terminal.getvalue()  # the bar was drawn


# ---------------------------------------------------------------------------------------------
# Wired into main.py: curves.png, --tensorboard and the progress bar in a real training run
# ---------------------------------------------------------------------------------------------
TINY_RUN = ['--model', 'van_b0', '--img-size', '32', '-b', '8', '--warmup-epochs', '0', '--cooldown-epochs', '0',
            '--log-interval', '2', '-j', '0', '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0',
            '--max-steps-per-epoch', '2']


def _summary_column(run_dir, column):
    import csv
    with open(run_dir / 'summary.csv', newline='') as f:
        return [float(row[column]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_training_writes_curves_and_tensorboard_scalars(shapes_dataset, tmp_path):
    pytest.importorskip('tensorboard', reason='the tensorboard package is optional and not installed here')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import main
    assert main.main(['--data_path', str(shapes_dataset), *TINY_RUN, '--epochs', '2', '--tensorboard',
                      '--output', str(tmp_path), '--experiment', 'tb']) == 0
    run_dir = tmp_path / 'tb'
    with Image.open(run_dir / 'curves.png') as png:
        assert png.format == 'PNG'
    events = EventAccumulator(str(run_dir / 'tensorboard'))
    events.Reload()
    for tag, column in (('train/loss', 'train_loss'), ('eval/acc1', 'eval_top1'), ('train/lr', 'lr')):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [0, 1]
        assert np.allclose([p.value for p in points], _summary_column(run_dir, column), rtol=1e-5)


@pytest.mark.slow
def test_training_without_tensorboard_installed_says_so_and_finishes(shapes_dataset, tmp_path, monkeypatch):
    import main
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # import now raises ImportError
    assert main.main(['--data_path', str(shapes_dataset), *TINY_RUN, '--epochs', '1', '--tensorboard',
                      '--output', str(tmp_path), '--experiment', 'no-tb']) == 0
    run_dir = tmp_path / 'no-tb'
    log = (run_dir / 'log.txt').read_text()
    assert 'tensorboard package is not installed' in log and '*** Best metric' in log
    assert (run_dir / 'curves.png').is_file() and not (run_dir / 'tensorboard').exists()


@pytest.mark.slow
def test_progress_bar_in_a_terminal_leaves_the_logs_unchanged(shapes_dataset, tmp_path, repo_root, subprocess_env):
    import fcntl
    import os
    import pty
    import re
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    # A real terminal has a size; a bare pty reports 0 columns and tqdm would draw an empty bar.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 120, 0, 0))
    terminal = bytearray()

    def read_terminal():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            terminal.extend(data)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    child = subprocess.Popen([sys.executable, 'main.py', '--data_path', str(shapes_dataset), *TINY_RUN,
                              '--epochs', '1', '--output', str(tmp_path), '--experiment', 'tty'],
                             cwd=repo_root, env=subprocess_env, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    stdout, _ = child.communicate(timeout=600)
    reader.join(timeout=10)
    os.close(master)
    assert child.returncode == 0, stdout[-2000:]

    shown = terminal.decode(errors='replace')
    assert re.search(r'Train 0: .*\| 0/2 \[', shown) and re.search(r'Test: .*\| 0/3 \[', shown)  # bars with ETA
    log_lines = [line.split(' ', 2)[2] for line in (tmp_path / 'tty' / 'log.txt').read_text().splitlines()]
    # The log file and stdout carry exactly the ModelZoo lines, no bar fragments or carriage returns.
    assert log_lines == stdout.splitlines()
    assert any(line.startswith('Train: 0 [   2/   2 (100%)]  Loss: ') for line in log_lines)
    assert any(line.startswith('Epoch 0 FPS:') for line in log_lines)
    assert not any('\r' in line or '|' in line for line in log_lines)


@pytest.mark.parametrize('argv, message', [
    (['--img-size', '-5'], 'argument --img-size: expected an integer >= 32'),
    (['--img-size', '8.5'], 'argument --img-size'),
    (['--topk', '0'], 'argument --topk'),
    (['-b', 'many'], 'argument -b/--batch-size'),
    (['--device', 'gpu7'], 'argument --device'),
    (['--device', 'cpu:x'], 'argument --device'),
])
def test_predict_invalid_options_are_one_message(checkpoints, images, argv, message, capsys):
    _, paths = images
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(checkpoints['main']), str(paths[0]), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a CUDA GPU')
def test_predict_on_a_missing_gpu_is_one_message(checkpoints, images, capsys):
    _, paths = images
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(checkpoints['main']), str(paths[0]), '--device', 'cuda'])
    assert exit_info.value.code == 2
    assert 'no CUDA GPU' in capsys.readouterr().err

"""Classify images with a trained VAN checkpoint and print the top-5 classes of each.

    python tools/predict.py output/my-run/model_best.pth.tar photo.jpg more_photos/
    python tools/predict.py van_tiny_754.pth.tar img.jpg --class-map imagenet_classes.txt

Folders are searched recursively for the files a dataset would use as images (utils.images: the
image extensions, no hidden files; sorted). Class names come from the checkpoint's `class_to_idx`
(main.py stores it), else from `--class-map` (a text file with one name per line in class-index
order, or JSON), else the class indices are printed.

Each image goes through exactly what evaluation does with a validation image: decoding by
utils.images.load_rgb (transparency composited on white, 16-bit grey scaled to 8 bit, the same
size checks) and the evaluation transform (utils.images.eval_transform: for VAN at 224 a bicubic
resize to 248, center crop 224, mean = std = 0.5) with the run's own options when the checkpoint
stores them (main.py's --img-size, --crop-pct, --mean, --std, --interpolation).

Output, per image:
    photos/cat.jpg
      1. cat          97.31%  (class 3)
      2. dog           1.20%  (class 5)
An image that cannot be read is reported and skipped; the exit status is then 1.
"""
import argparse
import sys
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from utils.errors import BadImageError, UserError  # noqa: E402
from utils.images import image_files, load_rgb  # noqa: E402
from utils.inference import eval_preprocessing, load_model  # noqa: E402
from utils.options import IMG_SIZE, Number, usable_device  # noqa: E402


def find_images(inputs):
    """Image files named by `inputs` (files, or folders searched recursively), in a stable order.

    Raises FileNotFoundError naming a path that does not exist, ValueError when nothing is found.
    """
    files = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(Path(p) for p in image_files(str(entry)))
            if not found:
                raise ValueError(f'{entry}: no image files ({", ".join(IMG_EXTENSIONS)}) in this folder')
            files.extend(found)
        elif entry.is_file():
            files.append(entry)  # named explicitly: trust the user, decoding will tell
        else:
            raise FileNotFoundError(f'{entry}: no such file or folder')
    return files


def preprocess(path, transform) -> torch.Tensor:
    """The model input of one image file: decoded and transformed exactly as evaluation does
    (utils.images.load_rgb, then `transform` from utils.inference.eval_preprocessing); BadImageError
    naming the file when it cannot be used."""
    return transform(load_rgb(str(path)))


def predict(model, transform, paths, device, batch_size=16, topk=5):
    """Yield (path, [(class index, probability), ...] best first) or (path, error message) per file."""
    model = model.to(device)
    batch_paths, batch = [], []

    def run():
        with torch.no_grad():
            probs = model(torch.stack(batch).to(device)).float().softmax(dim=-1).cpu()
        values, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        for path, v, i in zip(batch_paths, values.tolist(), indices.tolist()):
            yield path, list(zip(i, v))
        batch_paths.clear(), batch.clear()

    for path in paths:
        try:
            image = preprocess(path, transform)
        except BadImageError as e:
            yield path, f'{path}: cannot read image ({e.reason})'
            continue
        batch_paths.append(path), batch.append(image)
        if len(batch) == batch_size:
            yield from run()
    if batch:
        yield from run()


def format_result(path, top, class_names):
    lines = [str(path)]
    width = max((len(class_names[i]) for i, _ in top), default=0) if class_names else 0
    for rank, (index, prob) in enumerate(top, start=1):
        name = class_names[index] if class_names else f'class {index}'
        suffix = f'  (class {index})' if class_names else ''
        lines.append(f'  {rank}. {name:<{width}}  {prob * 100:6.2f}%{suffix}')
    return '\n'.join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', help='checkpoint or weights file with a classifier head')
    parser.add_argument('images', nargs='+', help='image files and/or folders (searched recursively)')
    parser.add_argument('--model', default=None, help='VAN variant, e.g. van_b0; only when the checkpoint does not say')
    parser.add_argument('--class-map', default=None,
                        help='class names: .txt with one name per line (class-index order) or .json; '
                             'overrides the names stored in the checkpoint')
    parser.add_argument('--img-size', type=IMG_SIZE, default=None,
                        help='input size (default: the training size stored in the checkpoint, else the model default 224)')
    parser.add_argument('--topk', type=Number(int, at_least=1), default=5, help='classes to print per image (default 5)')
    parser.add_argument('-b', '--batch-size', type=Number(int, at_least=1), default=16,
                        help='images per forward pass (default 16)')
    parser.add_argument('--device', type=usable_device, default='auto',
                        help='torch device to run on: auto (default: NPU, then CUDA, then CPU), cpu, cuda[:N], npu[:N]')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    try:
        paths = find_images(args.images)
        loaded = load_model(args.checkpoint, model_name=args.model, class_map=args.class_map)
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f'predict: error: {err}', file=sys.stderr)
        return 2
    transform, config = eval_preprocessing(loaded, args.img_size)
    print(f'{args.checkpoint}: {loaded.variant}, {loaded.num_classes} classes, input {config.input_size[1]}x'
          f'{config.input_size[2]} ({config.interpolation}, crop {config.crop_pct:g}); '
          f'{len(paths)} image(s)', file=sys.stderr)

    failed = 0
    for path, result in predict(loaded.model, transform, paths, device, args.batch_size, args.topk):
        if isinstance(result, str):
            failed += 1
            print(f'predict: skipped {result}', file=sys.stderr)
        else:
            print(format_result(path, result, loaded.class_names), flush=True)
    if failed:
        print(f'predict: {failed} of {len(paths)} file(s) could not be read', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

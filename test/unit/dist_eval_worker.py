"""Run by test_main.py under torchrun: evaluate one model on every rank and write each rank's metrics.

usage: torchrun --nproc_per_node N dist_eval_worker.py DATA_ROOT OUT_DIR
"""
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.data import build_datasets, build_loaders  # noqa: E402
from utils.images import DataConfig  # noqa: E402
from utils.device import cleanup_distributed, setup_device  # noqa: E402
from utils.engine import evaluate  # noqa: E402


def main(data_root: str, out_dir: str) -> None:
    dist_env = setup_device('cpu')
    config = DataConfig((3, 32, 32), 'bilinear', (0.5,) * 3, (0.5,) * 3, 1.0)
    _, val_set, class_to_idx = build_datasets(data_root, config, dict(interpolation='bilinear'), seed=0)
    # Batch 4 over 19 images and 2 ranks: rank 0 gets 10 (3 batches), rank 1 gets 9 (3 batches).
    _, val_loader = build_loaders(None, val_set, 4, 4, 0, dist_env.rank, dist_env.world_size, 0, False)
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, len(class_to_idx)))
    metrics = evaluate(model, val_loader, dist_env.device, dist_env, logging.getLogger('worker'))
    metrics['local_images'] = len(val_loader.sampler)
    Path(out_dir, f'rank{dist_env.rank}.json').write_text(json.dumps(metrics))
    cleanup_distributed()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])

"""Saving and restoring the random number generators, so a resumed run draws the same numbers.

Mixup/CutMix (NumPy), drop path and dropout (torch) draw from the process-wide generators; a
mid-epoch resume reproduces an uninterrupted run only if those generators continue where they
stopped. The state is stored as plain tensors, ints and tuples so that checkpoints holding it
still load with `torch.load(weights_only=True)`.
"""
import random
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed as dist


TORCH_SEEDS = range(-2**63, 2**64)  # what torch.manual_seed accepts


def torch_seed(value: int) -> int:
    """`value` as a seed torch accepts. Seeds derived from a large --seed (seed x 10^13 + ...) can
    exceed 64 bits; they are taken modulo 2^64, which keeps the values one run derives distinct
    (they span far less than 2^64). Values torch accepts are returned unchanged, so runs keep the
    random numbers they always drew."""
    return value if value in TORCH_SEEDS else value % 2**64


def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU generator and `device`'s generator."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if accelerator is not None and hasattr(accelerator, "get_rng_state"):
        state["device"] = accelerator.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Undo `capture_rng_state`; the device generator is restored only on the same kind of device."""
    random.setstate(_as_tuples(state["python"]))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if "device" in state and accelerator is not None and hasattr(accelerator, "set_rng_state"):
        accelerator.set_rng_state(state["device"])


def _as_tuples(value):
    # random.setstate needs tuples; a checkpoint round trip may have produced lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def capture_all_ranks(device: torch.device) -> list:
    """Every rank's RNG state, indexed by rank (each rank draws its own drop-path numbers).
    All ranks must call it; in a single process it is a list of one."""
    state = capture_rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states

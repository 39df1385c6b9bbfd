"""Training sample order that can be resumed in the middle of an epoch.

The order of epoch `e` is a permutation drawn from `seed + e` alone, so any process can rebuild it.
Ranks take interleaved slices (rank r gets positions r, r+W, r+2W, ... like DistributedSampler),
which means that after k steps of batch B on W ranks exactly the first k*B*W positions of the
permutation have been used, whatever W and B were. A resumed run skips exactly those positions:
no sample is repeated or left out, even when it resumes with a different number of devices.
Started at position 0 it yields exactly what torch's DistributedSampler yields, so runs that
never stop are unchanged.
"""
import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

from utils.rng_state import torch_seed


class ResumableSampler(Sampler[int]):
    """Per-epoch shuffled, rank-sharded order of sample indices that can start part-way.

    Call `set_epoch(epoch, start=consumed)` before each epoch; `consumed` is the number of samples
    all ranks together have already used in that epoch (0 for a fresh epoch). With drop_last the
    tail that does not fill one step on every rank is left out (as the reference's drop_last
    training loader does); otherwise it is padded with the epoch's first samples (as
    DistributedSampler does; the training DataLoader's own drop_last then drops the partial batch).
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside 0..{self.num_samples} for a dataset of {self.num_samples} samples")
        self.epoch = epoch
        self.start = start

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed(torch_seed(self.seed + self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def _remaining_per_rank(self) -> int:
        remaining = self.num_samples - self.start
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        remaining = order[self.start:]
        per_rank = self._remaining_per_rank()
        total = per_rank * self.num_replicas
        if total > len(remaining):  # pad so every rank gets the same number of samples
            padding = order[: total - len(remaining)]
            remaining = torch.cat([remaining, padding])
        return iter(remaining[self.rank:total:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self._remaining_per_rank()

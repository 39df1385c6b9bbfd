"""Training sample order that can be resumed in the middle of an epoch.

The order of epoch `e` is a permutation drawn from `seed + e` alone, so any process can rebuild it.
Ranks take interleaved slices (rank r gets positions r, r+W, r+2W, ... like DistributedSampler),
which means that after k steps of batch B on W ranks exactly the first k*B*W positions of the
permutation have been used, whatever W and B were. A resumed run skips exactly those positions:
no sample is repeated or left out, even when it resumes with a different number of devices.

Each index is yielded together with a per-sample seed derived from (seed, epoch, index), which
RobustImageFolder uses for that sample's random augmentation: the augmentation then does not
depend on which DataLoader worker loads the sample or where a resumed run starts.
"""
import math
from typing import Iterator, Tuple

import torch
from torch.utils.data import Sampler

# Large odd multipliers spread (seed, epoch, index) over the 63-bit seed space without collisions
# for any realistic dataset size and epoch count.
_EPOCH_STRIDE = 0x9E3779B97F4A7C15
_SEED_STRIDE = 0xBF58476D1CE4E5B9


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random augmentation in one epoch."""
    return (seed * _SEED_STRIDE + epoch * _EPOCH_STRIDE + index) % (2**63)


class ResumableSampler(Sampler[Tuple[int, int]]):
    """Per-epoch shuffled, rank-sharded order of (index, sample seed) pairs that can start part-way.

    Call `set_epoch(epoch, start=consumed)` before each epoch; `consumed` is the number of samples
    all ranks together have already used in that epoch (0 for a fresh epoch). With drop_last the
    tail that does not fill one step on every rank is left out (as the reference's drop_last
    training loader does); otherwise it is padded with the epoch's first samples.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
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
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def _remaining_per_rank(self) -> int:
        remaining = self.num_samples - self.start
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = self._order()
        remaining = order[self.start:]
        per_rank = self._remaining_per_rank()
        total = per_rank * self.num_replicas
        if total > len(remaining):  # pad so every rank gets the same number of samples
            padding = order[: total - len(remaining)]
            remaining = torch.cat([remaining, padding])
        for index in remaining[self.rank:total:self.num_replicas].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self._remaining_per_rank()

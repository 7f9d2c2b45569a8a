"""A resumable, data-parallel sampler: the order is a pure function of (seed, epoch, rank)."""

from __future__ import annotations

import math

import torch

from squall.errors import DataError


class EpochSampler(torch.utils.data.Sampler):
    """Sample indices of one epoch for one data-parallel rank, resumable mid-epoch.

    The epoch's order is ``randperm(num_samples)`` from a generator seeded with
    ``seed + epoch`` (or ``0..n-1`` without shuffling). Rank ``r`` of ``num_replicas`` takes
    positions ``r, r + num_replicas, ...``; with ``drop_last`` every rank gets
    ``num_samples // num_replicas`` indices, else the order is padded from its start so all ranks
    get ``ceil(num_samples / num_replicas)``. Model-parallel ranks that share one sample use the
    same data-parallel ``rank``.

    :meth:`set_position` skips the first ``offset`` indices of the rank's epoch without reading
    them, so a resumed run continues exactly where the checkpoint left off.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 num_replicas: int = 1, drop_last: bool = False):  # fmt: skip
        if not 0 <= rank < num_replicas:
            raise DataError(f"sampler rank {rank} must lie in [0, {num_replicas})")
        per_rank = (
            num_samples // num_replicas if drop_last else math.ceil(num_samples / num_replicas)
        )
        if per_rank < 1:
            raise DataError(
                f"{num_samples} samples cannot feed {num_replicas} data-parallel ranks; "
                "use fewer ranks or a longer time range"
            )
        self.num_samples, self.shuffle, self.seed = int(num_samples), bool(shuffle), int(seed)
        self.rank, self.num_replicas, self.per_rank = int(rank), int(num_replicas), per_rank
        self.epoch, self.offset = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, offset: int) -> None:
        """Continue epoch ``epoch`` after its first ``offset`` indices (for this rank)."""
        if not 0 <= offset <= self.per_rank:
            raise DataError(f"sampler offset {offset} outside [0, {self.per_rank}]")
        self.epoch, self.offset = int(epoch), int(offset)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def indices(self, epoch: int) -> list[int]:
        """All indices of ``epoch`` for this rank (ignoring the offset)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.indices(self.epoch)[self.offset :])

    def __len__(self) -> int:
        return self.per_rank - self.offset

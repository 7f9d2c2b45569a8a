"""The training sampler: endless, resumable at any sample, one disjoint share per data-parallel
replica. Used by every training loop (``jobs.train`` and the scaling points alike)."""

from __future__ import annotations

import torch

from squall.errors import DataError


class ResumableSampler(torch.utils.data.Sampler):
    """Endless sample order of one data-parallel replica, starting at any position.

    Epoch ``e`` is ``randperm(num_samples)`` drawn from a generator seeded with ``seed + e``: the
    order is a pure function of ``(seed, epoch, rank, replicas)``, nothing else (no global RNG,
    no worker count).

    Replica ``rank`` of ``replicas`` takes positions ``rank, rank + replicas, ...`` of the epoch's
    permutation cut to ``per_replica * replicas`` samples, ``per_replica = num_samples //
    replicas``.

    **The tail is dropped**, not padded: the last ``num_samples % replicas`` samples of each
    permutation are skipped, so within an epoch no sample is seen twice and replicas never
    overlap (padding would repeat a few samples and weigh them double). Each epoch draws a new
    permutation, so a different tail is left out every epoch and no sample is left out for good.
    Model-parallel ranks that share one sample use the same ``rank`` (their data-parallel rank).

    ``samples_seen`` is how many samples this replica has drawn already (the training step times
    the per-replica batch, as a checkpoint records it): iteration starts with the next one, so a
    resumed run reads exactly the samples the uninterrupted run would have read. Batches may span
    an epoch boundary: the stream is one sequence of epochs.

    Parameters
    ----------
    num_samples : int
        Size of the dataset (training windows).
    seed : int
        Seed of the epochs' permutations (``training.seed``).
    samples_seen : int
        Position of this replica in its stream.
    rank, replicas : int
        This replica's data-parallel rank and the number of replicas.
    """

    def __init__(self, num_samples: int, seed: int, samples_seen: int = 0, rank: int = 0,
                 replicas: int = 1) -> None:  # fmt: skip
        if not 0 <= rank < replicas:
            raise DataError(f"sampler rank {rank} must lie in [0, {replicas})")
        if num_samples < replicas:
            raise DataError(f"{num_samples} samples cannot feed {replicas} data-parallel "
                            "replicas; use fewer ranks or a longer time range")  # fmt: skip
        if samples_seen < 0:
            raise DataError(f"sampler position {samples_seen} must be >= 0")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.rank, self.replicas = int(rank), int(replicas)
        self.samples_seen = int(samples_seen)

    @property
    def per_replica(self) -> int:
        """Samples each replica draws per epoch."""
        return self.num_samples // self.replicas

    def position(self) -> tuple[int, int]:
        """``(epoch, offset)`` of the next sample: epoch number and index within its share."""
        return divmod(self.samples_seen, self.per_replica)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This replica's share of epoch ``epoch``, in order."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=gen)[: self.per_replica * self.replicas]
        return order[self.rank :: self.replicas].tolist()

    def __iter__(self):
        epoch, offset = self.position()
        while True:
            yield from self.epoch_indices(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a length for its own bookkeeping
        return 2**62

    def state_dict(self) -> dict:
        return {"seed": self.seed, "samples_seen": self.samples_seen, "rank": self.rank,
                "replicas": self.replicas}  # fmt: skip

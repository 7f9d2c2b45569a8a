"""Ensemble x model-parallel x data-parallel layout of the ranks, degree checks, process groups.

``world_size = ensemble * model_parallel * data_parallel``. Ranks are laid out model-parallel
first, then ensemble, then data: global rank ``r`` is part ``r % M`` of its model group, ensemble
rank ``(r // M) % E`` and data-parallel replica ``r // (M * E)``. The ``M`` GPUs that exchange
halos every layer are neighbours (one node, NVLink); the ``E`` ranks that hold the other members
of the same samples (one all-gather of the outputs per rollout step) come next; the data-parallel
groups (same part, same members, different samples) gather ranks ``M * E`` apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from squall.errors import ConfigError


class LayoutError(ConfigError):
    """World size, parallel degrees, members and graph do not fit together."""


@dataclass(frozen=True)
class Layout:
    """Degrees of a run: ``world_size = ensemble * model_parallel * data_parallel``.

    Attributes
    ----------
    world_size : int
        Number of processes (one per GPU).
    model_parallel : int
        Ranks sharing one member's graph (``M``).
    ensemble : int
        Ranks sharing the members of one sample (``E``): each holds ``members / E`` of them.
    """

    world_size: int
    model_parallel: int = 1
    ensemble: int = 1

    def __post_init__(self) -> None:
        w, m, e = self.world_size, self.model_parallel, self.ensemble
        if w < 1 or m < 1 or e < 1 or w % (m * e):
            raise LayoutError(
                f"world_size={w} must be a positive multiple of ensemble={e} x "
                f"model_parallel={m} = {e * m} (data_parallel = world_size / (ensemble x "
                f"model_parallel) = {w / max(m * e, 1):g})"
            )

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.model_parallel * self.ensemble)

    @property
    def name(self) -> str:
        """Short name, e.g. ``dp4``, ``ens2xmp2xdp1``: the axes of more than one rank."""
        axes = [f"ens{self.ensemble}"] * (self.ensemble > 1)
        axes += [f"mp{self.model_parallel}"] * (self.model_parallel > 1)
        return "x".join(axes + [f"dp{self.data_parallel}"] * (self.data_parallel > 1 or not axes))

    def model_rank(self, rank: int) -> int:
        """Part of the graph rank ``rank`` computes."""
        return rank % self.model_parallel

    def ensemble_rank(self, rank: int) -> int:
        """Share of the members rank ``rank`` holds."""
        return (rank // self.model_parallel) % self.ensemble

    def data_rank(self, rank: int) -> int:
        """Data-parallel replica of rank ``rank`` (the samples it reads)."""
        return rank // (self.model_parallel * self.ensemble)

    def _rank(self, data: int, ens: int, part: int) -> int:
        return (data * self.ensemble + ens) * self.model_parallel + part

    def model_groups(self) -> list[list[int]]:
        """Ranks computing the parts of one member set of one replica."""
        m = self.model_parallel
        return [[self._rank(d, e, p) for p in range(m)]
                for d in range(self.data_parallel) for e in range(self.ensemble)]  # fmt: skip

    def ensemble_groups(self) -> list[list[int]]:
        """Ranks holding the member shares of one replica's samples, for one part."""
        return [[self._rank(d, e, p) for e in range(self.ensemble)]
                for d in range(self.data_parallel) for p in range(self.model_parallel)]  # fmt: skip

    def data_groups(self) -> list[list[int]]:
        """Ranks holding the same part and members of different samples."""
        return [[self._rank(d, e, p) for d in range(self.data_parallel)]
                for e in range(self.ensemble) for p in range(self.model_parallel)]  # fmt: skip

    def check(self, num_nodes: dict[str, int], batch_size: int, gpus_per_node: int | None = None,
              members: int | None = None):  # fmt: skip
        """Raise :class:`LayoutError` if the graph, the members or the node size cannot take this
        layout.

        Parameters
        ----------
        num_nodes : dict
            Node set -> node count (every set is split ``M`` ways).
        batch_size : int
            Samples per model group per step (any value >= 1 works with model parallelism).
        gpus_per_node : int, optional
            If given, a model group must fit inside one node.
        members : int, optional
            Ensemble members per sample: they must split evenly over the ``E`` ensemble ranks.
        """
        m, e = self.model_parallel, self.ensemble
        problems = []
        small = {k: v for k, v in num_nodes.items() if v < m}
        if small:
            problems.append(f"node sets {small} have fewer nodes than model_parallel={m}")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} < 1")
        if gpus_per_node is not None and m > gpus_per_node:
            problems.append(
                f"model_parallel={m} exceeds gpus_per_node={gpus_per_node}: halo exchanges every "
                "layer would cross nodes"
            )
        if e > 1 and (members is None or members % e):
            problems.append(f"model.ensemble.members={members} does not split over ensemble={e} "
                            "ranks")  # fmt: skip
        if problems:
            raise LayoutError(
                f"layout world_size={self.world_size} = ensemble={e} x model_parallel={m} x "
                f"data_parallel={self.data_parallel}, batch_size={batch_size}, "
                f"nodes {num_nodes}: " + "; ".join(problems)
            )


@dataclass(frozen=True, eq=False)
class ProcessGroups:
    """This rank's groups (``None`` stands for a group of one: no communication).

    Attributes
    ----------
    layout : Layout
    rank : int
        Global rank.
    model : ProcessGroup or None
        Ranks of this rank's model group (halo exchanges, gathers).
    data : ProcessGroup or None
        Ranks holding the same part and members in the other replicas.
    world : ProcessGroup or None
        Every rank (gradient reduction).
    ensemble : ProcessGroup or None
        Ranks holding the other members of this rank's samples, for the same part (the member
        all-gather of the loss).
    """

    layout: Layout
    rank: int
    model: object
    data: object
    world: object
    ensemble: object = None

    @property
    def model_rank(self) -> int:
        return self.layout.model_rank(self.rank)

    @property
    def data_rank(self) -> int:
        return self.layout.data_rank(self.rank)

    @property
    def ensemble_rank(self) -> int:
        return self.layout.ensemble_rank(self.rank)


def build_groups(layout: Layout) -> ProcessGroups:
    """Create the model, ensemble and data-parallel process groups (collective: every rank calls
    it).

    Needs an initialised default group whose size is ``layout.world_size``; a single process
    without one gets a layout of one and no groups.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        if layout.world_size != 1:
            raise LayoutError(
                f"layout world_size={layout.world_size} but torch.distributed is not initialised"
            )
        return ProcessGroups(layout, 0, None, None, None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != layout.world_size:
        raise LayoutError(
            f"layout world_size={layout.world_size} but the process group has {world}"
        )
    world_group = dist.group.WORLD if world > 1 else None

    def mine(groups):
        found = None
        for ranks in groups:  # new_group is collective: every rank creates every group
            g = dist.new_group(ranks) if 1 < len(ranks) < world else None
            if rank in ranks:
                found = world_group if len(ranks) == world else g
        return found

    model = mine(layout.model_groups())
    data = mine(layout.data_groups())
    ensemble = mine(layout.ensemble_groups()) if layout.ensemble > 1 else None
    return ProcessGroups(layout, rank, model, data, world_group, ensemble)

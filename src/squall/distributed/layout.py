"""Model-parallel x data-parallel layout of the ranks, degree checks, and its process groups.

Ranks are laid out model-parallel first: global rank ``r`` is part ``r % M`` of model group
``r // M``, so the ``M`` GPUs that exchange halos every layer are neighbours (one node, NVLink), and
the data-parallel groups (same part, different samples) gather ranks ``M`` apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from squall.errors import ConfigError


class LayoutError(ConfigError):
    """World size, model-parallel degree and graph do not fit together."""


@dataclass(frozen=True)
class Layout:
    """Degrees of a run: ``world_size = model_parallel * data_parallel``.

    Attributes
    ----------
    world_size : int
        Number of processes (one per GPU).
    model_parallel : int
        Ranks sharing one sample's graph (``M``).
    """

    world_size: int
    model_parallel: int = 1

    def __post_init__(self) -> None:
        w, m = self.world_size, self.model_parallel
        if w < 1 or m < 1 or w % m:
            raise LayoutError(
                f"world_size={w} must be a positive multiple of model_parallel={m} "
                f"(data_parallel = world_size / model_parallel = {w / max(m, 1):g})"
            )

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.model_parallel

    def model_rank(self, rank: int) -> int:
        """Part of the graph rank ``rank`` computes."""
        return rank % self.model_parallel

    def data_rank(self, rank: int) -> int:
        """Data-parallel replica (model group) of rank ``rank``."""
        return rank // self.model_parallel

    def model_groups(self) -> list[list[int]]:
        m = self.model_parallel
        return [list(range(d * m, (d + 1) * m)) for d in range(self.data_parallel)]

    def data_groups(self) -> list[list[int]]:
        m = self.model_parallel
        return [list(range(p, self.world_size, m)) for p in range(m)]

    def check(self, num_nodes: dict[str, int], batch_size: int, gpus_per_node: int | None = None):
        """Raise :class:`LayoutError` if the graph or the node size cannot take this layout.

        Parameters
        ----------
        num_nodes : dict
            Node set -> node count (every set is split ``M`` ways).
        batch_size : int
            Samples per model group per step (any value >= 1 works with model parallelism).
        gpus_per_node : int, optional
            If given, a model group must fit inside one node.
        """
        m = self.model_parallel
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
        if problems:
            raise LayoutError(
                f"layout world_size={self.world_size} = model_parallel={m} x "
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
        Ranks holding the same part in the other model groups.
    world : ProcessGroup or None
        Every rank (gradient reduction).
    """

    layout: Layout
    rank: int
    model: object
    data: object
    world: object

    @property
    def model_rank(self) -> int:
        return self.layout.model_rank(self.rank)

    @property
    def data_rank(self) -> int:
        return self.layout.data_rank(self.rank)


def build_groups(layout: Layout) -> ProcessGroups:
    """Create the model and data-parallel process groups (collective: every rank calls it).

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
    return ProcessGroups(layout, rank, model, data, world_group)

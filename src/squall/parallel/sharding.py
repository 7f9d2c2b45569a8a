"""Parameter, gradient and optimizer-state sharding with PyTorch's FSDP2 (``fully_shard``).

Applied by :func:`squall.parallel.parallelize.parallelize` (step 6) when
``parallel.shard_parameters`` is set and the world has more than one rank.

Which ranks shard a parameter
    Every rank holds every parameter: graph model parallelism splits the *nodes* of each block,
    not its weights, and data-parallel replicas hold copies. So each parameter is sharded over the
    **whole world** (a 1-D mesh of every rank), which gives the smallest state per rank
    (``1 / world_size``) for any ``model_parallel x data_parallel`` layout.

How gradients are reduced
    A model-parallel rank's gradient is its nodes' share of the full gradient (the halo backward
    has already moved activation gradients to the ranks that own the rows); data-parallel replicas
    each hold the full gradient of their samples. The full, replica-averaged gradient is therefore
    the *sum* over the world divided by ``data_parallel``: exactly what :class:`GradReducer`
    all-reduces, here reduce-scattered instead (``set_gradient_divide_factor(data_parallel)``).
    Gloo has no ``PREMUL_SUM``: on gloo the reduce-scatter is a plain sum followed by a division
    (``set_force_sum_reduction_for_comms``).

Units
    Each GraphTransformer block (encoder, every processor layer, decoder) is one FSDP unit: its
    parameters are all-gathered just before it runs (forward, and again in backward) and freed
    after, and its gradients are reduce-scattered as soon as its backward is done. The root unit
    holds the rest (embeddings, trainable edge features, output norm and head). The decoder is not
    resharded after forward: backward starts with it, so it would be gathered again at once.

Mixed precision
    With bf16 compute (``param_dtype="bf16"``: ``training.precision`` bf16, or auto on a GPU), the
    blocks' parameters are all-gathered in bf16 (half the bytes of the gather) while the sharded
    parameters, the optimizer state and the reduce-scatter stay fp32 (fp32 master weights).
    Forward inputs are not cast (``cast_forward_inputs=False``): the trainer's autocast decides
    the dtype of every op as it does without sharding, so the residual stream and the loss stay
    fp32. The root's parameters (small) are gathered in fp32.

Composition
    The block runner calls each block as before; activation checkpointing (the runner's
    ``torch.utils.checkpoint`` of a ``full`` block) recomputes the block's forward inside FSDP's
    pre-backward unshard, so a recomputed block is gathered once for its backward. A block run in
    pieces (``chunks``, or ``overlap``'s interior and boundary) is gathered for each piece and its
    gradient reduce-scattered after each piece's backward (FSDP accumulates the sharded pieces):
    correct, with one extra gather and reduce-scatter of that block per extra piece.
    ``torch.compile`` of whole blocks (pure data parallelism) composes with sharding and with
    the ``mlp`` policy; a compiled block under the runner's ``full`` recomputation fails
    checkpoint's recompute check, so :func:`~squall.parallel.parallelize.parallelize` leaves
    those blocks eager when sharding.

On gloo (CPU), FSDP2 works as on NCCL (torch 2.13: all-gather and reduce-scatter of flat
buffers); only ``PREMUL_SUM`` is missing, hence the forced sum above.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

#: ``ParallelConfig.param_dtype`` values -> dtype of the gathered block parameters.
PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def shard_parameters(model: nn.Module, blocks: list[nn.Module], group, data_parallel: int,
                     param_dtype: str = "fp32") -> nn.Module:  # fmt: skip
    """Shard ``model``'s parameters, gradients and (once an optimizer is built on them) optimizer
    state over the ranks of ``group``, in place (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Identical on every rank, on its device; its parameters become ``DTensor``\\ s (build the
        optimizer afterwards).
    blocks : list of nn.Module
        Submodules to make FSDP units, in forward order; the last is not resharded after forward.
    group : ProcessGroup
        Every rank that holds the parameters (the world).
    data_parallel : int
        Replicas per parameter: gradients are summed over ``group`` and divided by this.
    param_dtype : str
        ``fp32`` or ``bf16``: dtype the blocks' parameters are gathered and computed in.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype={param_dtype!r}: choose one of {tuple(PARAM_DTYPES)}")
    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(group, device.type)
    block_policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype],
                                        reduce_dtype=torch.float32, cast_forward_inputs=False)  # fmt: skip
    root_policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    units = []
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        units.append(fully_shard(block, mesh=mesh, mp_policy=block_policy,
                                 reshard_after_forward=not last))  # fmt: skip
    units.append(fully_shard(model, mesh=mesh, mp_policy=root_policy))
    gloo = dist.get_backend(group) == "gloo"
    for unit in units:
        unit.set_gradient_divide_factor(float(data_parallel))
        if gloo:  # no PREMUL_SUM on gloo: sum, then divide
            unit.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP-sharded (``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes this rank holds of parameters, gradients and optimizer state: the local shards of
    sharded tensors, whole tensors otherwise (buffers and activations not counted).

    Returns
    -------
    dict
        ``parameters``, ``gradients``, ``optimizer`` and ``total`` in bytes.
    """

    def size(t):
        t = _local(t)
        return t.numel() * t.element_size()

    params = [p for p in model.parameters()]
    out = {"parameters": sum(size(p) for p in params),
           "gradients": sum(size(p.grad) for p in params if p.grad is not None),
           "optimizer": 0}  # fmt: skip
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optimizer"] += sum(size(v) for v in state.values() if torch.is_tensor(v))
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"]
    return out


__all__ = ["PARAM_DTYPES", "is_sharded", "local_state_bytes", "shard_parameters"]

"""Typed schema of every setting: the reference for what each key of ``conf/`` means.

Each config group has a dataclass below; :class:`SquallSchema` gathers them and is registered in
Hydra's ConfigStore as ``squall_schema``, the first entry of ``conf/config.yaml``'s defaults list,
so every group's YAML is merged into its typed node. Hydra then rejects a value of the wrong type
(``training.max_steps=abc``) and a key the schema does not declare (``training.max_step=5``)
while composing; :func:`validate` checks the ranges and choices declared next to each field
(``setting(ge=1)``, ``setting(choices=...)``) and the few rules that tie fields together, before
any job starts work.

``scale`` and ``cluster`` (``conf/scale.yaml`` and ``conf/cluster/*.yaml``) are typed as open
mappings: their readers (``squall.scaling``) own keys that some clusters set and others leave
out, so :func:`validate` checks the keys declared in :class:`ScaleSchema` and
:class:`ClusterSchema` when present and leaves the others to their readers.

Importing this module needs only hydra and omegaconf (no torch): the jobs check settings before they load
anything heavy.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from squall.config import (
    CHECKPOINT_POLICIES,
    DECODER_TARGETS,
    ENSEMBLE_LOSSES,
    LOSS_WEIGHTS,
    PARTITION_METHODS,
)
from squall.errors import ConfigError

#: Name of :class:`SquallSchema` in Hydra's ConfigStore (``conf/config.yaml`` lists it first).
SCHEMA_NAME = "squall_schema"


def setting(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, choices: tuple | None = None) -> Any:  # fmt: skip
    """A schema field with its checks: ``ge``/``gt``/``le`` bounds, or ``choices``.

    ``None`` always passes (optional settings); ``MISSING`` (the default) means the YAML must
    give the value.
    """
    checks = {"ge": ge, "gt": gt, "le": le, "choices": choices}
    return field(default=default, metadata={k: v for k, v in checks.items() if v is not None})


def _listing(values) -> str:
    return ", ".join(str(v) for v in values)


def _check_value(key: str, value: Any, checks: dict) -> None:
    if value is None:
        return
    if "choices" in checks and value not in checks["choices"]:
        raise ConfigError(f"{key}={value!r}: choose one of {_listing(checks['choices'])}")
    if "ge" in checks and value < checks["ge"]:
        raise ConfigError(f"{key}={value!r}: must be >= {checks['ge']}")
    if "gt" in checks and value <= checks["gt"]:
        raise ConfigError(f"{key}={value!r}: must be > {checks['gt']}")
    if "le" in checks and value > checks["le"]:
        raise ConfigError(f"{key}={value!r}: must be <= {checks['le']}")


class Schema:
    """Base of the group schemas: :meth:`check` holds rules across fields (default: none)."""

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        """Raise :class:`ConfigError` if fields of ``node`` (at ``path``) do not fit together."""


# ----------------------------------------------------------------------------------------------
# paths, graph


@dataclass
class PathsSchema(Schema):
    """Where jobs write (``paths`` in ``conf/config.yaml``).

    Attributes
    ----------
    cache : str
        Root of everything the jobs write: graph cache, generated datasets, training runs,
        each job's Hydra folder and log (``jobs/<job>/<date>_<time>_<id>``), sweeps, the
        MLflow store. ``$SQUALL_CACHE``, else ``.cache/squall`` under the working directory.
    """

    cache: str = MISSING


@dataclass
class GraphSchema(Schema):
    """Graph spec (``conf/graph/*.yaml``; built by ``squall.graphs``).

    Attributes
    ----------
    name : str
        Name of the graph: file names of its cache and of the datasets generated on it.
    rebuild : bool
        Build the graph even when the cache holds it (and replace the cached file).
    nodes : dict
        Node sets by name. ``data`` is the dataset's grid (``type: grid`` with ``grid: O96``,
        ``latlon``, ``stretched_grid``), ``hidden`` the processor mesh (``icosahedral`` with
        ``level``, ``stretched_mesh``); optional ``region`` [lat0, lat1, lon0, lon1] and
        ``margin_deg`` cut out a limited area. ``squall.graphs.graph.build_nodes`` documents
        each type's keys and rejects unknown types in one line.
    edges : dict
        Edge sets ``encoder`` (data -> hidden), ``processor`` (hidden -> hidden), ``decoder``
        (hidden -> data), each with ``src``, ``dst`` and ``type``: ``cutoff`` (``factor`` of the
        mesh spacing, optional ``min_neighbours``/``max_neighbours``), ``multiscale``
        (optional ``max_level``) or ``knn`` (``k``).
    """

    name: str = MISSING
    rebuild: bool = MISSING
    nodes: dict[str, Any] = MISSING
    edges: dict[str, Any] = MISSING

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        if "data" not in node.nodes:
            raise ConfigError(f"{path}.nodes has no 'data' node set (the dataset's grid); it has "
                              f"{_listing(node.nodes) or 'none'}")  # fmt: skip
        for name, spec in node.edges.items():
            for end in ("src", "dst"):
                if isinstance(spec, DictConfig) and spec.get(end) not in node.nodes:
                    raise ConfigError(f"{path}.edges.{name}.{end}={spec.get(end)!r}: choose one "
                                      f"of the node sets {_listing(node.nodes)}")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class SplitSchema(Schema):
    """Inclusive range of one data split: ISO dates, integer time indices (negative from the
    end) or null (the dataset's edge).

    Attributes
    ----------
    start, end : str, int or None
        First and last time of the split.
    """

    start: Any = None
    end: Any = None


@dataclass
class GeneratorSchema(Schema):
    """Synthetic dataset generator (``data.generator``; ``squall.data.synthetic``).

    Attributes
    ----------
    num_times : int
        Times written (the dataset's length; spacing ``data.frequency``).
    start_date : str
        ISO date of the first time.
    seed : int
        Land, mountains, blobs and noise all derive from it.
    psi_blobs, temperature_blobs : int
        Mean number of live streamfunction (highs/lows) and temperature blobs.
    jet_ms, solid_body_ms : float
        Peak jet added at 45 degrees and the solid-body zonal wind at the equator (m/s).
    diffusivity_m2s : float
        Horizontal diffusivity widening the blobs (m^2/s).
    noise : float
        Smooth noise relative to one blob's amplitude: the stochastic part of the weather.
    noise_memory : float
        AR(1) coefficient of the noise per time step (< 1 keeps it stationary).
    noise_seed : int or None
        Seed of the noise alone (null: derived from ``seed``), for independent realisations.
    lifetime_days : list of float
        Shortest and longest blob lifetime (days).
    block : int
        Times generated and written at once (memory: ``block * variables * grid`` floats).
    variables : list of str or None
        Variables written; null: ``data.variables``.
    overwrite : bool
        ``jobs.make_dataset``: replace an existing store.
    """

    num_times: int = setting(ge=1)
    start_date: str = MISSING
    seed: int = MISSING
    psi_blobs: int = setting(ge=0)
    temperature_blobs: int = setting(ge=0)
    jet_ms: float = MISSING
    solid_body_ms: float = MISSING
    diffusivity_m2s: float = setting(ge=0)
    noise: float = setting(ge=0)
    noise_memory: float = setting(0.8, ge=0, le=0.99)
    noise_seed: int | None = None
    lifetime_days: list[float] = MISSING
    block: int = setting(ge=1)
    variables: list[str] | None = None
    overwrite: bool = False

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        days = list(node.lifetime_days)
        if len(days) != 2 or not 0 < days[0] <= days[1]:
            raise ConfigError(f"{path}.lifetime_days={days}: give [shortest, longest], "
                              "0 < shortest <= longest")  # fmt: skip


@dataclass
class BoundarySchema(Schema):
    """Lateral boundary forcing (``data.boundary``; ``squall.data.boundary``), used when the
    graph's data nodes have a ``boundary`` (``conf/graph/lam_alps.yaml``).

    Attributes
    ----------
    enabled : bool
        Force the boundary points with the driver in training and forecasts (false: a plain
        cut-out, scored on the same interior).
    source : str
        ``synthetic`` (a global run of the same generator settings, written on ``grid`` when
        ``path`` is missing) or ``zarr`` (an existing dataset in the same layout).
    path : str
        The driving dataset: same variables (the prognostic ones at least) and dates.
    grid : str
        Grid of a synthetic driver, e.g. ``O48``.
    neighbours : int
        Driver points of the inverse-distance interpolation onto each boundary point.
    power : float
        Inverse-distance exponent.
    lookahead : bool
        Give each step the driver's boundary values at the time it predicts (extra input
        columns, ``squall.train.boundary``); false: the band of the input states only.
    """

    enabled: bool = True
    source: str = setting("synthetic", choices=("synthetic", "zarr"))
    path: str = MISSING
    grid: str = "O48"
    neighbours: int = setting(4, ge=1)
    power: float = setting(2.0, gt=0)
    lookahead: bool = True


@dataclass
class ObservationsSchema(Schema):
    """Synthetic observations drawn from the dataset's fields (``data.observations``;
    ``squall.data.observations``); a model with ``model.observations`` reads them.

    Attributes
    ----------
    channels : list of str
        Observed dataset variables, in the encoder's channel order.
    count : list of int
        ``[min, max]`` observations per time step (uniform, inclusive).
    noise : float
        Observation error standard deviation, normalised units.
    missing : float
        Probability that a channel is missing at an observation.
    neighbours : int
        Grid points of the inverse-distance interpolation.
    seed : int
        Seed of the observations (per time: ``(seed, time index)``).
    """

    channels: list[str] = MISSING
    count: list[int] = field(default_factory=lambda: [0, 1000])
    noise: float = setting(0.1, ge=0)
    missing: float = setting(0.2, ge=0, le=1)
    neighbours: int = setting(3, ge=1)
    seed: int = 0

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        count = list(node.count)
        if len(count) != 2 or not 0 <= count[0] <= count[1]:
            raise ConfigError(f"{path}.count={count}: give [min, max], 0 <= min <= max")
        if not len(node.channels):
            raise ConfigError(f"{path}.channels: name at least one observed variable")


@dataclass
class DataSchema(Schema):
    """Dataset and loader (``conf/data/*.yaml``; ``squall.data``).

    Attributes
    ----------
    source : str
        ``synthetic`` (generated on first use when ``path`` is missing) or ``zarr`` (must
        exist).
    path : str
        The zarr store (anemoi-datasets-like ``data[time, variable, ensemble, grid]``).
    variables : list of str or None
        Variables in model order; null: all the dataset holds.
    forcings : list of str
        Inputs only (not predicted): land-sea mask, orography, time of day/year.
    diagnostics : list of str
        Outputs only (not inputs), e.g. precipitation.
    input_steps : int
        Past states in each sample.
    frequency : str
        Spacing of the dataset's times, e.g. ``6h``.
    timestep : str
        Model step, a multiple of ``frequency``.
    member : int
        Ensemble member read.
    num_workers : int
        DataLoader worker processes per rank (0: load in the training process).
    normalisation : dict
        ``default`` method and lists of variables per method: ``mean-std``, ``min-max``,
        ``max``, ``std``, ``none``.
    train, validation, test : SplitSchema
        Time range of each split.
    generator : GeneratorSchema or None
        Synthetic generator (null for real data).
    boundary : BoundarySchema or None
        Driving dataset of a limited-area graph's boundary points (null: none).
    observations : ObservationsSchema or None
        Synthetic observations in every sample (null: none).
    """

    source: str = setting(choices=("synthetic", "zarr"))
    path: str = MISSING
    variables: list[str] | None = None
    forcings: list[str] = MISSING
    diagnostics: list[str] = MISSING
    input_steps: int = setting(ge=1)
    frequency: str = MISSING
    timestep: str = MISSING
    member: int = setting(ge=0)
    num_workers: int = setting(ge=0)
    normalisation: dict[str, Any] = MISSING
    train: SplitSchema = MISSING
    validation: SplitSchema = MISSING
    test: SplitSchema = MISSING
    generator: GeneratorSchema | None = None
    boundary: BoundarySchema | None = None
    observations: ObservationsSchema | None = None

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        if node.source == "synthetic" and node.generator is None:
            raise ConfigError(f"{path}.source=synthetic needs {path}.generator settings "
                              "(data=synthetic has them)")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# model


@dataclass
class CheckpointSchema(Schema):
    """Activation checkpointing per block (``model.checkpoint``).

    Attributes
    ----------
    encoder, processor, decoder : str or bool
        ``none`` (keep all activations for backward), ``mlp`` (recompute the MLP half),
        ``full`` (keep only the block input); ``true``/``false`` mean ``full``/``none``.
        ``processor`` also takes a list of one policy per processor layer.
    budget_gib : float or None
        Per-GPU memory to fit: the planner picks the least recomputation whose estimate fits
        and replaces the three policies (``python -m jobs.dry_run`` prints its choice).
    """

    encoder: Any = "none"
    processor: Any = "none"
    decoder: Any = "none"
    budget_gib: float | None = setting(None, gt=0)

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        for role in ("encoder", "processor", "decoder"):
            value = node[role]
            policies = list(value) if role == "processor" and not _scalar(value) else [value]
            for policy in policies:
                if not (policy is None or isinstance(policy, bool)
                        or policy in CHECKPOINT_POLICIES):  # fmt: skip
                    raise ConfigError(f"{path}.{role}: {policy!r} is not one of "
                                      f"{_listing(CHECKPOINT_POLICIES)}, or true/false")  # fmt: skip


def _scalar(value: Any) -> bool:
    return OmegaConf.is_list(value) is False and not isinstance(value, (list, tuple))


@dataclass
class EnsembleSchema(Schema):
    """Probabilistic model (``model.ensemble``; ``squall.models.forecaster``,
    ``squall.train.ensemble``).

    Attributes
    ----------
    members : int
        Members per sample in training and in ``jobs.forecast`` (1: deterministic).
    noise_channels : int
        Noise channels per mesh node conditioning the processor (0: deterministic model).
    loss : str
        Training score over the members: ``afcrps``, ``fair_crps`` or ``energy``.
    alpha : float
        afCRPS's alpha in [0, 1] (1: fair CRPS).
    """

    members: int = setting(1, ge=1)
    noise_channels: int = setting(0, ge=0)
    loss: str = setting("afcrps", choices=ENSEMBLE_LOSSES)
    alpha: float = setting(0.95, ge=0, le=1)

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        if node.members > 1 and not node.noise_channels:
            raise ConfigError(f"{path}.members={node.members} needs {path}.noise_channels > 0: "
                              "without noise every member is the same")  # fmt: skip


@dataclass
class ObsEncoderSchema(Schema):
    """Observation encoder (``model.observations``; ``squall.models.obs_encoder``).

    Attributes
    ----------
    cutoff_factor : float
        Observation-to-mesh radius in units of the mesh's largest nearest-neighbour spacing.
    max_neighbours : int or None
        Observations per mesh node at most, nearest first (null: all in reach).
    """

    cutoff_factor: float = setting(0.6, gt=0)
    max_neighbours: int | None = setting(64, ge=1)


@dataclass
class ModelSchema(Schema):
    """GraphTransformer forecaster (``conf/model/*.yaml``; ``squall.models.forecaster``).

    Attributes
    ----------
    name : str
        Name in run names and the training run directory.
    num_channels : int
        Latent width; a multiple of ``num_heads``.
    num_heads : int
        Attention heads of every block.
    processor_layers : int
        GraphTransformer blocks on the mesh.
    mlp_ratio : int
        Hidden width of each block's MLP, in multiples of ``num_channels``.
    trainable_edge_features : int
        Learned per-edge features added to the geometric edge attributes (0: none).
    attention_backend : str
        ``torch`` (reference, any device) or ``triton`` (fused kernels; on CPU the reference
        runs instead).
    checkpoint : CheckpointSchema
        Activation checkpointing.
    compile : bool
        ``torch.compile`` each block (one GPU, unsharded and unchunked blocks only).
    ensemble : EnsembleSchema
        Members, noise and training score of a probabilistic model (default: deterministic).
    observations : ObsEncoderSchema or None
        Observation encoder after the grid encoder (null: none; needs ``data.observations``).
    decoder_target : str
        What the decoder's grid destinations start from: ``latent`` (the encoder's data latent)
        or ``static`` (node attributes and the non-prognostic inputs only, so the state's change
        comes through the mesh; ``squall.models.forecaster``).
    """

    name: str = MISSING
    num_channels: int = setting(ge=1)
    num_heads: int = setting(ge=1)
    processor_layers: int = setting(ge=1)
    mlp_ratio: int = setting(ge=1)
    trainable_edge_features: int = setting(ge=0)
    attention_backend: str = setting(choices=("torch", "triton"))
    checkpoint: CheckpointSchema = MISSING
    compile: bool = MISSING
    ensemble: EnsembleSchema = field(default_factory=EnsembleSchema)
    observations: ObsEncoderSchema | None = None
    decoder_target: str = setting("latent", choices=DECODER_TARGETS)

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        if node.num_channels % node.num_heads:
            raise ConfigError(f"{path}.num_channels={node.num_channels} is not a multiple of "
                              f"{path}.num_heads={node.num_heads}")  # fmt: skip
        proc = node.checkpoint.processor
        if not _scalar(proc) and len(proc) != node.processor_layers:
            raise ConfigError(f"{path}.checkpoint.processor lists {len(proc)} policies for "
                              f"{path}.processor_layers={node.processor_layers}")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# training, tracking, forecast


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainingSchema(Schema):
    """Training loop (``conf/training/*.yaml``; ``squall.train``).

    Attributes
    ----------
    max_steps : int
        Optimiser steps of the whole run (a resumed run continues up to it).
    batch_size : int
        Samples per step and data-parallel rank (per model group under model parallelism).
    lr : float
        Peak learning rate (AdamW).
    weight_decay : float
        AdamW weight decay.
    warmup_steps : int
        Linear learning-rate warm-up.
    min_lr_ratio : float
        The cosine schedule ends at ``lr * min_lr_ratio`` at ``max_steps``.
    grad_clip : float
        Gradient norm clipping threshold.
    rollout : int
        Autoregressive steps in the loss.
    loss_weights : str
        How the loss weighs the output variables: ``state`` (each in its normalised units) or
        ``tendency`` (each by the inverse variance of its one-step change, as GraphCast;
        ``squall.train.loop.variable_weights``).
    val_every, val_batches : int
        Validate every ``val_every`` steps on ``val_batches`` batches.
    checkpoint_every : int
        Steps between checkpoints (also written at the end and on SIGTERM/SIGUSR1).
    log_every : int
        Steps between logged metrics.
    timing_warmup_steps : int
        First steps of a run left out of the throughput (allocator warm-up, autotuning).
    seed : int
        Parameters, data order and dropout.
    deterministic : bool
        Deterministic kernels (slower; bit-identical reruns).
    precision : str
        ``auto`` (bf16 autocast on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (one GPU per rank under a launcher).
    run_dir : str
        Checkpoint directory; a later run with the same directory resumes.
    resume : bool
        Continue from ``run_dir/checkpoint.pt`` when it exists; false starts over and
        replaces it.
    """

    max_steps: int = setting(ge=1)
    batch_size: int = setting(ge=1)
    lr: float = setting(gt=0)
    weight_decay: float = setting(ge=0)
    warmup_steps: int = setting(ge=0)
    min_lr_ratio: float = setting(ge=0, le=1)
    grad_clip: float = setting(gt=0)
    rollout: int = setting(ge=1)
    loss_weights: str = setting("state", choices=LOSS_WEIGHTS)
    val_every: int = setting(ge=1)
    val_batches: int = setting(ge=1)
    checkpoint_every: int = setting(ge=1)
    log_every: int = setting(ge=1)
    timing_warmup_steps: int = setting(ge=0)
    seed: int = MISSING
    deterministic: bool = MISSING
    precision: str = setting(choices=("auto", "fp32", "bf16"))
    device: str = MISSING
    run_dir: str = MISSING
    resume: bool = MISSING

    @classmethod
    def check(cls, node: DictConfig, path: str) -> None:
        if not _DEVICE.fullmatch(node.device):
            raise ConfigError(f"{path}.device={node.device!r}: choose auto, cpu, cuda or cuda:N")


@dataclass
class TrackingSchema(Schema):
    """MLflow tracking (``conf/tracking/*.yaml``; ``squall.tracking``).

    Attributes
    ----------
    enabled : bool
        False: log nothing (a null logger).
    uri : str or None
        Tracking server or store; null: ``$MLFLOW_TRACKING_URI``, else the sqlite store under
        ``paths.cache/mlflow``.
    experiment : str
        MLflow experiment of the runs.
    """

    enabled: bool = MISSING
    uri: str | None = None
    experiment: str = MISSING


@dataclass
class ForecastSchema(Schema):
    """Forecast rollouts of ``jobs.forecast`` (``conf/forecast/*.yaml``).

    Attributes
    ----------
    checkpoint : str
        Checkpoint evaluated (default: the one ``jobs.train`` writes for the same graph and
        model).
    split : str
        Data split of the initial states and verifying truth.
    steps : int
        Autoregressive steps per forecast (lead time ``steps * data.timestep``).
    max_starts : int
        Initial states, evenly spaced through the split.
    output : str or None
        Optional zarr path for the denormalised forecasts (written by a background thread).
    precision : str
        ``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16`` or ``fp32``.
    cuda_graphs : bool
        Capture the model's step into a CUDA graph and replay it (GPU only).
    write_queue : int
        Fields waiting for the disk before the rollout blocks.
    compression : str
        Chunks of ``output``: ``none`` (raw), ``lz4`` or ``zstd`` (Blosc with byte shuffle).
    reference : str or None
        Checkpoint of a deterministic baseline trained on the same graph and data, rolled out
        from the same starts and scored beside the model (RMSE, CRPS, CRPS gain).
    """

    checkpoint: str = MISSING
    split: str = setting(choices=("train", "validation", "test"))
    steps: int = setting(ge=1)
    max_starts: int = setting(ge=1)
    output: str | None = None
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"))
    cuda_graphs: bool = False
    write_queue: int = setting(4, ge=1)
    compression: str = setting("none", choices=("none", "lz4", "zstd"))
    reference: str | None = None


@dataclass
class ProfileSchema(Schema):
    """What ``jobs.profile`` measures (``profile`` in ``conf/profile.yaml``; absent elsewhere).

    Attributes
    ----------
    mode : str
        ``train``: forward, backward and optimiser of a training step; ``forecast``: one
        inference step of the rollout (``forecast.precision``, ``forecast.cuda_graphs``).
    warmup_steps : int
        Steps run before profiling (autotuning, allocator warm-up), not recorded.
    steps : int
        Steps recorded by the profiler.
    output : str
        Folder of the profile; each rank writes ``rank<N>/`` in it.
    memory_snapshot : bool
        Record CUDA allocations and write a memory snapshot (GPU only).
    memory_history_entries : int
        Allocation events the memory history keeps (older ones are dropped).
    """

    mode: str = setting("train", choices=("train", "forecast"))
    warmup_steps: int = setting(2, ge=0)
    steps: int = setting(3, ge=1)
    output: str = MISSING
    memory_snapshot: bool = True
    memory_history_entries: int = setting(100000, ge=1)


# ----------------------------------------------------------------------------------------------
# parallel, scale, cluster


@dataclass
class ParallelSchema(Schema):
    """Process layout (``conf/parallel/*.yaml``, ``parallel`` of ``conf/scale.yaml``).

    Attributes
    ----------
    model_parallel : int
        Ranks sharing one sample's graph (partitioned, halo exchange); the rest of the world
        size is ensemble groups and data-parallel replicas.
    ensemble : int
        Ranks sharing the members of each sample (``model.ensemble.members / ensemble`` each).
    partition : str
        ``sfc`` (Hilbert curve: fewest halo rows), ``work`` (the same curve cut by counted work),
        or the baselines ``bands`` (latitude bands) and ``ranges`` (index ranges).
    overlap : bool
        Compute interior destinations while the halo is in flight.
    chunks : int
        Encoder and decoder in this many recomputed pieces per rank (1: off).
    shard_parameters : bool
        Shard parameters, gradients and optimizer state over every rank (FSDP2; blocks gathered
        just in time); no effect on one rank.
    grad_bucket_mb : float
        Gradient MiB per all-reduce launched during the backward (model-parallel and ensemble
        layouts; 0: one all-reduce after it).
    gpus : int or None
        Ranks of a scaling point (``jobs.scale``; ``jobs.dry_run``'s world size when set); null
        in a scaling point: ``ensemble x model_parallel x data_parallel`` (missing degrees 1).
    nodes : int or None
        Nodes of a scaling point; null: as few as hold ``gpus``.
    data_parallel : int or None
        Data-parallel degree of a scaling point; null: ``gpus / (ensemble x model_parallel)``.
    """

    model_parallel: int = setting(ge=1)
    ensemble: int = setting(1, ge=1)
    partition: str = setting(choices=PARTITION_METHODS)
    overlap: bool = MISSING
    chunks: int = setting(ge=1)
    shard_parameters: bool = MISSING
    grad_bucket_mb: float = setting(25.0, ge=0)
    gpus: int | None = setting(None, ge=1)
    nodes: int | None = setting(None, ge=1)
    data_parallel: int | None = setting(None, ge=1)


@dataclass
class ScaleSchema(Schema):
    """One scaling point (``scale`` in ``conf/scale.yaml``; ``squall.scaling``). Keys not
    declared here are left to their readers.

    Attributes
    ----------
    mode : str
        ``strong`` (``batch`` is the global batch) or ``weak`` (``batch`` per data-parallel
        rank).
    batch : int
        Samples per step (see ``mode``).
    warmup_steps : int
        Untimed steps before the timed ones.
    steps : int
        Timed steps.
    comm_repeats : int
        Repeats of the gradient all-reduce timed alone.
    checkpoint_every : int
        Steps between a point's checkpoints (a requeued point resumes from the last).
    collective_timeout_s : float
        Rendezvous and collective timeout (seconds).
    pending_limit_s : float or None
        Longest a submitted point may wait in the queue before the sweep gives up on it.
    """

    mode: str = setting(choices=("strong", "weak"))
    batch: int = setting(ge=1)
    warmup_steps: int = setting(ge=0)
    steps: int = setting(ge=1)
    comm_repeats: int = setting(ge=1)
    checkpoint_every: int = setting(ge=1)
    collective_timeout_s: float = setting(gt=0)
    pending_limit_s: float | None = setting(None, gt=0)


@dataclass
class ClusterSchema(Schema):
    """Where scaling points run (``conf/cluster/*.yaml``). Keys are checked where present: a
    cluster leaves out what does not apply to it (``squall.scaling.batch`` reads the batch
    script keys and their defaults); keys not declared here are left to their readers.

    Attributes
    ----------
    name : str
        Cluster name in run names and messages.
    gpus_per_node : int
        GPUs (CPU ranks on ``local``) one node gives a point.
    gpu_memory_gb : float or None
        Memory of one GPU (null: CPU ranks).
    cpus_per_gpu : int or None
        CPU cores per rank (its threads).
    mem_per_gpu_gb : float or None
        Host memory per GPU.
    max_nodes : int
        Most nodes one point may take.
    scaling_gpus : str or int
        World sizes a scaling experiment sweeps, in Hydra sweep syntax (``1,2,4,8``).
    strong_scaling_batch : int
        Global batch of strong scaling; divides every world size swept.
    time_min : int or None
        Time limit of one point (minutes).
    partition, account, qos : str or None
        Slurm placement.
    device : str
        ``cpu`` or ``cuda``.
    backend : str
        ``gloo`` or ``nccl``.
    setup : list of str or None
        Shell lines the batch script runs before ``srun``.
    python : str or None
        Interpreter of the compute nodes (null on ``local``: the one running ``jobs.scale``).
    exclusive : bool or None
        Whole nodes per point (Slurm ``--exclusive``); false: points queue one after another.
    env : dict or None
        Environment variables set for every rank (``NCCL_*``, ``MASTER_PORT``, ...).
    srun_args : list of str or None
        Further ``srun`` options of the site, e.g. ``['--mpi=pmix']``.
    """

    name: str = MISSING
    gpus_per_node: int = setting(ge=1)
    gpu_memory_gb: float | None = setting(None, gt=0)
    cpus_per_gpu: int | None = setting(None, ge=1)
    mem_per_gpu_gb: float | None = setting(None, gt=0)
    max_nodes: int = setting(ge=1)
    scaling_gpus: Any = MISSING
    strong_scaling_batch: int = setting(ge=1)
    time_min: int | None = setting(None, ge=1)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    device: str = setting(choices=("cpu", "cuda"))
    backend: str = setting(choices=("gloo", "nccl"))
    setup: list[str] | None = None
    python: str | None = None
    exclusive: bool | None = None
    env: dict[str, Any] | None = None
    srun_args: list[str] | None = None


# ----------------------------------------------------------------------------------------------
# the whole config


@dataclass
class SquallSchema:
    """Every setting of ``conf/config.yaml`` (and ``conf/scale.yaml``), by group."""

    paths: PathsSchema = MISSING
    graph: GraphSchema = MISSING
    data: DataSchema = MISSING
    model: ModelSchema = MISSING
    training: TrainingSchema = MISSING
    tracking: TrackingSchema = MISSING
    forecast: ForecastSchema = MISSING
    parallel: ParallelSchema = MISSING
    profile: ProfileSchema | None = None  # conf/profile.yaml only
    scale: dict[str, Any] = field(default_factory=dict)  # checked against ScaleSchema (open)
    cluster: dict[str, Any] = field(default_factory=dict)  # checked against ClusterSchema


#: Schemas of the open groups, checked key by key where present.
OPEN_GROUPS = {"scale": ScaleSchema, "cluster": ClusterSchema}


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass in a field's type (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _get(node: DictConfig, name: str, key: str) -> Any:
    """``node[name]`` resolved; a missing value or broken interpolation as a ConfigError."""
    try:
        return node[name]
    except MissingMandatoryValue:
        raise ConfigError(f"{key} has no value (??? in the config): set it, e.g. "
                          f"{key}=...") from None  # fmt: skip
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def unknown_key_message(key: str, valid: list[str]) -> str:
    """One line for a key the schema does not declare, listing the valid ones."""
    parent, _, name = key.rpartition(".")
    if name in valid:  # a declared key of a group this config leaves empty (scale, cluster)
        return f"{key} does not apply here: this job's config has no {parent} settings"
    where = f"{parent} settings" if parent else "top-level groups"
    return f"{key} is not a setting; {where}: {_listing(sorted(valid))}"


def _check_node(node: DictConfig, schema: type, path: str, open_keys: bool = False) -> None:
    hints = typing.get_type_hints(schema)
    if not open_keys:  # `+group.key=...` adds keys past Hydra's struct check
        names = [f.name for f in dataclasses.fields(schema)]
        for name in node:
            if name not in names:
                raise ConfigError(unknown_key_message(f"{path}.{name}", names))
    for f in dataclasses.fields(schema):
        if open_keys and f.name not in node:
            continue
        key = f"{path}.{f.name}"
        value = _get(node, f.name, key)
        sub = _dataclass_of(hints[f.name])
        if sub is not None and value is not None:
            _check_node(value, sub, key)
        else:
            _check_value(key, value, dict(f.metadata))
    schema.check(node, path)


def _typed_subset(node: DictConfig, schema: type, path: str) -> DictConfig:
    """The keys of the resolved open group ``node`` that ``schema`` declares, as their types."""
    names = {f.name for f in dataclasses.fields(schema)}
    try:
        return OmegaConf.merge(
            OmegaConf.structured(schema), {k: node[k] for k in node if k in names}
        )
    except OmegaConfBaseException as err:
        where = f"{path}.{err.full_key}" if getattr(err, "full_key", None) else path
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Check every setting of a composed config against the schema.

    Resolves every value (interpolations included), checks the declared ranges and choices
    and the rules across fields. Types and unknown keys were checked by Hydra when it composed
    ``cfg`` over :class:`SquallSchema`; the open groups (``scale``, ``cluster``) get their
    declared keys' types checked here.

    Raises
    ------
    ConfigError
        The first bad setting, in one line that names the key, its value and what is allowed.
    """
    groups = [f.name for f in dataclasses.fields(SquallSchema)]
    for name in cfg:
        if name not in groups and name != "hydra":  # hydra: Hydra's own node, if composed in
            raise ConfigError(unknown_key_message(str(name), groups))
    for f in dataclasses.fields(SquallSchema):
        if f.name not in cfg or cfg[f.name] is None:
            continue
        if f.name in OPEN_GROUPS:
            schema = OPEN_GROUPS[f.name]
            try:  # interpolations inside may point anywhere in cfg: resolved in place
                resolved = OmegaConf.create(OmegaConf.to_container(cfg[f.name], resolve=True))
            except OmegaConfBaseException as err:
                raise ConfigError(f"{f.name}: {str(err).splitlines()[0]}") from None
            _check_node(_typed_subset(resolved, schema, f.name), schema, f.name, open_keys=True)
            continue
        schema = _dataclass_of(typing.get_type_hints(SquallSchema)[f.name])
        _check_node(_get(cfg, f.name, f.name), schema, f.name)


def keys_of(path: str) -> list[str] | None:
    """Keys the schema declares at a dotted ``path`` (``"training"``, ``"data.generator"``),
    or None where the schema does not fix them (open mappings)."""
    schema: Any = SquallSchema
    for part in [p for p in path.split(".") if p]:
        if schema is None or not dataclasses.is_dataclass(schema):
            return None
        hints = typing.get_type_hints(schema)
        if part not in hints:
            return None
        schema = OPEN_GROUPS.get(part) if schema is SquallSchema and part in OPEN_GROUPS \
            else _dataclass_of(hints[part])  # fmt: skip
    if schema is None:
        return None
    return [f.name for f in dataclasses.fields(schema)]


def launch_id() -> str:
    """An id shared by the ranks of one launch and distinct between launches: ``s<job>.<step>``
    under Slurm, torchrun's rendezvous id, else ``p<pid>`` (of the launching torchrun agent
    for its workers)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        step = os.environ.get("SLURM_STEP_ID")
        return f"s{job}" + (f".{step}" if step else "")
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run and run != "none":
        return run[:12]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: its agent is the parent
        return f"p{os.getppid()}"
    return f"p{os.getpid()}"


class SettingsCheck(Callback):
    """Hydra callback (``hydra.callbacks.settings`` in ``conf/config.yaml``): a sweep's settings
    are checked once, in the driver, before any point is submitted.

    Every job checks its own settings too (``jobs._entry.hydra_job``); this catches a bad
    setting shared by all points before the sweep starts, instead of in each point. Keys the
    sweep varies are checked per point.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import sys

        from hydra.core.hydra_config import HydraConfig

        hydra_config = HydraConfig.instance()
        previous = hydra_config.cfg
        # `${hydra:runtime.output_dir}` (a point's folder) is known per point only: a stand-in.
        stand_in = str(config.hydra.sweep.dir)
        job = OmegaConf.masked_copy(config, "hydra")
        with open_dict(job):
            job.hydra.runtime.output_dir = stand_in
        hydra_config.set_config(job)
        try:
            validate(config)
        except ConfigError as err:  # Hydra turns a callback's exception into a warning
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        finally:
            hydra_config.cfg = previous


def register() -> None:
    """Register :class:`SquallSchema` in Hydra's ConfigStore and the ``squall.launch_id``
    resolver (idempotent; done on import of ``hydra_plugins.squall_schema``, which Hydra's
    plugin scan imports before composing any config)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=SquallSchema)
    if not OmegaConf.has_resolver("squall.launch_id"):
        OmegaConf.register_new_resolver("squall.launch_id", launch_id, use_cache=True)

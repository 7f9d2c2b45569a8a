"""Config helpers shared by every module that accepts Hydra/OmegaConf nodes or plain mappings.

The settings themselves (types, ranges, documentation) are declared in :mod:`squall.schema`.
"""

from __future__ import annotations

from typing import Any

# Activation checkpointing of one block: keep everything for backward ("none"), recompute the
# MLP half (its layer norm, first matrix product and GELU: the block's largest activations)
# ("mlp"), or keep only the block's input and recompute all of it ("full"). Checked by
# squall.schema for configs and by squall.models.forecaster.ModelConfig for any caller.
CHECKPOINT_POLICIES = ("none", "mlp", "full")
# The other choices that both squall.schema (configs) and the code taking them (any caller) check.
#: What the decoder's grid destinations start from (``model.decoder_target``;
#: squall.models.forecaster).
DECODER_TARGETS = ("latent", "static")
#: Training scores of an ensemble (``model.ensemble.loss``; squall.train.scores).
ENSEMBLE_LOSSES = ("afcrps", "fair_crps", "energy")
#: How the loss weighs the output variables against each other (``training.loss_weights``).
LOSS_WEIGHTS = ("state", "tendency")
#: Graph partitioning schemes (``parallel.partition``; squall.parallel.partition).
PARTITION_METHODS = ("sfc", "ranges", "bands", "work")


def to_container(cfg: Any) -> Any:
    """OmegaConf containers as plain dicts and lists (interpolations resolved); else unchanged.

    Works without omegaconf installed (as on GPU images that carry only torch and numpy).
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg


def as_flag(value: Any, key: str) -> bool:
    """A boolean setting (``None`` counts as false); anything else is a one-line config error."""
    from squall.errors import ConfigError

    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: use true or false")
    return value

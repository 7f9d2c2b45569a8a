"""Config helpers shared by every module that accepts Hydra/OmegaConf nodes or plain mappings."""

from __future__ import annotations

from typing import Any


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

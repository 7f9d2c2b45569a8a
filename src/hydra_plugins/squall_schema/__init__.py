"""Registers squall's config schema (``squall.schema``) with Hydra.

Hydra imports every module under ``hydra_plugins`` before it composes a config, for
``@hydra.main`` and the compose API alike, so ``conf/config.yaml`` finds ``squall_schema``
whichever way it is loaded.
"""

from squall.schema import register

register()

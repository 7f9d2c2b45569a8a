"""squall's Hydra launchers, where Hydra looks for plugins (the ``hydra_plugins`` namespace).

Hydra instantiates launchers only from classes defined in this namespace; the behaviour lives in
:class:`squall.scaling.launcher.ShapedSweepLauncher`. Config:
``conf/hydra/launcher/squall_{local,slurm}.yaml``.
"""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from squall.scaling.launcher import ShapedSweepLauncher


class SquallLocalLauncher(ShapedSweepLauncher, LocalLauncher):
    """Points as local processes (one per rank), one point at a time."""

    serial_points = True


class SquallSlurmLauncher(ShapedSweepLauncher, SlurmLauncher):
    """Points as Slurm job arrays (one task and one GPU per rank), grouped by shape."""

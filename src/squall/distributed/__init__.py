"""Where this process sits in a launch and how the ranks are grouped (nothing is imported here).

* ``env``: rank, world and rendezvous from torchrun / Slurm variables; ``init_distributed``;
* ``layout``: model-parallel x data-parallel degrees, their checks and process groups.
"""

"""Parallelism applied to a single-device model from one place, :func:`parallelize.parallelize`.

Modules (nothing is imported here, so ``squall.parallel.env`` stays light):

* ``env``: where this process sits in a launch, ``init_distributed``;
* ``layout``: model-parallel x data-parallel degrees, checks, process groups;
* ``partition``: which rank owns which node (pure; Hilbert curve, bands, index ranges);
* ``halo``: per rank and edge set, what it owns, receives and sends, as a frozen plan (pure);
* ``comm``: the halo exchange as autograd Functions (asynchronous), gathers, loss reduction;
* ``chunking``: a block run on a subset of destinations (sharding, overlap, sequential chunks);
* ``parallelize``: applies all of it to a ``GraphForecaster``; ``prepare_parallel`` for runners;
* ``estimate``: dry-run memory and communication estimates of a layout (``jobs/dry_run.py``).
"""

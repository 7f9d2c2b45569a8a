"""Graph parallelism applied to a single-device model from one place, :func:`parallelize.parallelize`.

Modules (nothing is imported here):

* ``partition``: which rank owns which node (pure; Hilbert curve, bands, index ranges);
* ``halo``: per rank and edge set, what it owns, receives and sends, as a frozen plan (pure);
* ``comm``: the halo exchange as autograd Functions (asynchronous), gathers, loss reduction;
* ``chunking``: a block run on a subset of destinations (sharding, overlap, sequential chunks);
* ``parallelize``: applies all of it to a ``GraphForecaster``; ``prepare_parallel`` for runners.

Where a process sits in a launch and the process groups of a layout live in
:mod:`squall.distributed`; memory and communication estimates in :mod:`squall.planning`.
"""

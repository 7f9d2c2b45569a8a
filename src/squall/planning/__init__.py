"""Plans made before a run: per-rank memory, communication and checkpoint choices.

* ``estimate``: dry-run estimate of a layout and the checkpoint plan that fits a memory budget
  (``python -m jobs.dry_run``).
* ``scaling``: the scaling model: step time and peak memory per rank for P GPUs on N nodes from a
  one-GPU calibration, the real partition's halo and the cluster's links; the layout (data x
  model parallel, parameter sharding) it chooses for a GPU count and memory budget.
"""

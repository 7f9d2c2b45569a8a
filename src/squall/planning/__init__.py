"""Plans made before a run: per-rank memory, communication and checkpoint choices.

* ``estimate``: dry-run estimate of a layout and the checkpoint plan that fits a memory budget
  (``python -m jobs.dry_run``).
"""

"""Scaling experiments: point plans, the point runner, sweep bookkeeping, launchers, reports."""

"""User-facing errors.

Anything a user can cause (bad config, missing file, wrong shapes, unreachable server) raises a
subclass of :class:`SquallError` with a one-line message that names the problem and the fix.
Entry points in ``jobs/`` print that line and exit with status 2 instead of a traceback.
"""


class SquallError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(SquallError, ValueError):
    """A configuration value is unknown, missing or out of range (also a ``ValueError``, as the
    model and planning code raised before)."""


class GraphError(SquallError):
    """A graph spec cannot be built as asked (unknown grid, empty neighbourhoods, ...)."""


class GraphCacheError(SquallError):
    """A cached graph file is corrupt or does not match its spec."""


class DataError(SquallError):
    """A dataset is missing, too short, or does not match the graph or config."""

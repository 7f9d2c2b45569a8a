"""squall: fast, scalable graph-based data-driven weather models."""

__version__ = "0.1.0"

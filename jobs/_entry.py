"""Shared glue for ``jobs/`` entry points: logging set-up and one-line user errors."""

from __future__ import annotations

import functools
import logging
import sys

from squall.errors import SquallError


def user_errors(main):
    """Turn a :class:`SquallError` into ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SquallError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

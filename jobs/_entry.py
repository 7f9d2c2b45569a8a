"""Shared glue for ``jobs/`` entry points: Hydra set-up, settings checks, logging, one-line errors.

:func:`hydra_job` replaces ``@hydra.main`` in every job. Before the job's own code runs:

- settings are checked against :mod:`squall.schema` (types and unknown keys by Hydra while it
  composes, ranges and choices by :func:`squall.schema.validate`);
- a bad setting, whether Hydra finds it (composition, override syntax, an unknown config group
  option) or squall does (any :class:`SquallError`), ends in one line ``error: ...`` on stderr and
  exit status 2 (``HYDRA_FULL_ERROR=1`` shows Hydra's traceback instead);
- logging goes through Hydra's handlers, from the first rank only under torchrun/srun (other
  ranks print warnings and errors, prefixed with their rank);
- ``--cfg`` with ``--multirun`` prints the config of the sweep's first job instead of Hydra's
  "only one of" error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

from squall.errors import SquallError
from squall.progress import is_first_rank, launch_rank

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# True once Hydra hands a composed config to a job: later errors are the job's, not the config's.
_job_started = False


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


class RankFilter(logging.Filter):
    """On a rank other than the first: only warnings and errors, prefixed ``[rank N]``."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "squall_rank", False):  # once, whatever the number of handlers
            record.msg = f"[rank {self.rank}] {record.msg}"
            record.squall_rank = True
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Log to Hydra's handlers (or stderr outside Hydra), from the first rank only.

    Ranks other than the first (``RANK``/``SLURM_PROCID`` > 0) keep warnings and errors, marked
    with their rank; their info lines would repeat rank 0's once per rank.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    if is_first_rank():
        return
    rank = launch_rank()
    for handler in root.handlers:
        if not any(isinstance(f, RankFilter) for f in handler.filters):
            handler.addFilter(RankFilter(rank))


def _one_line(message: str) -> str:
    """Hydra/OmegaConf's multi-line message as one line: bookkeeping lines dropped, option lists
    joined with commas."""
    parts: list[str] = []
    for raw in message.splitlines():
        line = raw.strip()
        if not line or line.startswith(("full_key:", "object_type=", "reference_type=",
                                        "Set the environment variable HYDRA_FULL_ERROR",
                                        "Config search path", "provider=")):  # fmt: skip
            continue
        if raw.startswith("\t") and parts and parts[-1].endswith(":"):
            parts[-1] += " " + line
        elif raw.startswith("\t") and parts and parts[-1].rsplit(":", 1)[-1].strip():
            parts[-1] += ", " + line
        else:
            parts.append(line)
    return "; ".join(p.rstrip(":.") if p.endswith(":") else p for p in parts)


def describe_config_error(err: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config."""
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        OmegaConfBaseException,
        ValidationError,
    )

    from squall import schema

    if isinstance(err, SquallError):  # squall's own checks, in a Hydra callback
        return str(err)
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    key = getattr(cause, "full_key", None) if isinstance(cause, OmegaConfBaseException) else None
    if key and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        valid = schema.keys_of(key.rpartition(".")[0])
        if valid is None and getattr(cause, "parent_node", None) is not None:
            valid = [str(k) for k in cause.parent_node]
        if valid is not None:
            return schema.unknown_key_message(key, valid)
    if key and isinstance(cause, ValidationError):
        return f"{key}: {str(cause).splitlines()[0]}"
    text = str(err)
    if isinstance(cause, OmegaConfBaseException) and cause is not err:
        text += "\n" + str(cause)
    return _one_line(text)


def _is_config_error(err: BaseException) -> bool:
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
        SearchPathException,
    )
    from omegaconf.errors import OmegaConfBaseException

    kinds = (ConfigCompositionException, MissingConfigException, OverrideParseException,
             SearchPathException, OmegaConfBaseException, SquallError)  # fmt: skip
    return isinstance(err, kinds)


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def _config_errors_in_one_line():
    """Hydra's error reporting, except for config errors raised before the job starts."""
    from hydra._internal import utils as hydra_utils

    original = hydra_utils.run_and_report
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except Exception as err:
                if _job_started or not _is_config_error(err):
                    raise
                _exit_with(describe_config_error(err))

        return original(guarded)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    except ValueError as err:  # Hydra's own command-line checks, raised outside run_and_report
        if _job_started or not str(err).startswith(("Only one of", "The --resolve flag")):
            raise
        _exit_with(str(err))
    finally:
        hydra_utils.run_and_report = original


def _show_one_job_of_sweep(argv: list[str]) -> list[str]:
    """``--cfg`` with ``--multirun``: drop ``--multirun`` and take the first value of each swept
    override, so Hydra prints one job's config (it refuses both flags together)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = {"-m", "--multirun"}
    if not multirun & set(argv) or not any(a in ("-c", "--cfg") or a.startswith("--cfg=")
                                           for a in argv):  # fmt: skip
        return argv
    argv = [a for a in argv if a not in multirun]
    args, _ = get_args_parser().parse_known_args(argv[1:])
    parser = OverridesParser.create()
    swept = []
    for text in args.overrides:
        try:
            override = parser.parse_override(text)
            if not override.is_sweep_override():
                continue
            first = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - left for Hydra to report in its words
            continue
        argv[argv.index(text)] = f"{override.get_key_element()}={first}"
        swept.append(override.get_key_element())
    what = f", first value of {', '.join(swept)}" if swept else ""
    print(f"--cfg with --multirun: one job of the sweep{what} (its hydra.sweeper.params: "
          "--cfg hydra)", file=sys.stderr)  # fmt: skip
    return argv


def hydra_job(config_name: str = "config"):
    """``@hydra.main`` over ``conf/`` for a job: settings checked, one-line errors, logging.

    Parameters
    ----------
    config_name : str
        Primary config in ``conf/`` (``config`` or ``scale``).
    """
    import hydra

    from squall.schema import register, validate

    register()

    def decorate(main):
        @functools.wraps(main)
        def job(cfg):
            global _job_started
            _job_started = True
            setup_logging()
            validate(cfg)
            return main(cfg)

        run = hydra.main(version_base="1.3", config_path=CONF_DIR,
                         config_name=config_name)(user_errors(job))  # fmt: skip

        @functools.wraps(main)
        def entry():
            sys.argv = _show_one_job_of_sweep(sys.argv)
            with _config_errors_in_one_line():
                return run()

        return entry

    return decorate


@contextlib.contextmanager
def distributed_job(cfg):
    """This job's place in a launch (``dist_env``), its process group for the duration, and one
    GPU per rank under NCCL (``cfg.training.device``); yields the environment."""
    from squall.distributed.env import destroy_distributed, dist_env, init_distributed

    env = dist_env()
    init_distributed(env)
    if env.backend == "nccl":
        cfg.training.device = f"cuda:{env.local_rank}"
    try:
        yield env
    finally:
        destroy_distributed()

"""Shared fixtures: the real local Slurm (.ci/slurm/start.sh) and a real MLflow tracking server.

Both listen on 127.0.0.1 only. ``SQUALL_REQUIRE_SLURM=1`` (set in CI) turns "Slurm cannot be
started" from a skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# Triton kernels run through the interpreter on machines without a GPU (CI). TRITON_INTERPRET must
# be set before triton.jit decorates squall's kernels, i.e. before any test module imports squall:
# the root conftest is the one place collected before all of them.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard requirement of the tests
    pass

REPO = Path(__file__).resolve().parents[1]
START = REPO / ".ci" / "slurm" / "start.sh"
# Fresh CI machine: apt-get update + install about 15 s, daemons under 5 s; 300 s bounds a slow
# mirror without letting a broken set-up hang the run.
SLURM_START_TIMEOUT_S = 300
# mlflow server came up in 8 to 11 s on 2 cores (RECIPE.md); 90 s allows a loaded CI machine.
MLFLOW_START_TIMEOUT_S = 90


@dataclass(frozen=True)
class LocalSlurm:
    """The running single-node Slurm.

    Attributes
    ----------
    conf : Path
        slurm.conf, also exported as ``SLURM_CONF`` for the session.
    partition : str
        Default partition.
    state_dir : Path
        Where logs (``log/``) and state live.
    """

    conf: Path
    partition: str
    state_dir: Path


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    """Start (or reuse) the local Slurm once per session; skip when it cannot run here."""
    state_dir = Path(os.environ.get("SQUALL_SLURM_DIR", "/tmp/squall-slurm"))
    partition = os.environ.get("SQUALL_SLURM_PARTITION", "debug")
    required = os.environ.get("SQUALL_REQUIRE_SLURM") == "1"
    try:
        done = subprocess.run(["bash", str(START)], capture_output=True, text=True,
                              timeout=SLURM_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0:
        detail = "timed out" if done is None else (done.stderr.strip().splitlines() or ["?"])[-1]
        if done is not None and done.returncode != 3:
            detail = done.stderr.strip()[-2000:]
        reason = f"local Slurm could not be started by {START.relative_to(REPO)}: {detail}"
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    conf = state_dir / "etc" / "slurm.conf"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield LocalSlurm(conf=conf, partition=partition, state_dir=state_dir)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    """A port on 127.0.0.1 with nothing listening (for "server unreachable" cases)."""
    return free_port()


@pytest.fixture(scope="session")
def mlflow_schema_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sqlite database holding MLflow's schema and only its "Default" experiment.

    Creating the schema takes 5 to 10 s on 2 cores; tests (and the server) that only need *a*
    store start from a copy. Creation from nothing is tested in tests/tracking.
    """
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 that a test can stop and start again on the same
    port and backend store (sqlite ``root/mlflow.db``, artifacts in ``root/artifacts``).

    Attributes
    ----------
    url : str
        ``http://127.0.0.1:<port>``.
    root : Path
        Backend store, artifacts and ``server.log``.
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait until ``/health`` answers (fails the test if it does not)."""
        log_path = self.root / "server.log"
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        # The server's background job runner (a pool of huey consumers) serves no test here.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(log_path, "a") as log_file:
            # Own session, so stop() ends the server and its workers by process group id.
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                         cwd=self.root, env=env, start_new_session=True)
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-2000:]
                self.stop()
                pytest.fail(f"mlflow server did not come up on {self.url} (log {log_path}):\n"
                            f"{tail}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server (SIGKILL by default: an outage, not a clean shutdown) and every
        process of its group; returns once the port is closed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the group outlived its leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _new_server(tmp_path_factory: pytest.TempPathFactory, schema_db: Path) -> MlflowServer:
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(schema_db, root / "mlflow.db")
    return MlflowServer(root, free_port())


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, mlflow_schema_db: Path) -> str:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, artifacts in tmp); yields its URL."""
    server = _new_server(tmp_path_factory, mlflow_schema_db)
    try:
        server.start()
        yield server.url
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture
def restartable_mlflow_server(tmp_path_factory: pytest.TempPathFactory,
                              mlflow_schema_db: Path) -> MlflowServer:
    """A server of the test's own (not shared), which the test may stop and start again:
    ``server.stop()`` kills it (the outage), ``server.start()`` brings it back on the same port
    and store. Stopped at teardown whatever state it is in."""
    server = _new_server(tmp_path_factory, mlflow_schema_db)
    try:
        server.start()
        yield server
    finally:
        server.stop(signal.SIGTERM)

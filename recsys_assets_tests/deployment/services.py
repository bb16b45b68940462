"""Real services on loopback for the deployment tests: Redis, PostgreSQL, Celery workers.

Each is a context manager that starts the Debian package's server (or `celery worker`) on a
free port, waits until it answers, and stops it (by its own process id) on the way out.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import redis

from recsys_assets_tests.conftest import _free_port

_START_TIMEOUT_S = 120.0
"""Generous: on a loaded 2-core machine a worker importing torch and Dagster takes a while."""
REPO_ROOT = Path(__file__).resolve().parents[2]


def _wait_until(ready: Callable[[], bool], what: str, log: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer within {_START_TIMEOUT_S:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    """The end of a service's log, for a failure message."""
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return False


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """`redis-server` on a free loopback port, nothing persisted; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "redis.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_until(lambda: _redis_answers(url), "redis-server", log, process)
        yield url
    finally:
        _stop(process)


@dataclass(frozen=True)
class CeleryWorkers:
    names: list[str]
    logs: list[Path]
    processes: list[subprocess.Popen]

    def wait_ready(self) -> None:
        """Block until every worker says it is ready (or fail with its log)."""
        for name, log, process in zip(self.names, self.logs, self.processes, strict=True):
            _wait_until(
                lambda log=log: " ready." in log.read_text(errors="replace"),
                f"celery worker {name}",
                log,
                process,
            )

    def log_tails(self) -> str:
        return "\n".join(tail(log) for log in self.logs)


@contextlib.contextmanager
def celery_workers(
    count: int, env: Mapping[str, str], folder: Path, *, preload: str
) -> Iterator[CeleryWorkers]:
    """`count` Celery worker processes of the recsys Celery app, one task at a time each,
    with `env` (the broker among it) over the current environment. They import `preload`
    while starting, so a caller can do other work until `wait_ready()`."""
    folder.mkdir(parents=True, exist_ok=True)
    workers = CeleryWorkers([f"recsys-worker-{i}@localhost" for i in range(1, count + 1)], [], [])
    try:
        for name in workers.names:
            log = folder / f"{name.split('@')[0]}.log"
            workers.logs.append(log)
            with log.open("wb") as out:
                workers.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "celery",
                            "-A",
                            "recsys_assets.deployment.celery_worker",
                            "worker",
                            "--pool",
                            "solo",
                            "--concurrency",
                            "1",
                            "--prefetch-multiplier",
                            "1",
                            "--without-gossip",
                            "--without-mingle",
                            "--loglevel",
                            "INFO",
                            "--include",
                            preload,
                            "-n",
                            name,
                        ],
                        cwd=REPO_ROOT,
                        env={**os.environ, **env},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield workers
    finally:
        for process in workers.processes:
            _stop(process)


def postgres_binaries() -> Path:
    """The newest PostgreSQL server's bin folder (Debian package postgresql)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    return Path(found[-1]).parent


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root (CI's user): run it as `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _postgres_answers(params: Mapping[str, str]) -> bool:
    try:
        psycopg2.connect(connect_timeout=1, **params).close()
    except psycopg2.OperationalError:
        return False
    return True


@contextlib.contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL cluster on a free loopback port, with a database and a password
    user for Dagster; yields the connection parameters (host, port, user, password, dbname).

    Its folder is a new one under the system temp dir, owned by `postgres` when running as
    root: pytest's temp folders are private to the user running the tests.
    """
    binaries = postgres_binaries()
    folder = Path(tempfile.mkdtemp(prefix="recsys-postgres-"))
    data = folder / "data"
    log = folder / "postgres.log"
    password_file = folder / "password"
    params = {
        "host": "127.0.0.1",
        "port": str(_free_port()),
        "user": "recsys",
        "password": "recsys-test-password",
        "dbname": "dagster",
    }
    password_file.write_text(params["password"])
    log.touch()
    if os.geteuid() == 0:
        for path in (folder, password_file, log):
            shutil.chown(path, "postgres")
    process: subprocess.Popen | None = None
    try:
        subprocess.run(
            _as_postgres_user(
                [
                    str(binaries / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    params["user"],
                    "--pwfile",
                    str(password_file),
                    "-A",
                    "scram-sha-256",
                ]
            ),
            check=True,
            capture_output=True,
        )
        with log.open("ab") as out:
            process = subprocess.Popen(
                _as_postgres_user(
                    [
                        str(binaries / "postgres"),
                        "-D",
                        str(data),
                        "-h",
                        params["host"],
                        "-p",
                        params["port"],
                        "-k",
                        str(folder),
                    ]
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = {**params, "dbname": "postgres"}
        _wait_until(lambda: _postgres_answers(server), "postgres", log, process)
        connection = psycopg2.connect(**server)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {params['dbname']}")
        connection.close()
        yield params
    finally:
        if process is not None:
            # SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for clients to leave).
            process.send_signal(signal.SIGINT)
            _stop(process)
        shutil.rmtree(folder, ignore_errors=True)

"""Private servers for tests and benchmarks: started on a free port in a temporary folder,
stopped afterwards. Never a server that happens to be running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict

__all__ = [
    "SHIPPED_VCL",
    "PostgresServer",
    "RedisServer",
    "VarnishServer",
    "free_port",
    "serve_app",
    "vcl_with_backend",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found; install it with: apt-get install -y {package}")
    return path


class _Started:
    """``with server:`` starts the server and stops it at the end of the block."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _ServerProcess(_Started):
    """A server process of ours in a temporary folder: ``stop`` ends it (gently, then
    not) and removes the folder."""

    process: subprocess.Popen[bytes] | None
    directory: Path

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisServer(_ServerProcess):
    """A private ``redis-server``. Use as a context manager, or ``start()``/``stop()``.

    ``kill()`` ends it abruptly (SIGKILL) and ``restart()`` starts it again on the same
    port and folder (with ``appendonly=True`` it reloads its AOF, as after a crash).
    """

    def __init__(self, *, appendonly: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = _require("redis-server", "redis-server")
        self.port = free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.directory = Path(tempfile.mkdtemp(prefix="freshcache-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--enable-debug-command", "yes",
            "--logfile", str(self.directory / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited at start:\n{log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()


def _postgres_binaries() -> Path:
    """The folder holding ``initdb`` and ``postgres``: Debian keeps it out of PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        reply = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if reply.returncode == 0:
            candidates.append(Path(reply.stdout.strip()))
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        versions, key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0
    )[::-1]
    on_path = shutil.which("postgres")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, postgres) not found; "
        "install them with: apt-get install -y postgresql"
    )


class _Account(TypedDict):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


class PostgresServer(_Started):
    """A private PostgreSQL server: ``initdb`` in a temporary folder, ``postgres`` on a
    free port of 127.0.0.1 (its unix socket in that folder), removed by ``stop()``. Use as
    a context manager, or ``start()``/``stop()``.

    As root (PostgreSQL refuses to run as root) the server runs as the ``postgres``
    system user. It trades durability against a host crash for speed (``fsync=off``);
    a killed server process loses nothing committed. ``kill()`` is an immediate shutdown
    (SIGQUIT: every server process exits at once, as in a crash, and ``restart()``
    recovers from the WAL).

    With ``FRESHCACHE_TEST_DATABASE_URL`` set (any SQLAlchemy or libpq URL of a server
    whose user may create databases), no server is started: each instance creates a
    fresh database there and drops it at ``stop()``; ``kill()`` is then unavailable.
    """

    def __init__(self) -> None:
        self.external_url = os.environ.get("FRESHCACHE_TEST_DATABASE_URL") or None
        self.port = free_port()
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.database = "postgres"
        self.user = "freshcache"
        if self.external_url is None:
            self.binaries = _postgres_binaries()
            self.directory = Path(tempfile.mkdtemp(prefix="freshcache-postgres-"))
        else:
            self.database = f"freshcache_test_{secrets.token_hex(6)}"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL (``postgresql+asyncpg://...``) of the server's database."""
        return self._url("postgresql+asyncpg")

    @property
    def dsn(self) -> str:
        """The same database as a libpq URL (``postgresql://...``), e.g. for ``psql``."""
        return self._url("postgresql")

    def _url(self, scheme: str) -> str:
        if self.external_url is None:
            return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{self.database}"
        from sqlalchemy.engine import make_url

        url = make_url(self.external_url).set(drivername=scheme, database=self.database)
        return url.render_as_string(hide_password=False)

    def start(self) -> PostgresServer:
        if self.external_url is not None:
            self._administer(f'CREATE DATABASE "{self.database}"')
            return self
        assert self.directory is not None
        data = self.directory / "data"
        if not data.exists():
            self._initdb(data)
        log = open(self.directory / "postgres.log", "ab")  # noqa: SIM115 (the server's stderr)
        with log:
            self.process = subprocess.Popen(
                [
                    str(self.binaries / "postgres"),
                    "-D", str(data),
                    "-p", str(self.port),
                    "-h", "127.0.0.1",
                    "-k", str(self.directory),
                    "-c", "fsync=off",
                    "-c", "full_page_writes=off",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                **self._server_account(),
            )  # fmt: skip
        self._wait_until_ready(data / "postmaster.pid")
        return self

    def _server_account(self) -> _Account:
        """Whom the server runs as: the ``postgres`` user when we are root."""
        if os.geteuid() != 0:
            return {"user": None, "group": None, "extra_groups": None}
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "PostgreSQL refuses to run as root and there is no 'postgres' user; "
                "install the server with: apt-get install -y postgresql"
            ) from None
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _initdb(self, data: Path) -> None:
        assert self.directory is not None
        account = self._server_account()
        if account["user"] is not None and account["group"] is not None:
            os.chown(self.directory, account["user"], account["group"])
        reply = subprocess.run(
            [
                str(self.binaries / "initdb"),
                "-D", str(data),
                "-U", self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            cwd=self.directory,
            **account,
        )  # fmt: skip
        if reply.returncode != 0:
            output = (reply.stdout + reply.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb failed:\n{output[-2000:]}")

    def _wait_until_ready(self, pid_file: Path) -> None:
        assert self.process is not None and self.directory is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "postgres.log").read_text(errors="replace")
                self.process = None
                raise RuntimeError(f"postgres exited at start:\n{log[-2000:]}")
            # The postmaster writes its status on the eighth line once it accepts
            # connections.
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("postgres did not become ready within 30 s")

    def _administer(self, statement: str) -> None:
        """Run one statement on the external server's own database, from a thread with an
        event loop of its own (the caller may be inside one)."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.ext.asyncio import create_async_engine

        assert self.external_url is not None
        url = make_url(self.external_url).set(drivername="postgresql+asyncpg")

        async def execute() -> None:
            engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
            try:
                async with engine.connect() as connection:
                    await connection.exec_driver_sql(statement)
            finally:
                await engine.dispose()

        with ThreadPoolExecutor(max_workers=1) as thread:
            thread.submit(asyncio.run, execute()).result()

    def kill(self) -> None:
        """Shut the server down at once, as in a crash (immediate shutdown)."""
        if self.external_url is not None:
            raise RuntimeError("an external server (FRESHCACHE_TEST_DATABASE_URL) cannot be killed")
        self._signal(signal.SIGQUIT)

    def restart(self) -> PostgresServer:
        self.kill()
        return self.start()

    def _signal(self, number: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder, or drop the database
        created on the external server."""
        if self.external_url is not None:
            self._administer(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            return
        self._signal(signal.SIGINT)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


SHIPPED_VCL = Path(__file__).resolve().parents[2] / "deploy" / "varnish" / "default.vcl"
"""The repository's Varnish configuration (``deploy/varnish/default.vcl``)."""


def vcl_with_backend(vcl: str, host: str, port: int) -> str:
    """``vcl`` with its ``backend default { ... }`` block pointed at ``host:port``."""
    # The block's first and last lines stand alone (comments may quote its opening).
    opening = "\nbackend default {\n"
    if vcl.count(opening) != 1:
        raise ValueError("the VCL must contain exactly one `backend default { ... }` block")
    start = vcl.index(opening) + 1
    end = vcl.index("\n}\n", start) + len("\n}\n")
    block = f'backend default {{\n    .host = "{host}";\n    .port = "{port}";\n}}\n'
    return vcl[:start] + block + vcl[end:]


def _http_status(port: int, method: str, headers: dict[str, str]) -> int | None:
    """The status of one HTTP/1.1 request to 127.0.0.1:``port``, or None if none came."""
    lines = [f"{method} / HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            status_line = conn.recv(64).split(b"\r\n", 1)[0].split()
    except OSError:
        return None
    return int(status_line[1]) if len(status_line) >= 2 and status_line[1].isdigit() else None


class VarnishServer(_ServerProcess):
    """A private ``varnishd`` (with varnish-modules, for xkey) running ``vcl_path`` (the
    shipped VCL by default) with its backend pointed at ``backend_host:backend_port``.
    Use as a context manager, or ``start()``/``stop()``; ``url`` is its HTTP address,
    from which purges are allowed (127.0.0.1 is in the VCL's ``purgers`` ACL).

    The backend need not be up yet: Varnish connects to it per request.
    """

    def __init__(
        self,
        backend_port: int,
        *,
        backend_host: str = "127.0.0.1",
        vcl_path: Path = SHIPPED_VCL,
    ) -> None:
        # varnishd lives in /usr/sbin, which a non-login PATH may lack.
        binary = shutil.which("varnishd", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if binary is None:
            raise RuntimeError(
                "varnishd not found; install it with: apt-get install -y varnish varnish-modules"
            )
        self.binary = binary
        self.vcl = vcl_with_backend(vcl_path.read_text(), backend_host, backend_port)
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="freshcache-varnish-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VarnishServer:
        vcl_file = self.directory / "default.vcl"
        vcl_file.write_text(self.vcl)
        log_path = self.directory / "varnishd.log"
        args = [
            self.binary,
            "-F",
            "-n", str(self.directory / "instance"),
            # The tests run as root; without a jail varnishd needs no varnish user.
            "-j", "none",
            "-a", f"127.0.0.1:{self.port}",
            "-T", f"127.0.0.1:{free_port()}",
            "-f", str(vcl_file),
            "-s", "malloc,32m",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        # A loaded machine compiles VCL slowly. A tag purge is answered by the VCL itself:
        # its 200 shows the VCL is loaded.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if _http_status(self.port, "PURGE", {"xkey-purge": "none"}) == 200:
                return self
            time.sleep(0.05)
        log_text = log_path.read_text(errors="replace")
        self.stop()
        hint = ""
        if "xkey" in log_text:
            hint = "\nIs varnish-modules installed? apt-get install -y varnish-modules"
        raise RuntimeError(f"varnishd did not start within 20 s:\n{log_text[-3000:]}{hint}")


@contextlib.asynccontextmanager
async def serve_app(app: Any, start_within: float = 30.0, **options: Any) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free port, in the running event loop;
    yield its URL, then shut it down. ``options`` go to ``uvicorn.Config``."""
    import uvicorn

    port = free_port()
    settings: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 2}
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **{**settings, **options})
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(start_within):
            while not server.started:
                if task.done():
                    task.result()  # raises why it could not start
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task

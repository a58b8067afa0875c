"""A real single-node Apache Kafka broker for tests, driven by tools/kafka/kafka.sh.

No pytest dependency: usable from tests, benchmarks and scripts.

    with KafkaBroker() as bootstrap:            # "127.0.0.1:PORT"
        create_topics(bootstrap, {"calls": 4, "state": 1}, compact={"state"})

    broker = KafkaBroker(sasl_ssl=True, scram_users={"alice": "s3cret"})
    broker.start()      # also a SASL_SSL listener: broker.tls.bootstrap, .cafile, client cert

The broker runs in its own directory (a temp dir unless ``data_dir`` is given;
a temp dir is removed on ``stop()``), logs to ``<dir>/logs/server.log`` and
is also stopped by a watchdog if this Python process dies without calling
``stop()``.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_SCRIPT = REPO_ROOT / "tools" / "kafka" / "kafka.sh"

# A cold install may apt-get a JDK and Maven and download ~45 MB of jars.
INSTALL_TIMEOUT_S = 1200.0

T = TypeVar("T")


class KafkaBrokerError(RuntimeError):
    """The broker could not be installed, started or reached."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n{self.log_tail}" if self.log_tail else base


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass(frozen=True)
class BrokerTls:
    """The SASL_SSL listener of a broker started with ``sasl_ssl=True`` and its test PKI."""

    bootstrap: str  # 127.0.0.1:PORT of the SASL_SSL listener
    cafile: Path  # the test CA (PEM) that signed the broker's and the client's certificates
    client_cert: Path
    client_key: Path  # PKCS#8, encrypted with the password in client_key_password_file
    client_key_password_file: Path


class KafkaBroker:
    """Start/stop one broker with ``tools/kafka/kafka.sh``; also a context manager."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        start_timeout: float = 90.0,
        extra_props: Mapping[str, str] | None = None,
        script: str | os.PathLike[str] = KAFKA_SCRIPT,
        env: Mapping[str, str] | None = None,
        sasl_ssl: bool = False,
        scram_users: Mapping[str, str] | None = None,
    ) -> None:
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self.port = port
        self.start_timeout = start_timeout
        self.extra_props = dict(extra_props or {})
        self.script = Path(script)
        self._env = dict(env or {})
        self.data_dir: Path | None = None
        self._owns_dir = False
        self.bootstrap: str | None = None
        self.start_seconds: float | None = None  # wall time of the last start()
        self.sasl_ssl = sasl_ssl
        self.scram_users = dict(scram_users or {})
        self.tls: BrokerTls | None = None  # set by start() when sasl_ssl

    # -- process control -------------------------------------------------

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self._env}
        # The script's readiness probe uses aiokafka from this interpreter.
        env.setdefault("KAFKA_PYTHON", sys.executable)
        try:
            return subprocess.run(  # noqa: S603
                ["bash", str(self.script), *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise KafkaBrokerError(
                f"kafka.sh {args[0]} timed out after {timeout:.0f}s",
                _tail(err) + "\n" + self.log_tail(),
            ) from exc

    def install(self) -> str:
        """Make sure Java and the broker jars are there; return the lib dir."""
        proc = self._run(["install"], INSTALL_TIMEOUT_S)
        if proc.returncode != 0:
            raise KafkaBrokerError(f"kafka.sh install failed (exit {proc.returncode})", _tail(proc.stderr))
        return proc.stdout.strip().splitlines()[-1]

    def start(self) -> str:
        """Start the broker and return its bootstrap string ``127.0.0.1:PORT``."""
        if self.bootstrap is not None:
            return self.bootstrap
        self.install()
        if self._given_dir is not None:
            self.data_dir = self._given_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="detector-kafka-"))
            self._owns_dir = True
        args = [
            "start",
            "--dir",
            str(self.data_dir),
            "--timeout",
            str(int(self.start_timeout)),
            "--owner-pid",
            str(os.getpid()),
        ]
        if self.port is not None:
            args += ["--port", str(self.port)]
        for key, value in self.extra_props.items():
            args += ["--prop", f"{key}={value}"]
        if self.sasl_ssl:
            args.append("--sasl-ssl")
            for user, password in self.scram_users.items():
                args += ["--scram-user", f"{user}={password}"]
        t0 = time.monotonic()
        proc = self._run(args, self.start_timeout + 60)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("BOOTSTRAP="):
            tail = _tail(proc.stderr, 120)
            self._cleanup_after_failure()
            raise KafkaBrokerError(
                f"kafka.sh start failed (exit {proc.returncode}) after {time.monotonic() - t0:.1f}s",
                tail,
            )
        self.bootstrap = lines[-1].split("=", 1)[1].strip()
        if self.sasl_ssl:
            out = dict(line.split("=", 1) for line in lines if "=" in line)
            self.tls = BrokerTls(
                bootstrap=out["SASL_SSL_BOOTSTRAP"],
                cafile=Path(out["SSL_CAFILE"]),
                client_cert=Path(out["SSL_CLIENT_CERT"]),
                client_key=Path(out["SSL_CLIENT_KEY"]),
                client_key_password_file=Path(out["SSL_CLIENT_KEY_PASSWORD_FILE"]),
            )
        self.start_seconds = time.monotonic() - t0
        atexit.register(self.stop)
        return self.bootstrap

    def stop(self, clean: bool | None = None) -> None:
        """Stop the broker (SIGTERM, then SIGKILL). Removes a temp dir it created."""
        if self.data_dir is None:
            return
        clean = self._owns_dir if clean is None else clean
        args = ["stop", "--dir", str(self.data_dir)] + (["--clean"] if clean else [])
        try:
            proc = self._run(args, 90)
        finally:
            self.bootstrap = None
            atexit.unregister(self.stop)
        if proc.returncode != 0:
            raise KafkaBrokerError(f"kafka.sh stop failed (exit {proc.returncode})", proc.stderr)
        if clean:
            self.data_dir = None
            self._owns_dir = False

    def _cleanup_after_failure(self) -> None:
        # kafka.sh already killed the broker; keep the dir only if the caller chose it.
        if self._owns_dir and self.data_dir is not None:
            self._run(["stop", "--dir", str(self.data_dir)], 90)
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
            self._owns_dir = False

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the broker's logs (empty when there is no broker dir)."""
        if self.data_dir is None:
            return ""
        out = []
        for name in ("logs/server.log", "broker.out", "format.log"):
            path = self.data_dir / name
            if path.is_file() and path.stat().st_size:
                text = path.read_text(errors="replace")
                out.append(f"----- {path} -----\n{_tail(text, lines)}")
        return "\n".join(out)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- helpers over aiokafka -----------------------------------------------------


def _run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """asyncio.run(factory()), also when called from inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coro(factory))
    values: list[T] = []
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            values.append(asyncio.run(_as_coro(factory)))
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=runner, name="kafka-broker-helper")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return values[0]


async def _as_coro(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


async def acreate_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    compact: Iterable[str] = (),
    *,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    replication_factor: int = 1,
    exist_ok: bool = False,
    timeout: float = 30.0,
    **client: Any,
) -> None:
    """Create ``{name: partitions}`` and wait until every partition has a leader.

    Names in ``compact`` get ``cleanup.policy=compact``; ``configs`` adds
    per-topic configs; ``client`` adds aiokafka client options (TLS/SASL).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    compact = set(compact)
    configs = configs or {}
    unknown = (compact | set(configs)) - set(topics)
    if unknown:
        raise ValueError(f"compact/configs name topics not in `topics`: {sorted(unknown)}")
    new = []
    for name, partitions in topics.items():
        cfg = dict(configs.get(name, {}))
        if name in compact:
            cfg["cleanup.policy"] = "compact"
        new.append(NewTopic(name, partitions, replication_factor, topic_configs=cfg))

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                                **client)
    try:
        await admin.start()
        if new:
            resp = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
            errors = []
            for err in resp.to_object().get("topic_errors", []):
                code = err.get("error_code", 0)
                if code == 0 or (code == 36 and exist_ok):  # 36: TOPIC_ALREADY_EXISTS
                    continue
                errors.append(f"{err.get('topic')}: error {code} {err.get('error_message') or ''}")
            if errors:
                raise KafkaBrokerError("create_topics failed: " + "; ".join(errors))
        await _wait_for_leaders(admin, dict(topics), timeout)
    finally:
        await admin.close()


async def _wait_for_leaders(admin: Any, topics: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(topics)
    while pending:
        for meta in await admin.describe_topics(list(pending)):
            parts = meta.get("partitions") or []
            if (
                meta.get("error_code") == 0
                and len(parts) >= pending.get(meta["topic"], 0)
                and all(p.get("leader", -1) >= 0 for p in parts)
            ):
                pending.pop(meta["topic"], None)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise KafkaBrokerError(f"topics without leaders after {timeout}s: {sorted(pending)}")
        await asyncio.sleep(0.1)


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    compact: Iterable[str] = (),
    **kwargs: Any,
) -> None:
    """Sync wrapper of :func:`acreate_topics`."""
    _run_sync(lambda: acreate_topics(bootstrap, topics, compact, **kwargs))


async def await_broker(bootstrap: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the broker at ``bootstrap`` answers a metadata request.

    Returns the cluster description (brokers, controller_id, cluster_id).
    """
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            info = await admin.describe_cluster()
            if info.get("brokers"):
                return dict(info)
        except Exception as exc:  # not up yet
            last = exc
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
    raise KafkaBrokerError(f"no Kafka broker answers at {bootstrap} after {timeout}s: {last!r}")


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> dict[str, Any]:
    """Sync wrapper of :func:`await_broker`."""
    return _run_sync(lambda: await_broker(bootstrap, timeout))


if __name__ == "__main__":  # manual smoke test: python tests/kafka_broker.py
    with KafkaBroker() as _bootstrap:
        create_topics(_bootstrap, {"smoke": 4})
        sys.stdout.write(f"BOOTSTRAP={_bootstrap} cluster={wait_for_broker(_bootstrap)}\n")

"""The decision log's database: SQLite (embedded default) or PostgreSQL (psycopg 3).

``open_store("sqlite:///var/decisions.sqlite")`` or ``open_store("postgresql://u:p@host:5432/db")``
applies the versioned SQL migrations in ``detector/sink/migrations/<dialect>/`` that the database
has not seen yet (table ``schema_migrations``), then offers idempotent batched upserts (by request
id), look-ups for ``detector explain``, range reads for ``detector backtest`` and the retention
purge. Rows come from :mod:`detector.sink.rows` (no raw IP, numbers hashed and masked).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from detector.core.errors import ConfigError

DECISION_COLUMNS = (
    "request_id", "decided_at", "request_ts", "action", "silent", "risk", "reasons",
    "monitored_reasons", "policy_version", "model_version", "number_hash", "number_masked",
    "number_e164", "number_country", "number_type", "ip_hash", "ip_country", "asn", "enrichment",
    "counts", "model", "stored_at", "cost_per_min", "expected_cost", "currency", "budget",
)  # fmt: skip
OUTCOME_COLUMNS = ("request_id", "outcome", "ts", "duration_s", "number_hash", "stored_at")
JSON_COLUMNS = ("enrichment", "counts", "model", "budget")


def _upsert(table: str, columns: Sequence[str]) -> str:
    cols = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "request_id")
    return (f"INSERT INTO {table} ({cols}) VALUES ({marks}) "  # noqa: S608 - fixed column names
            f"ON CONFLICT (request_id) DO UPDATE SET {updates}")


UPSERT_DECISION = _upsert("decisions", DECISION_COLUMNS)
UPSERT_OUTCOME = _upsert("outcomes", OUTCOME_COLUMNS)
INSERT_REASON = ("INSERT INTO decision_reasons (request_id, reason, position, monitored) "
                 "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING")


class DecisionStore:
    """One connection to the decision log. Not thread-safe; one per task."""

    dialect = ""
    url = ""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    # -- dialect hooks
    def _sql(self, sql: str) -> str:
        return sql

    def _json(self, value: Any) -> Any:
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def _unjson(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def _bool(self, value: Any) -> Any:
        return bool(value)

    # -- migrations
    def migrate(self) -> list[str]:
        """Apply the migrations not applied yet, in order; returns their names."""
        cur = self.conn.cursor()
        cur.execute(self._sql("CREATE TABLE IF NOT EXISTS schema_migrations "
                              "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"))
        self.conn.commit()
        self._lock()
        try:
            cur.execute("SELECT version FROM schema_migrations")
            done = {int(r[0]) for r in cur.fetchall()}
            applied = []
            folder = resources.files("detector.sink").joinpath("migrations", self.dialect)
            for f in sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name):
                version = int(f.name.split("_", 1)[0])
                if version in done:
                    continue
                self._script(f.read_text("utf-8"))
                cur.execute(self._sql("INSERT INTO schema_migrations VALUES (%s, %s, %s)"),
                            (version, f.name, time.time()))
                self.conn.commit()
                applied.append(f.name)
            return applied
        finally:
            self._unlock()

    def _lock(self) -> None:
        pass

    def _unlock(self) -> None:
        pass

    def _script(self, sql: str) -> None:
        raise NotImplementedError

    # -- writes
    def write(self, decisions: Sequence[dict[str, Any]], outcomes: Sequence[dict[str, Any]] = ()) -> None:
        """Upsert rows (from :mod:`detector.sink.rows`) in one transaction; a redelivered row
        replaces itself, never adds a second one."""
        cur = self.conn.cursor()
        try:
            if decisions:
                cur.executemany(self._sql(UPSERT_DECISION), [self._decision_params(r) for r in decisions])
                reasons = [(r["request_id"], code, i, self._bool(mon))
                           for r in decisions
                           for mon, key in ((False, "reasons"), (True, "monitored_reasons"))
                           for i, code in enumerate(filter(None, r[key].split(",")))]
                if reasons:
                    cur.executemany(self._sql(INSERT_REASON), reasons)
            if outcomes:
                cur.executemany(self._sql(UPSERT_OUTCOME),
                                [tuple(r[c] for c in OUTCOME_COLUMNS) for r in outcomes])
            self.conn.commit()
        except Exception:
            self.conn.rollback()
            raise

    def _decision_params(self, r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(self._json(r[c]) if c in JSON_COLUMNS else
                     self._bool(r[c]) if c == "silent" else r[c] for c in DECISION_COLUMNS)

    def purge(self, before: float) -> int:
        """Delete decisions decided and outcomes reported before ``before`` (epoch s). Returns rows."""
        cur = self.conn.cursor()
        cur.execute(self._sql("DELETE FROM decision_reasons WHERE request_id IN "
                              "(SELECT request_id FROM decisions WHERE decided_at < %s)"), (before,))
        cur.execute(self._sql("DELETE FROM decisions WHERE decided_at < %s"), (before,))
        n = cur.rowcount or 0
        cur.execute(self._sql("DELETE FROM outcomes WHERE ts < %s"), (before,))
        n += cur.rowcount or 0
        self.conn.commit()
        return n

    # -- reads
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.cursor()
        cur.execute(self._sql(sql), tuple(params))
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            d = dict(zip(names, row, strict=True))
            for c in JSON_COLUMNS:
                if c in d:
                    d[c] = self._unjson(d[c])
            if "silent" in d:
                d["silent"] = bool(d["silent"])
            out.append(d)
        return out

    def get(self, request_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM decision_log WHERE request_id = %s", (request_id,))
        return rows[0] if rows else None

    def by_number_hash(self, number_hash: str, limit: int = 20) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM decision_log WHERE number_hash = %s "
                          "ORDER BY decided_at DESC LIMIT %s", (number_hash, limit))

    def by_reason(self, reason: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows("SELECT d.* FROM decision_log d JOIN decision_reasons r "
                          "ON r.request_id = d.request_id WHERE r.reason = %s "
                          "ORDER BY d.decided_at DESC LIMIT %s", (reason, limit))

    def between(self, start: float, end: float) -> Iterator[dict[str, Any]]:
        """Decisions decided in [start, end), in request-time order."""
        yield from self._rows("SELECT * FROM decision_log WHERE decided_at >= %s AND decided_at < %s "
                              "ORDER BY request_ts, request_id", (start, end))

    def count(self, table: str = "decisions") -> int:
        if table not in ("decisions", "outcomes", "decision_reasons"):
            raise ValueError(table)
        cur = self.conn.cursor()
        cur.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 - checked above
        return int(cur.fetchone()[0])

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> DecisionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SQLiteStore(DecisionStore):
    dialect = "sqlite"

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", "?")

    def _bool(self, value: Any) -> Any:
        return 1 if value else 0

    def _script(self, sql: str) -> None:
        self.conn.executescript(sql)


class PostgresStore(DecisionStore):
    dialect = "postgresql"

    def _json(self, value: Any) -> Any:
        from psycopg.types.json import Jsonb

        return None if value is None else Jsonb(value)

    def _lock(self) -> None:  # one migrator at a time when several sinks start together
        self.conn.execute("SELECT pg_advisory_lock(7130501)")

    def _unlock(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(7130501)")
        self.conn.commit()

    def _script(self, sql: str) -> None:
        self.conn.execute(sql)  # psycopg runs a multi-statement script without parameters


def open_store(url: str, *, migrate: bool = True) -> DecisionStore:
    """Open (and migrate) the decision log at ``url``: ``sqlite:///path``, a plain file path, or
    ``postgresql://...``."""
    store: DecisionStore
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - pinned dependency
            raise ConfigError("DETECTOR_SINK_DB is PostgreSQL but psycopg is not installed") from exc
        try:
            conn = psycopg.connect(url, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"DETECTOR_SINK_DB: cannot connect to PostgreSQL: {exc}") from exc
        store = PostgresStore(conn)
    else:
        path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        lite = sqlite3.connect(str(path), check_same_thread=False)  # one user at a time (to_thread)
        lite.execute("PRAGMA journal_mode=WAL")
        lite.execute("PRAGMA synchronous=NORMAL")
        store = SQLiteStore(lite)
    store.url = url
    if migrate:
        store.migrate()
    return store

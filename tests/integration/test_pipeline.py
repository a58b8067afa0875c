"""End to end through a real Kafka broker: worker subprocesses, real topics, real changelogs.

Every test gets its own topics and app id (``fresh_topic_prefix``), starts its workers as
``python -m detector.stream.worker`` subprocesses (each with its own web port and data dir) and
kills them in ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from detector.config import Settings, load_settings
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.core.records import decision_from_dict
from detector.runtime import build_context
from detector.stream import io
from detector.stream.io import stop_consumer, topic_partitions

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = time.time() - 7200.0  # event times: recent, so the Kafka timestamps are too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def list_keys(tmp: Path) -> dict[str, str]:
    """A SOC and a worker key pair (``detector keys generate``) and the settings that use them."""
    from detector.keys import generate

    d = tmp / "keys"
    if not (d / "soc.key").exists():
        generate(d, "soc")
        generate(d, "worker")
    return {
        "DETECTOR_SOC_PRIVATE_KEY": str(d / "soc.key"),
        "DETECTOR_SOC_PUBLIC_KEYS": str(d / "soc.pub"),
        "DETECTOR_WORKER_PRIVATE_KEY": str(d / "worker.key"),
        "DETECTOR_WORKER_PUBLIC_KEYS": str(d / "worker.pub"),
    }


def detector_env(bootstrap: str, prefix: str, partitions: int, tmp: Path) -> dict[str, str]:
    (tmp / "models").mkdir(exist_ok=True)  # empty: no model, in the worker and in the replay
    return {
        **list_keys(tmp),
        "DETECTOR_DEV_MODE": "1",
        "DETECTOR_KAFKA_BOOTSTRAP": bootstrap,
        "DETECTOR_APP_ID": prefix,
        "DETECTOR_TOPIC_REQUESTS": f"{prefix}-requests",
        "DETECTOR_TOPIC_DECISIONS": f"{prefix}-decisions",
        "DETECTOR_TOPIC_OUTCOMES": f"{prefix}-outcomes",
        "DETECTOR_TOPIC_LISTS": f"{prefix}-lists",
        "DETECTOR_TOPIC_DEAD_LETTER": f"{prefix}-dlq",
        "DETECTOR_PARTITIONS": str(partitions),
        "DETECTOR_MODELS_DIR": str(tmp / "models"),
        "DETECTOR_LOG_LEVEL": "INFO",
    }


class WorkerProc:
    """One ``python -m detector.stream.worker`` subprocess with its own port, data dir and log."""

    def __init__(self, env: dict[str, str], tmp: Path, name: str) -> None:
        self.port = free_port()
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.env = {**os.environ, **env, "DETECTOR_WEB_PORT": str(self.port),
                    "DETECTOR_DATA_DIR": str(tmp / f"{name}-data")}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "detector.stream.worker"], cwd=REPO, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return None

    def health(self) -> dict[str, Any] | None:
        text = self.get("/healthz")
        return json.loads(text) if text else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return f"--- {self.name} ---\n" + "\n".join(lines[-n:])


@contextmanager
def workers(env: dict[str, str], tmp: Path, n: int = 1, partitions: int = 1,
            timeout: float = 90.0) -> Iterator[list[WorkerProc]]:
    """Start ``n`` workers, wait until together they own every partition; always kill them."""
    procs = [WorkerProc(env, tmp, f"w{i}") for i in range(n)]
    try:
        for p in procs:
            p.start()
        wait_owned(procs, partitions, timeout)
        yield procs
    except BaseException:
        for p in procs:  # ask each live worker for its task stacks (mode's SIGUSR1 handler)
            if p.alive() and p.proc is not None:
                p.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        for p in procs:
            sys.stderr.write(p.log_tail(400) + "\n")
        raise
    finally:
        for p in procs:
            p.kill()


def wait_owned(procs: list[WorkerProc], partitions: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        owned: list[int] = []
        ready = True
        for p in procs:
            if not p.alive():
                raise AssertionError(f"worker {p.name} exited\n{p.log_tail()}")
            h = p.health()
            if not h or not h["lists_ready"] or not h["partitions"].get("by_range"):
                ready = False
                break
            owned += h["partitions"]["by_range"]
        if ready and sorted(owned) == list(range(partitions)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not ready after {timeout}s: "
                                 f"{[p.health() for p in procs]}")
        time.sleep(0.3)


def req(rid: str, ts: float, phone: str, ip: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": rid, "ts": ts, "phone_number": phone, "ip": ip, **extra}


def write_jsonl(path: Path, rows: list[dict[str, Any] | bytes]) -> Path:
    with path.open("wb") as fh:
        for r in rows:
            fh.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return path


async def _read_all(settings: Settings, topic: str, until: Any, timeout: float,
                    linger: float = 1.0, idle_stop: float | None = None,
                    isolation_level: str = "read_committed") -> list[Any]:
    """Records of ``topic`` from the beginning until ``until(records)`` holds (then ``linger`` s).
    Committed records only by default, as the dialer reads decisions (see the README)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=100,
                                isolation_level=isolation_level)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        done_at = None
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(recs)
                last_new = time.monotonic()
            if idle_stop is not None and out and time.monotonic() - last_new > idle_stop:
                break
            if done_at is None and until(out):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= linger:
                break
        return out
    finally:
        await stop_consumer(consumer)


def decisions_for(settings: Settings, ids: set[str], timeout: float = 60.0,
                  linger: float = 1.0, require_all: bool = True,
                  idle_stop: float | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every decision message per request id, once each id in ``ids`` has at least one."""

    def complete(recs: list[Any]) -> bool:
        return ids <= {json.loads(r.value)["request_id"] for r in recs}

    recs = asyncio.run(_read_all(settings, settings.topic_decisions, complete, timeout, linger,
                                 idle_stop))
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        d = json.loads(r.value)
        assert r.key == d["request_id"].encode()
        out[d["request_id"]].append(d)
    missing = ids - set(out)
    assert not (require_all and missing), (
        f"{len(missing)} requests without a decision, e.g. {sorted(missing)[:5]}")
    return out


async def _send(settings: Settings, topic: str, rows: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=2)
    await producer.start()
    try:
        for key, value in rows:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


def send_outcome(settings: Settings, rid: str, phone: str, outcome: str, ts: float) -> None:
    body = {"request_id": rid, "phone_number": phone, "outcome": outcome, "ts": ts,
            "duration_s": 12.0}
    asyncio.run(_send(settings, settings.topic_outcomes, [(None, json.dumps(body).encode())]))


def produce(settings: Settings, tmp: Path, rows: list[dict[str, Any] | bytes], name: str,
            key_by_ip: bool = True) -> int:
    return io.produce(settings, write_jsonl(tmp / f"{name}.jsonl", rows), key_by_ip=key_by_ip)


def produce_by_ip(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Requests keyed by IP: one IP's requests stay in order on one partition (with key None the
    producer spreads them, and a later request may then be counted before an earlier one)."""
    asyncio.run(_send(settings, settings.topic_requests,
                      [(r["ip"].encode(), json.dumps(r).encode()) for r in rows]))


def one_each(got: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Exactly one decision per request: duplicates after a crash must be byte-identical."""
    out = {}
    for rid, ds in got.items():
        assert all(d == ds[0] for d in ds), f"{rid}: different decisions {ds}"
        out[rid] = ds[0]
    return out


# --------------------------------------------------------------------------- tests


def test_labelled_mix_dead_letters_and_conformance_with_replay(
    kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path
) -> None:
    """One partition (so per-key order equals file order): every valid request gets exactly one
    decision equal to the replay path's; malformed messages go to the DLQ and the worker goes on."""
    from detector.sim.simulate import SimConfig, simulate

    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 1, tmp_path)
    settings = load_settings(env=env)
    items = simulate(SimConfig(seed=7, start=T0, duration_s=2 * 3600.0, legit_per_day=3000,
                               attack_scale=0.4))
    rows: list[dict[str, Any] | bytes] = [i.request for i in items]
    bad = [b"{not json", b'{"request_id": "x1", "ts": 1, "phone_number": "1", "ip": "1.2.3.4"}',
           b'{"request_id": "x2", "phone_number": "+442079460018", "ip": "1.2.3.4"}', b"[]"]
    for k, b in enumerate(bad):  # spread through the stream
        rows.insert((k + 1) * len(rows) // (len(bad) + 1), b)
    with workers(env, tmp_path, n=1, partitions=1):
        # Keyless, as a web tier that sets no key: every request takes the by-ip hop.
        assert produce(settings, tmp_path, rows, "mix", key_by_ip=False) == len(rows)
        valid = [parse_request(i.request) for i in items]
        all_copies = decisions_for(settings, {r.request_id for r in valid}, linger=2.0)
        assert all(len(ds) == 1 for ds in all_copies.values())
        got = one_each(all_copies)
        dlq = asyncio.run(_read_all(settings, settings.topic_dead_letter,
                                    lambda recs: len(recs) >= len(bad), 30))
    kinds = sorted(json.loads(r.value)["error_kind"] for r in dlq)
    assert kinds == ["invalid_field", "malformed_json", "malformed_json", "missing_field"]
    assert all(json.loads(r.value)["original_b64"] for r in dlq)
    replay = Detector(ctx=build_context(settings), intel=IpIntel())
    actions = defaultdict(int)
    for r in valid:
        want = replay.process(r).to_dict()
        have = got[r.request_id]
        assert {**have, "decided_at": 0} == {**want, "decided_at": 0}, r.request_id
        decision_from_dict(have)
        actions[have["action"]] += 1
    assert actions["allow"] > 0 and actions["block"] > 0


def stage_events(w: WorkerProc) -> dict[str, float]:
    """stage -> events processed, from the worker's ``detector_stage_seconds`` histogram."""
    out = {}
    for line in (w.get("/metrics") or "").splitlines():
        if line.startswith('detector_stage_seconds_count{stage="'):
            name, value = line.split()
            out[name.split('"')[1]] = float(value)
    return out


def test_two_workers_four_partitions_count_exactly(
    kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path
) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 4, tmp_path)
    settings = load_settings(env=env)
    rows: list[dict[str, Any] | bytes] = []
    n_pair = 14
    for i in range(600):
        rows.append(req(f"bg{i}", T0 + i, f"+4420794{60000 + i * 37 % 9000:05d}",
                        f"81.2.{i % 50}.{i % 200 + 1}"))
        if i % 40 == 5 and len(rows) < 1000 and sum(1 for r in rows if isinstance(r, dict)
                                                   and r["request_id"].startswith("p")) < n_pair:
            k = sum(1 for r in rows if isinstance(r, dict) and r["request_id"].startswith("p"))
            rows.append(req(f"p{k}", T0 + i + 0.5, "+447700900123", "81.2.69.200"))
    assert sum(1 for r in rows if isinstance(r, dict) and r["request_id"].startswith("p")) == n_pair
    with workers(env, tmp_path, n=2, partitions=4) as procs:
        produce_by_ip(settings, [r for r in rows if isinstance(r, dict)])
        all_copies = decisions_for(settings, {r["request_id"] for r in rows
                                              if isinstance(r, dict)}, linger=2.0)
        owned = [set(p.health()["partitions"]["by_range"]) for p in procs]  # type: ignore[index]
        stages = [stage_events(p) for p in procs]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    # Both workers count the requests keyed by IP in ingest, none takes the by-ip hop: the choice
    # must not depend on which worker leads the group (the follower once read no partition
    # counts and took the hop, and a partition moving between them was counted twice).
    assert all(s.get("ingest_ip", 0) > 0 and s.get("ingest", 0) == 0 for s in stages), stages
    assert all(len(v) == 1 for v in all_copies.values())
    got = one_each(all_copies)
    last = got[f"p{n_pair - 1}"]["counts"]
    assert last["pair_24h"] == last["number_24h"] == last["ip_24h"] == n_pair
    pair_counts = sorted(got[f"p{k}"]["counts"]["pair_24h"] for k in range(n_pair))
    assert pair_counts == list(range(1, n_pair + 1))


def test_sigkill_mid_stream_every_request_one_decision_and_counts_survive(
    kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path
) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 2, tmp_path)
    settings = load_settings(env=env)
    n, n_pair = 6000, 40
    rows: list[dict[str, Any] | bytes] = []
    for i in range(n):
        rows.append(req(f"k{i}", T0 + i * 0.5, f"+3314268{i % 5000:04d}", f"82.{i % 200}.1.{i % 97 + 1}"))
        if i % (n // n_pair) == 3:
            rows.append(req(f"kp{i}", T0 + i * 0.5 + 0.1, "+447700900124", "81.2.69.201"))
    pair_ids = [r["request_id"] for r in rows if isinstance(r, dict) and r["request_id"].startswith("kp")]
    assert len(pair_ids) == n_pair
    ids = {r["request_id"] for r in rows if isinstance(r, dict)}
    with workers(env, tmp_path, n=1, partitions=2) as (w,):
        produce_by_ip(settings, [r for r in rows if isinstance(r, dict)])
        partial = asyncio.run(_read_all(settings, settings.topic_decisions,
                                        lambda recs: len(recs) >= len(ids) // 3, 60, linger=0))
        w.kill()
        assert len(partial) < len(ids), "worker finished before it could be killed"
        w.start()
        got = decisions_for(settings, ids, timeout=120, require_all=False, idle_stop=20.0)
    copies = sum(len(v) for v in got.values())
    decided = one_each(got)  # never two different decisions for one request
    # The restarted worker reloads the ids already on the decisions topic, so the requests it
    # replays (uncommitted offsets) are not decided nor sent again: one message per request.
    assert copies == len(decided), f"{copies - len(decided)} duplicate decision messages"
    assert set(decided) <= ids
    for r in pair_ids:  # counted once each: the n-th request of the pair sees at most n
        assert decided[r]["counts"]["pair_24h"] <= pair_ids.index(r) + 1 if r in decided else True
    missing = ids - set(decided)
    sys.stderr.write(f"kill test: {len(partial)} decisions before SIGKILL, {len(missing)} "
                     f"requests without a decision after restart\n")
    assert not missing, f"{len(missing)} of {len(ids)} requests got no decision after the restart"
    last = decided[pair_ids[-1]]["counts"]
    assert last["pair_24h"] == last["ip_24h"] == last["number_24h"] == n_pair
    assert sorted(decided[r]["counts"]["pair_24h"] for r in pair_ids) == list(range(1, n_pair + 1))


def test_outcomes_clear_pending_and_spam_learns_a_deny_entry(
    kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path
) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 2, tmp_path)
    settings = load_settings(env=env)
    phone = "+442079460099"
    with workers(env, tmp_path, n=1, partitions=2):
        produce(settings, tmp_path, [req("o1", T0, phone, "81.2.69.10")], "o1")
        assert decisions_for(settings, {"o1"})["o1"][0]["action"] == "allow"
        produce(settings, tmp_path, [req("o2", T0 + 10, phone, "81.2.69.11")], "o2")
        assert "duplicate_pending" in decisions_for(settings, {"o2"})["o2"][0]["reasons"]
        send_outcome(settings, "o1", phone, "completed", T0 + 60)
        time.sleep(1.0)  # outcomes and requests travel on different topics
        produce(settings, tmp_path, [req("o3", T0 + 70, phone, "81.2.69.12")], "o3")
        d3 = decisions_for(settings, {"o3"})["o3"][0]
        assert d3["action"] == "allow" and "duplicate_pending" not in d3["reasons"], d3
        send_outcome(settings, "o3", phone, "agent_marked_spam", T0 + 120)
        entries = asyncio.run(_read_all(settings, settings.topic_lists, lambda r: len(r) >= 1, 30))
        produce(settings, tmp_path, [req("o4", T0 + 200, phone, "81.2.69.13")], "o4")
        d4 = decisions_for(settings, {"o4"})["o4"][0]
    (entry,) = [json.loads(r.value) for r in entries]
    assert entries[0].key == f"deny:number:{phone}".encode()
    assert entry["source"] == "learned" and entry["reason"] == "agent_marked_spam"
    assert d4["action"] == "block" and "denylist_number" in d4["reasons"], d4
    assert io.lists_show(settings)[0].key == f"deny:number:{phone}"


def test_lists_add_blocks_a_number_and_remove_unblocks_it(
    kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path
) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 1, tmp_path)
    settings = load_settings(env=env)
    phone = "+442079460077"

    def deny_numbers(w: WorkerProc) -> float:
        for line in (w.get("/metrics") or "").splitlines():
            if line.startswith('detector_list_entries{action="deny",kind="number"}'):
                return float(line.split()[-1])
        return 0.0

    def wait_metric(w: WorkerProc, want: float) -> None:
        deadline = time.monotonic() + 30
        while deny_numbers(w) != want:
            assert time.monotonic() < deadline, f"list entries never reached {want}"
            time.sleep(0.3)

    with workers(env, tmp_path, n=1, partitions=1) as (w,):
        entry = io.lists_add(settings, "deny", "number", "+44 20 7946 0077", reason="ticket 1")
        assert entry.key == f"deny:number:{phone}"
        wait_metric(w, 1.0)
        assert [e.key for e in io.lists_show(settings)] == [entry.key]
        produce(settings, tmp_path, [req("l1", T0, phone, "81.2.69.20")], "l1")
        d1 = decisions_for(settings, {"l1"})["l1"][0]
        assert d1["action"] == "block" and d1["reasons"][0] == "denylist_number", d1
        io.lists_remove(settings, "deny", "number", phone)
        wait_metric(w, 0.0)
        assert io.lists_show(settings) == []
        produce(settings, tmp_path, [req("l2", T0 + 1, phone, "81.2.69.21")], "l2")
        d2 = decisions_for(settings, {"l2"})["l2"][0]
    assert d2["action"] == "allow", d2

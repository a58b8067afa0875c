"""Fault injection against a real broker: every valid request gets exactly one decision message.

Each scenario streams requests keyed by IP through real worker subprocesses, injects a fault
mid-stream and then checks, from the decisions topic as the dialer reads it (committed records):
every request has a decision, exactly one decision *message* (the dialer never sees two), and
the window counts equal the replay path's (every request's per-IP counts, every count of one
IP x number pair's requests: each request counted once).

Faults: SIGKILL of the only worker; SIGTERM under load (the stop must take under 10 s); SIGKILL
of one of two workers while they rebalance; a worker paused (SIGSTOP) past the session timeout,
then resumed; a clean broker restart and a broker SIGKILL (the worker must say so on /healthz,
log a bounded number of lines, and recover by itself).

Short by default (CI: ``pytest -m faults``); ``make soak`` sets DETECTOR_SOAK=1 for more requests
and several rounds per scenario.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import (  # tests/integration is on sys.path (no package)
    REPO,
    T0,
    WorkerProc,
    _read_all,
    decisions_for,
    detector_env,
    one_each,
    produce_by_ip,
    req,
    stop_consumer,
    topic_partitions,
    wait_owned,
    workers,
)

from detector.config import load_settings
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.core.records import IpCounts, RangeCounts
from detector.runtime import build_context

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SOAK = os.environ.get("DETECTOR_SOAK", "") not in ("", "0")
N_REQUESTS = 20000 if SOAK else 4000
ROUNDS = 3 if SOAK else 1
N_PAIR = 30
KAFKA_SH = REPO / "tools" / "kafka" / "kafka.sh"


def traffic(tag: str, n: int = N_REQUESTS, k: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """``n`` requests from many IPs to many numbers, plus N_PAIR from one IP to one number (a
    number of round ``k`` alone: the rounds share their event times)."""
    rows: list[dict[str, Any]] = []
    pair: list[str] = []
    step = max(n // N_PAIR, 1)
    for i in range(n):
        rows.append(req(f"{tag}{i}", T0 + i * 0.5, f"+3314268{i % 5000:04d}",
                        f"82.{i % 200}.{i % 7}.{i % 97 + 1}"))
        if i % step == 3 and len(pair) < N_PAIR:
            pair.append(f"{tag}p{len(pair)}")
            rows.append(req(pair[-1], T0 + i * 0.5 + 0.1, f"+447700900{124 + k}", "81.2.69.201"))
    return rows, pair


def replayer(settings: Any) -> Detector:
    """The replay path (no Kafka) over the same settings: the counts the stream must equal."""
    return Detector(ctx=build_context(settings), intel=IpIntel())


IP_COUNTS = IpCounts.__slots__
PAIR_COUNTS = (*IpCounts.__slots__, *RangeCounts.__slots__)


async def _end_offsets(settings: Any, topic: str, isolation_level: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, isolation_level=isolation_level)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        return {tp.partition: int(o) for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await stop_consumer(consumer)


def why_missing(settings: Any, missing: set[str], procs: list[WorkerProc]) -> str:
    """What the broker and the workers say about requests without a committed decision: a
    decision written but not committed (an open or aborted transaction: last stable offset below
    the high watermark), or none written (a stage did not get there: /healthz)."""
    topic = settings.topic_decisions
    stable = asyncio.run(_end_offsets(settings, topic, "read_committed"))
    high = asyncio.run(_end_offsets(settings, topic, "read_uncommitted"))
    everything = asyncio.run(_read_all(settings, topic, lambda r: False, 60.0, idle_stop=3.0,
                                       isolation_level="read_uncommitted"))
    written = {json.loads(r.value)["request_id"] for r in everything} & missing
    health = {p.name: p.health() for p in procs if p.alive()}
    return (f"; decisions partitions' last stable offset {stable} vs high watermark {high}; "
            f"{len(written)} of the missing have an uncommitted decision message; "
            f"workers' /healthz: {health}")


def check_exactly_one(settings: Any, rows: list[dict[str, Any]], pair: list[str],
                      replay: Detector, timeout: float = 180.0,
                      procs: tuple[WorkerProc, ...] | list[WorkerProc] = ()) -> dict[str, int]:
    """What the dialer sees (committed decisions, as it reads them): one decision message per
    request, and window counts equal to replay's (``replay`` has seen the earlier rounds):
    every request's per-IP counts (each IP's requests are ordered on one partition), and every
    count of the pair's requests (one IP, one number, one range). Also counts the decision
    messages of aborted transactions (a fenced zombie's, invisible to the dialer)."""
    ids = {r["request_id"] for r in rows}
    # idle_stop: longer than the stall detector takes to say so on /healthz (30 s + a probe)
    got = decisions_for(settings, ids, timeout=timeout, require_all=False, idle_stop=40.0)
    copies = sum(len(v) for v in got.values())
    decided = one_each(got)  # never two *different* decisions for one request
    missing = ids - set(decided)
    assert not missing, (f"{len(missing)} of {len(ids)} requests without a decision, e.g. "
                         f"{sorted(missing)[:5]}" + why_missing(settings, missing, list(procs)))
    dup = sorted(r for r, v in got.items() if len(v) > 1)
    assert not dup, f"{copies - len(decided)} duplicate decision messages, e.g. {dup[:5]}"
    counts = [decided[r]["counts"]["pair_24h"] for r in pair]
    assert counts == list(range(1, len(pair) + 1)), (  # each request counted once
        "pair counts differ from replay's: " + ", ".join(
            f"{r}: pair_24h {d['counts']['pair_24h']} number_24h {d['counts']['number_24h']} "
            f"ip_24h {d['counts']['ip_24h']} decided_at {d['decided_at']:.3f}"
            for r in pair for d in [decided[r]]))
    pairs = set(pair)
    wrong = []
    for row in rows:
        want = replay.process(parse_request(json.dumps(row).encode())).to_dict()["counts"]
        have = decided[row["request_id"]]["counts"]
        fields = PAIR_COUNTS if row["request_id"] in pairs else IP_COUNTS
        if any(have[f] != want[f] for f in fields):
            wrong.append((row["request_id"], {f: (have[f], want[f]) for f in fields
                                               if have[f] != want[f]}))
    assert not wrong, f"{len(wrong)} requests' counts differ from replay's (stream, replay): {wrong[:3]}"
    everything = asyncio.run(_read_all(settings, settings.topic_decisions, lambda r: False,
                                       timeout=60.0, idle_stop=2.0,
                                       isolation_level="read_uncommitted"))
    aborted = sum(1 for r in everything if json.loads(r.value)["request_id"] in ids) - copies
    return {"requests": len(ids), "decision_messages": copies, "aborted_messages": aborted}


def wait_decided(settings: Any, n: int, timeout: float = 120.0) -> None:
    """Until at least ``n`` decision messages exist (the fault then hits mid-stream)."""
    recs = asyncio.run(_read_all(settings, settings.topic_decisions, lambda r: len(r) >= n,
                                 timeout, linger=0))
    assert len(recs) >= n, f"only {len(recs)} decisions after {timeout}s"


def health_status(w: WorkerProc) -> tuple[int, dict[str, Any] | None]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{w.port}/healthz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError:
        return 0, None


def log_lines(w: WorkerProc) -> int:
    return len(w.log_path.read_bytes().splitlines()) if w.log_path.is_file() else 0


# --------------------------------------------------------------------------- worker faults


def test_sigkill_of_the_only_worker(kafka_bootstrap: str, fresh_topic_prefix: str,
                                    tmp_path: Path) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 2, tmp_path)
    settings = load_settings(env=env)
    replay = replayer(settings)
    with workers(env, tmp_path, n=1, partitions=2) as (w,):
        for k in range(ROUNDS):
            rows, pair = traffic(f"k{k}-", k=k)
            produce_by_ip(settings, rows)
            wait_decided(settings, (k + 0.3) * len(rows))
            w.kill()
            w.start()
            stats = check_exactly_one(settings, rows, pair, replay, procs=[w])
    sys.stderr.write(f"sigkill: {stats}\n")


def test_sigterm_under_load_drains_and_stops_within_10_s(
        kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path) -> None:
    """SIGTERM while the worker has a backlog: it stops within 10 s (SHUTDOWN_DEADLINE_S is 9 s:
    exit 0 if the graceful stop finished, 1 if the deadline cut it short), and its successor
    decides the rest: still one decision per request."""
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 2, tmp_path)
    settings = load_settings(env=env)
    replay = replayer(settings)
    stops: list[tuple[float, int | None]] = []
    with workers(env, tmp_path, n=1, partitions=2) as (w,):
        for k in range(ROUNDS):
            rows, pair = traffic(f"t{k}-", k=k)
            produce_by_ip(settings, rows)
            wait_decided(settings, (k + 0.3) * len(rows))
            assert w.proc is not None
            t0 = time.monotonic()
            w.proc.send_signal(signal.SIGTERM)
            try:
                w.proc.wait(timeout=30)
            finally:
                stops.append((time.monotonic() - t0, w.proc.returncode))
            w.start()
            stats = check_exactly_one(settings, rows, pair, replay, procs=[w])
    sys.stderr.write(f"sigterm under load: stops (s, exit code) {stops}, {stats}\n")
    assert all(t < 10 and code in (0, 1) for t, code in stops), stops


def test_sigkill_of_one_of_two_workers_during_a_rebalance(
        kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 4, tmp_path)
    settings = load_settings(env=env)
    replay = replayer(settings)
    with workers(env, tmp_path, n=1, partitions=4) as (w0,):
        w1 = WorkerProc(env, tmp_path, "w1")
        try:
            for k in range(ROUNDS):
                rows, pair = traffic(f"r{k}-", k=k)
                produce_by_ip(settings, rows)
                wait_decided(settings, (k + 0.2) * len(rows))
                w1.start()  # a second worker joins: the group rebalances ...
                deadline = time.monotonic() + 60
                while "Joined group" not in w1.log_path.read_text(errors="replace"):
                    assert time.monotonic() < deadline, w1.log_tail()
                    time.sleep(0.05)
                w1.kill()  # ... and dies in the middle of it
                stats = check_exactly_one(settings, rows, pair, replay, procs=[w0, w1])
        finally:
            w1.kill()
    sys.stderr.write(f"sigkill during rebalance: {stats}\n")


def test_worker_paused_past_the_session_timeout_then_resumed(
        kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 4, tmp_path)
    settings = load_settings(env=env)
    replay = replayer(settings)
    with workers(env, tmp_path, n=2, partitions=4) as (w0, w1):
        for k in range(ROUNDS):
            rows, pair = traffic(f"s{k}-", k=k)
            produce_by_ip(settings, rows)
            wait_decided(settings, (k + 0.3) * len(rows))
            assert w0.proc is not None
            w0.proc.send_signal(signal.SIGSTOP)
            time.sleep(14)  # session timeout 10 s: w1 takes over w0's partitions
            w0.proc.send_signal(signal.SIGCONT)
            try:  # frozen past the session timeout: it exits rather than send stale decisions
                exit_code = w0.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                exit_code = None
            assert exit_code in (None, 75), w0.log_tail()
            if exit_code is not None:
                w0.start()  # what the supervisor does (compose: restart unless-stopped)
            # What the frozen worker queued before the freeze is fenced (its transactions are
            # aborted by its successor) or never sent (it exits before its sender runs).
            stats = check_exactly_one(settings, rows, pair, replay, procs=[w0, w1])
            wait_owned([w0, w1], 4, 90)  # both back in the group
    sys.stderr.write(f"sigstop: {stats}, paused worker exit code {exit_code}\n")


def test_a_fenced_zombie_commits_no_decision(kafka_bootstrap: str, fresh_topic_prefix: str,
                                            tmp_path: Path) -> None:
    """The mechanism under the SIGSTOP test, without timing: a worker's decision producer for a
    partition has a transaction open (as when it froze); the partition's next owner starts its
    own producer for it; whatever the first one sent is aborted, and its commit fails."""
    from aiokafka.errors import ProducerFenced
    from kafka_broker import create_topics

    from detector.stream.delivery import FencedDecisions

    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 2, tmp_path)
    settings = load_settings(env=env)
    create_topics(kafka_bootstrap, {settings.topic_decisions: 2})

    async def scenario() -> tuple[type[BaseException] | None, list[Any], list[Any]]:
        zombie = FencedDecisions(settings, settings.topic_decisions)
        successor = FencedDecisions(settings, settings.topic_decisions)
        await zombie.assign({0})
        producer = zombie.producers[0]
        await producer.begin_transaction()
        sent = await producer.send(settings.topic_decisions, b"{}", key=b"zombie-1")
        await sent  # on the log, in an open transaction
        await producer.send(settings.topic_decisions, b"{}", key=b"zombie-2")  # queued
        await successor.assign({0})  # fences the zombie: its transaction is aborted
        await successor.send({0: [(b"successor-1", b"{}")]})
        error: type[BaseException] | None = None
        try:
            await producer.commit_transaction()
        except BaseException as exc:  # noqa: BLE001 - what the zombie gets is the point
            error = type(exc)
        committed = await _read_all(settings, settings.topic_decisions, lambda r: False, 20.0,
                                    idle_stop=2.0)
        everything = await _read_all(settings, settings.topic_decisions, lambda r: False, 20.0,
                                     idle_stop=2.0, isolation_level="read_uncommitted")
        await successor.stop()
        await zombie.stop()
        return error, committed, everything

    error, committed, everything = asyncio.run(scenario())
    assert error is ProducerFenced
    assert [r.key for r in committed] == [b"successor-1"]
    assert b"zombie-1" in {r.key for r in everything}  # written, then aborted: never seen


# --------------------------------------------------------------------------- the stall's cause


def test_aiokafka_forgets_untracked_topics_and_tracking_them_prevents_the_stall(
        kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    """The range-stage stall of issue 13, reduced: a producer that fetched all topics' metadata
    sends to a known topic x, then to a topic y created after its last refresh. The send to y
    makes the client track y only and forget x, so x's queued batch waits for a leader until
    the request timeout. faust_internals.track_client_topics (every output topic tracked before
    the first send) prevents it."""
    from aiokafka import AIOKafkaProducer
    from kafka_broker import create_topics

    from detector.stream.faust_internals import track_client_topics

    async def x_delivered_within_5s(track: bool) -> bool:
        x, y = f"{fresh_topic_prefix}-x{int(track)}", f"{fresh_topic_prefix}-y{int(track)}"
        create_topics(kafka_bootstrap, {x: 1})
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=500,
                                    request_timeout_ms=60000)
        await producer.start()
        try:
            await producer.client.force_metadata_update()  # all topics, as after Faust's create_topic
            await asyncio.to_thread(create_topics, kafka_bootstrap, {y: 1})
            await asyncio.sleep(1.0)
            if track:
                await track_client_topics(producer.client, [x, y])
            fx = await producer.send(x, b"x", partition=0)  # lingers 500 ms in the accumulator
            await producer.send(y, b"y", partition=0)
            await asyncio.wait([fx], timeout=5)
            delivered = fx.done() and fx.exception() is None
            await producer.send(x, b"x again", partition=0)  # re-tracks x: the batch goes out
            await asyncio.wait_for(fx, 30)
            return delivered
        finally:
            await producer.stop()

    assert not asyncio.run(x_delivered_within_5s(track=False)), (
        "aiokafka no longer forgets untracked topics: track_producer_topics may be unnecessary")
    assert asyncio.run(x_delivered_within_5s(track=True))


# --------------------------------------------------------------------------- broker faults


class OwnBroker:
    """A broker of this test alone (it is stopped and restarted on the same ports and data)."""

    def __init__(self, path: Path) -> None:
        self.dir = path
        self.bootstrap = ""

    def _sh(self, *args: str, timeout: float = 180) -> str:
        env = {**os.environ, "KAFKA_PYTHON": sys.executable}
        proc = subprocess.run(["bash", str(KAFKA_SH), *args], capture_output=True, text=True,  # noqa: S603,S607
                              timeout=timeout, env=env, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    def start(self) -> str:
        out = self._sh("start", "--dir", str(self.dir), "--timeout", "120", "--keep-data",
                       "--owner-pid", str(os.getpid()))
        self.bootstrap = out.strip().splitlines()[-1].split("=", 1)[1]
        return self.bootstrap

    def stop(self) -> None:
        self._sh("stop", "--dir", str(self.dir))

    def kill(self) -> None:
        pid = int((self.dir / "broker.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._sh("stop", "--dir", str(self.dir))  # clears the pid file and the watchdog


@pytest.mark.parametrize("how", ["clean", "sigkill"])
def test_broker_outage_is_visible_bounded_and_recovered(
        how: str, fresh_topic_prefix: str, tmp_path: Path) -> None:
    broker = OwnBroker(tmp_path / "kafka")
    bootstrap = broker.start()
    try:
        env = detector_env(bootstrap, fresh_topic_prefix, 2, tmp_path)
        settings = load_settings(env=env)
        replay = replayer(settings)
        rows, pair = traffic(f"b{how}-")
        with workers(env, tmp_path, n=1, partitions=2) as (w,):
            produce_by_ip(settings, rows)
            wait_decided(settings, len(rows) // 4)
            lines0, t0 = log_lines(w), time.monotonic()
            broker.stop() if how == "clean" else broker.kill()
            unhealthy: dict[str, Any] | None = None
            while time.monotonic() - t0 < 60 and unhealthy is None:
                code, body = health_status(w)
                if code == 503 and body and any("kafka broker unreachable" in p
                                                for p in body["problems"]):
                    unhealthy = body
                time.sleep(0.5)
            assert unhealthy is not None, "healthz never said the broker was unreachable"
            seen_after = time.monotonic() - t0
            time.sleep(max(0.0, 20 - (time.monotonic() - t0)))  # a 20 s outage at least
            outage_s = time.monotonic() - t0
            outage_lines = log_lines(w) - lines0
            assert w.alive(), w.log_tail()
            broker.start()
            deadline = time.monotonic() + 90
            while health_status(w)[0] != 200:
                assert time.monotonic() < deadline, f"not healthy again: {health_status(w)}"
                time.sleep(0.5)
            recovered_s = time.monotonic() - t0
            stats = check_exactly_one(settings, rows, pair, replay, procs=[w])
            assert w.proc is not None
            t_stop = time.monotonic()
            w.proc.send_signal(signal.SIGTERM)
            w.proc.wait(timeout=30)
            stop_s = time.monotonic() - t_stop
        per_s = outage_lines / outage_s
        sys.stderr.write(
            f"broker {how}: unhealthy after {seen_after:.1f} s, {outage_lines} log lines in "
            f"{outage_s:.0f} s of outage ({per_s:.1f}/s), healthy again {recovered_s:.0f} s after "
            f"the fault, SIGTERM stop {stop_s:.1f} s (exit {w.proc.returncode}), {stats}\n")
        assert per_s < 5, f"{outage_lines} log lines in {outage_s:.0f} s of outage"
        assert stop_s < 10, f"SIGTERM took {stop_s:.1f} s"
    finally:
        broker.stop()

"""Agent capacity and the web tier's pre-check, end to end on a real broker.

* A simulated dialer publishes signed queue states every second; two workers (two partitions)
  deflect requests with ``agent_capacity`` while the queue is over capacity (authenticated
  customers only at the top tier), serve them again after it drains, refuse an unsigned state,
  and fail open when the dialer goes silent.
* ``GET /v1/precheck`` on two workers (four partitions): the same answer whichever worker is
  asked, for an IP of every partition (the non-owner forwards to the owner).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import murmur2
from test_pipeline import WorkerProc, decisions_for, detector_env, one_each, produce_by_ip, req, workers

from detector.config import Settings, load_settings
from detector.core.capacity import QueueState, QueueStateSigner
from detector.keys import generate, load_private
from detector.stream import io
from detector.stream.capacity import apublish_queue_state

pytestmark = pytest.mark.integration

TOKEN = "precheck-" + "0123456789abcdef" * 3
STALE_S = 8  # the test policy's [capacity] stale_after_s


def dialer_keys(tmp: Path) -> tuple[dict[str, str], QueueStateSigner]:
    d = tmp / "keys"
    if not (d / "dialer.key").exists():
        generate(d, "dialer")
    env = {"DETECTOR_DIALER_PUBLIC_KEYS": str(d / "dialer.pub"),
           "DETECTOR_DIALER_PRIVATE_KEY": str(d / "dialer.key")}
    return env, QueueStateSigner(load_private(d / "dialer.key", "test"))


def metric(w: WorkerProc, name: str) -> float | None:
    for line in (w.get("/metrics") or "").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


def wait_for(what: str, cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Dialer:
    """The simulated dialer: publishes its (signed) queue state every second until stopped."""

    def __init__(self, settings: Settings, signer: QueueStateSigner, agents: int = 5,
                 handle_s: float = 240.0) -> None:
        self.settings, self.signer = settings, signer
        self.agents, self.handle_s, self.waiting = agents, handle_s, 0
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Dialer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        async def loop() -> None:
            while not self._stop.is_set():
                state = QueueState("sim-dialer", time.time(), self.waiting, self.agents, self.handle_s)
                await apublish_queue_state(self.settings, state, self.signer)
                self.published += 1
                await asyncio.sleep(1.0)

        asyncio.run(loop())


SERIAL = itertools.count()


def fresh_requests(tag: str, n: int, **extra: Any) -> list[dict[str, Any]]:
    """Requests from new IPs (low trust), each to a number of its own range, dated now."""
    now = time.time()
    out = []
    for i in range(n):
        k = next(SERIAL)
        out.append(req(f"{tag}{i}", now, f"+4420{3000 + k // 10:04d}{k % 10}123",
                       f"86.{30 + k // 250}.{k % 250 + 1}.7", **extra))
    return out


def decide(settings: Settings, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    produce_by_ip(settings, rows)
    ids = {r["request_id"] for r in rows}
    got = one_each(decisions_for(settings, ids, linger=0.5))  # every decision on the topic
    return {rid: d for rid, d in got.items() if rid in ids}


def test_a_simulated_dialer_raises_and_lowers_the_bar_on_both_workers(
        kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path) -> None:
    keys, signer = dialer_keys(tmp_path)
    policy = tmp_path / "policy.toml"
    # Quick staleness; and no population surge from the test's own few dozen requests.
    policy.write_text(f"[capacity]\nstale_after_s = {STALE_S}\n\n[population]\n"
                      "country_min_baseline_10m = 1000\nglobal_min_baseline_10m = 1000\n")
    env = {**detector_env(kafka_bootstrap, fresh_topic_prefix, 2, tmp_path), **keys,
           "DETECTOR_POLICY": str(policy)}
    settings = load_settings(env=env)
    with workers(env, tmp_path, n=2, partitions=2) as procs, Dialer(settings, signer) as dialer:
        def tier_is(t: int) -> bool:
            return all(metric(w, "detector_capacity_tier") == t for w in procs)

        wait_for("the first queue state", lambda: all(
            metric(w, "detector_queue_states_total") or 0 for w in procs) and tier_is(0))
        normal = decide(settings, fresh_requests("a", 8))
        assert {d["action"] for d in normal.values()} == {"allow"}

        dialer.waiting = 12  # 12 / (5 agents x 300 s / 240 s) = 1.92: tier 2
        wait_for("tier 2 on both workers", lambda: tier_is(2))
        over = decide(settings, fresh_requests("b", 8) + fresh_requests("bb", 4, authenticated=True))
        for rid, d in over.items():
            if rid.startswith("bb"):  # authenticated customers keep their callback at tier 2
                assert d["action"] == "allow", d
            else:
                assert (d["action"], d["silent"], d["reasons"]) == ("deflect", False, ["agent_capacity"])
        per_worker = [metric(w, 'detector_capacity_deflections_total{mode="enforce"}') for w in procs]
        assert all(n and n > 0 for n in per_worker), per_worker  # both workers deflected some

        # An unsigned state (a forged empty queue) is refused and changes nothing.
        forged = QueueState("sim-dialer", time.time() + 0.5, 0, 50, 60.0)
        asyncio.run(apublish_queue_state(settings, forged, None))
        wait_for("the refusal on both workers", lambda: all(
            metric(w, 'detector_queue_state_rejected_total{reason="unsigned"}') == 1 for w in procs))
        assert tier_is(2)

        dialer.waiting = 30  # pressure 4.8: tier 3, customers too
        wait_for("tier 3", lambda: tier_is(3))
        top = decide(settings, fresh_requests("c", 3, authenticated=True))
        assert all(d["reasons"] == ["agent_capacity"] for d in top.values()), top

        dialer.waiting = 1  # drained: hysteresis steps down to normal
        wait_for("the queue to drain", lambda: tier_is(0))
        drained = decide(settings, fresh_requests("d", 8))
        assert {d["action"] for d in drained.values()} == {"allow"}
        deflections = sum(metric(w, 'detector_capacity_deflections_total{mode="enforce"}') or 0
                          for w in procs)
        assert deflections == 8 + 3

        # The dialer goes silent while over capacity: stale after STALE_S, decisions fail open.
        dialer.waiting = 30
        wait_for("tier 3 again", lambda: tier_is(3))
        dialer.stop()
        wait_for("stale state", lambda: all(metric(w, "detector_capacity_state_stale") == 1
                                            for w in procs), timeout=STALE_S + 20)
        assert tier_is(0)
        silent = decide(settings, fresh_requests("e", 4))
        assert {d["action"] for d in silent.values()} == {"allow"}


# --------------------------------------------------------------------------- pre-check


def ip_per_partition(partitions: int, base: str) -> list[str]:
    found: dict[int, str] = {}
    for i in range(1, 250):
        ip = f"{base}.{i}.9"
        found.setdefault((murmur2(ip.encode()) & 0x7FFFFFFF) % partitions, ip)
        if len(found) == partitions:
            return [found[p] for p in range(partitions)]
    raise AssertionError("no IP for some partition")


def ask(w: WorkerProc, query: str, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{w.port}/v1/precheck?{query}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"{}")


def test_precheck_gives_the_same_answer_whichever_worker_is_asked(
        kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path) -> None:
    env = {**detector_env(kafka_bootstrap, fresh_topic_prefix, 4, tmp_path),
           "DETECTOR_PRECHECK_TOKEN": TOKEN}
    settings = load_settings(env=env)
    hot = ip_per_partition(4, "86.40")  # 11 requests in a minute: the next is velocity_ip
    warm = ip_per_partition(4, "86.41")  # one request: known, quiet
    cold = ip_per_partition(4, "86.42")  # never seen
    now = time.time() - 30
    rows = [req(f"h{k}-{i}", now + i, "+442079460123", ip) for k, ip in enumerate(hot)
            for i in range(11)]
    rows += [req(f"w{k}", now, f"+4420794601{k:02d}", ip) for k, ip in enumerate(warm)]
    with workers(env, tmp_path, n=2, partitions=4) as procs:
        owned = [set(p.health()["partitions"]["by_ip"]) for p in procs]  # type: ignore[index]
        assert owned[0] and owned[1] and not owned[0] & owned[1]
        produce_by_ip(settings, rows)
        decisions_for(settings, {r["request_id"] for r in rows}, linger=0.5)
        io.lists_add(settings, "deny", "ip", cold[3], reason="soc ticket 7")
        wait_for("the deny entry", lambda: all(metric(w, 'detector_list_entries{action="deny",kind="ip"}')
                                               == 1 for w in procs))
        answers: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for ip in hot + warm + cold:
            answers[ip] = [ask(w, f"ip={ip}") for w in procs]
            assert answers[ip][0] == answers[ip][1], (ip, answers[ip])
        for ip in hot:
            status, body = answers[ip][0]
            assert status == 200 and not body["show_callback"] and body["reasons"][0] == "velocity_ip"
            assert ask(procs[0], f"ip={ip}&authenticated=1") == (200, {"show_callback": True,
                                                                       "reasons": ["velocity_ip"]})
        for ip in warm + cold[:3]:
            assert answers[ip][0] == (200, {"show_callback": True, "reasons": []}), ip
        assert answers[cold[3]][0] == (200, {"show_callback": False, "reasons": ["denylist_ip"]})
        forwarded = [metric(w, 'detector_precheck_requests_total{result="forwarded"}') or 0 for w in procs]
        assert all(f >= 6 for f in forwarded), forwarded  # each asked about the other's 6 IPs
        # the token is required, on the forwarding worker and on the owner
        assert ask(procs[0], f"ip={hot[0]}", token=None)[0] == 401
        assert ask(procs[1], f"ip={hot[0]}", token="x" * 40)[0] == 401
        assert ask(procs[0], "ip=not-an-ip")[0] == 400
        logs = "".join(p.log_path.read_text(errors="replace") for p in procs)
    for ip in hot + warm + cold:
        assert ip not in logs  # never logged, forwarded or not

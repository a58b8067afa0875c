"""A running worker picks up a changed policy file (the app's policy_reload timer) and every
decision names the policy it was made under; an invalid file is rejected and the old policy
keeps deciding. Monitored hits reach the decision and the metric."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import pytest

from detector import metrics
from detector.config import load_settings
from detector.core.ipintel import IpIntel
from detector.runtime import build_context
from detector.stream.app import StreamRuntime, make_app
from tests.stream.test_agents import PARTITIONS, T0, Harness, Sent, request, running

pytestmark = pytest.mark.asyncio


def _harness(policy_path) -> Harness:
    settings = load_settings(env={}, app_id=f"t-{uuid.uuid4().hex[:8]}", partitions=PARTITIONS,
                             policy=policy_path, max_past_skew_s=0.0)  # T0 is days ago
    rt = StreamRuntime(settings, build_context(settings), IpIntel(), None)
    app = make_app(settings, rt=rt, web=False, prometheus=False)
    app.conf.store = "memory://"
    h = Harness(rt, app)

    async def publish(channel: Any, key: bytes | None, value: bytes | None, partition: int | None = None) -> Any:
        h.sent[channel.get_topic_name()].append(Sent(key, value, partition))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    rt.publish = publish
    rt.lists_ready.set()
    rt.generation = app.consumer_generation_id
    rt.gate_offsets = False
    return h


def _write(path, text: str) -> None:
    path.write_text(text)
    t = time.time() + 5 + path.stat().st_mtime_ns % 97
    os.utime(path, (t, t))


async def test_policy_reload_without_restart(tmp_path, caplog) -> None:
    path = tmp_path / "policy.toml"
    _write(path, 'version = "p1"\n')
    h = _harness(path)
    async with running(h) as h:
        d1 = await h.decide(request("r1", T0, ip="185.220.101.5"))
        assert d1["policy_version"] == "p1" and d1["monitored_reasons"] == []
        _write(path, 'version = "p2"\n[rules]\nunauthenticated = { action = "deflect", weight = 0.2, '
                     'mode = "monitor" }\n')
        h.app.policy_watcher.check()  # what the app's policy_reload timer runs
        before = metrics.REGISTRY.get_sample_value("detector_monitored_hits_total",
                                                   {"reason": "unauthenticated"}) or 0
        d2 = await h.decide(request("r2", T0 + 1, phone="+442079460019"))
        assert d2["policy_version"] == "p2"
        assert d2["monitored_reasons"] == ["unauthenticated"] and d2["action"] == "allow"
        assert metrics.REGISTRY.get_sample_value("detector_monitored_hits_total",
                                                 {"reason": "unauthenticated"}) == before + 1
        _write(path, 'version = "p3"\n[risk]\ndeflect_at = 2\n')
        with caplog.at_level("ERROR"):
            h.app.policy_watcher.check()
        assert "risk.deflect_at: expected a number in [0.0, 1.0], got 2" in caplog.text
        d3 = await h.decide(request("r3", T0 + 2, phone="+442079460020"))
        assert d3["policy_version"] == "p2"

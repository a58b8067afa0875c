"""A running worker picks up a changed policy file (the app's policy_reload timer) and every
decision names the policy it was made under; an invalid file is rejected and the old policy
keeps deciding. Monitored hits reach the decision and the metric."""

from __future__ import annotations

import os
import time

import pytest

from detector import metrics
from tests.stream.test_agents import T0, Harness, make_harness, request, running

pytestmark = pytest.mark.asyncio


def _harness(policy_path) -> Harness:
    return make_harness(policy=policy_path)


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

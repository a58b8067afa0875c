"""``features.local_hour`` reads each zone's local hour once per UTC minute: it must equal the
direct computation everywhere, across DST changes, odd offsets and minute edges."""

import random
from datetime import UTC, datetime

import pytest

from detector.core import features as F
from detector.core.records import Enrichment, IpInfo, PhoneInfo

ZONES = ["Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe",
         "Asia/Kathmandu", "Africa/Monrovia", "Pacific/Chatham", "No/Such_Zone", ""]
# DST changes of 2026 (EU, US, Lord Howe), 1970-72 (Monrovia's -0:44:30), the parse limits
STARTS = [1774746000.0, 1772953200.0, 1792890000.0, 1775404800.0, 0.0, 63072000.0,
          946684800.0, 4102444799.5]


def _direct(ts: float, name: str) -> float | None:
    zone = F._zone(name)
    if zone is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=UTC).astimezone(zone)
    return dt.hour + dt.minute / 60.0


@pytest.mark.parametrize("name", ZONES)
def test_local_hour_memo_equals_direct(name):
    rnd = random.Random(name)
    phone = PhoneInfo("+1", True, True, True, "GB", 44, "MOBILE", "+1", time_zone=name)
    enr = Enrichment(phone, IpInfo("192.0.2.1", 4, "global"))
    for start in STARTS:
        for _ in range(400):
            ts = start + rnd.uniform(-4 * 3600, 4 * 3600)
            if rnd.random() < 0.3:  # at the edges of a minute (datetime rounds to microseconds)
                ts = ts // 60 * 60 + rnd.choice([0.0, 59.9999996, 59.995, 59.99, 59.989999])
            assert F.local_hour(ts, enr) == _direct(ts, name), ts

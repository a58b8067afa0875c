"""Per-key state of the two processing stages, over any ``MutableMapping`` (dict or a stream table).

The stream is processed in two stages so that every table is fed by a stream keyed by its key:

* **IP stage** (partitioned by IP): table ``ip`` -> :class:`IpState` (requests, distinct numbers,
  distinct number countries, distinct number ranges).
* **Range stage** (partitioned by the number's range key, which also co-partitions the number and
  every IP x number pair on it): ``number`` -> :class:`NumberState` (requests, distinct IPs, the
  outstanding callback, answering-machine outcomes, the last learned deny), ``pair`` ->
  :class:`~detector.core.windows.Window` (requests of one IP for one number), ``range`` ->
  :class:`RangeState` (requests, distinct IPs, distinct numbers).

Each update reads a value, changes it and writes it back with ``store[key] = value`` (the stream's
table view records that write for the changelog). The replay path calls both stages in turn on
plain dicts. Values are small slotted objects with named fields; :func:`pack` / :func:`unpack`
give their compact binary form (what a stream table keeps in memory and on its changelog: about
20 bytes per counted key and 16 per distinct member, instead of a Python dict of lists each).
"""

from __future__ import annotations

import struct
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detector.core import windows as w
from detector.core.pii import hash_id, hash_int
from detector.core.records import CallbackRequest, Enrichment, IpCounts, PhoneInfo, RangeCounts
from detector.core.windows import Distinct, Window, count_add_read, count_first, distinct_add_read

if TYPE_CHECKING:
    from detector.core.policy import SharedIpPolicy

Store = MutableMapping[str, Any]


# A distinct-set member of an identifier is its one keyed hash (detector.core.pii.hash_id) as an
# integer (the same 64 bits), and the decision's ip_hash is that hash: the same functions
# (memoized), without a wrapper call.
short_hash = hash_id
pii_hash = hash_id
member = hash_int  # a distinct-set member: the keyed hash's 64 bits as an integer


def number_key(enr: Enrichment, raw: str) -> str:
    """Key of the per-number tables: E.164, or ``?<digits>`` for unparseable input."""
    return phone_key(enr.phone, raw)


def phone_key(phone: PhoneInfo, raw: str) -> str:
    """:func:`number_key` from the phone enrichment alone."""
    if phone.e164:
        return phone.e164
    return "?" + "".join(ch for ch in raw if ch.isdigit())


def pair_key(ip: str, num_key: str) -> str:
    return f"{ip}|{num_key}"


# --------------------------------------------------------------------------- values


@dataclass(slots=True)
class IpState:
    """Table ``ip``: one requesting address."""

    requests: Window = field(default_factory=Window)
    numbers: Distinct = field(default_factory=dict)  # keyed hashes of the numbers asked for
    countries: Distinct = field(default_factory=dict)  # the numbers' regions (w.code_int)
    ranges: Distinct = field(default_factory=dict)  # keyed hashes of the numbers' ranges


@dataclass(slots=True)
class Pending:
    """An outstanding callback: an allowed request the dialer has not reported on yet."""

    until: float  # event time it stops counting as outstanding
    request_id: str


@dataclass(slots=True)
class NumberState:
    """Table ``number``: one dialled number (E.164)."""

    requests: Window = field(default_factory=Window)
    ips: Distinct = field(default_factory=dict)  # keyed hashes of the requesting IPs
    pending: Pending | None = None
    machine_answers: Window | None = None  # dialer outcomes "machine"
    learned_deny_at: float | None = None  # event time of the last learned deny entry


@dataclass(slots=True)
class RangeState:
    """Table ``range``: one number range (E.164 minus its last digits)."""

    requests: Window = field(default_factory=Window)
    ips: Distinct = field(default_factory=dict)
    numbers: Distinct = field(default_factory=dict)


@dataclass(slots=True)
class IpStores:
    ip: Store = field(default_factory=dict)


@dataclass(slots=True)
class RangeStores:
    number: Store = field(default_factory=dict)
    pair: Store = field(default_factory=dict)
    range: Store = field(default_factory=dict)


# --------------------------------------------------------------------------- stages


def ip_stage(
    stores: IpStores, req: CallbackRequest, enr: Enrichment, shared: SharedIpPolicy | None = None,
    *, key: bytes,
) -> IpCounts:
    """Count ``req`` in the IP tables and return the IP-side counts (including ``req``).
    ``key``: the PII hash key (distinct-set members are keyed hashes); ``shared``: the policy's
    shared-IP section (None: never shared)."""
    ts = req.ts
    value = stores.ip.get(req.ip)
    phone = enr.phone
    number = member(phone.e164 or phone_key(phone, req.phone_number), key)
    if value is None:  # a new address: its first request, each set its one member (if any)
        value = IpState(count_first(ts), {number: ts},
                        {w.code_int(phone.region): ts} if phone.region else {},
                        {member(phone.range_key, key): ts} if phone.range_key else {})
        stores.ip[req.ip] = value
        c15 = c1h = c24 = n1h = n24 = 1
        k24, r24 = len(value.countries), len(value.ranges)
    else:
        _, c15, c1h, c24 = count_add_read(value.requests, ts)
        _, n1h, n24 = distinct_add_read(value.numbers, number, ts)
        if phone.region:
            _, _, k24 = distinct_add_read(value.countries, w.code_int(phone.region), ts)
        else:
            _, k24 = w.distinct_read(value.countries, ts)
        if phone.range_key:
            _, _, r24 = distinct_add_read(value.ranges, member(phone.range_key, key), ts)
        else:
            _, r24 = w.distinct_read(value.ranges, ts)
        stores.ip[req.ip] = value
    is_shared = shared is not None and shared_ip(enr, c15, c1h, n24, k24, shared, r24)
    return IpCounts(c15, c1h, c24, n1h, n24, k24, 1 if c24 == 1 else 0, 1 if is_shared else 0)


def shared_ip(
    enr: Enrichment, c15: int, c1h: int, n24: int, k24: int, pol: SharedIpPolicy, r24: int | None = None
) -> bool:
    """Whether the requester looks like a shared address (carrier-grade or office NAT): a
    population of customers, not one actor. Evidence: several distinct numbers in a day (or a
    cellular connection per the connection-type data) spread over number ranges (``min_spread``
    distinct ranges per distinct number: people's numbers are all over the plan; an office's DDIs
    share one range, so this is not 1), at most ``max_countries_24h`` destination countries, no
    burst (``max_15m``, ``max_1h``), and not an anonymiser or a datacentre (those share addresses
    too, but with anyone). Counts include the current request.

    >>> from detector.core.policy import load_policy
    >>> from detector.core.records import Enrichment, IpInfo, PhoneInfo
    >>> enr = Enrichment(PhoneInfo("+447700900123", True, True, True, "GB", 44, "MOBILE", None),
    ...                  IpInfo("92.16.0.1", 4, "global", "GB"))
    >>> pol = load_policy().shared_ip
    >>> shared_ip(enr, 2, 6, 12, 1, pol), shared_ip(enr, 40, 60, 12, 1, pol)
    (True, False)
    """
    ip = enr.ip
    if ip.hosting or ip.tor_exit or ip.public_proxy or ip.residential_proxy or ip.anonymous_vpn:
        return False
    if ip.scope != "global" or k24 > pol.max_countries_24h:
        return False
    if c15 > pol.max_15m or c1h > pol.max_1h:
        return False
    if r24 is not None and r24 < pol.min_spread * n24:
        return False
    return n24 >= pol.min_numbers_24h or ip.cellular


@dataclass(slots=True)
class RangeUpdate:
    """Range-stage counts plus the per-number value still to be written by :func:`range_commit`."""

    counts: RangeCounts
    number_key: str
    number_value: NumberState
    pair_key: str = ""  # the key counted in ``pair`` (see :class:`ExpiryIndex`)


def range_stage(
    stores: RangeStores, req: CallbackRequest, enr: Enrichment, range_key: str, *, key: bytes
) -> RangeUpdate:
    """Count ``req`` per number, pair and range; the number's value is written by :func:`range_commit`."""
    ts = req.ts
    ip = req.ip
    nkey = number_key(enr, req.phone_number)
    ip_member = member(ip, key)

    num = stores.number.get(nkey)
    if num is None:  # a new number: its first request (no outstanding callback)
        num = NumberState(count_first(ts), {ip_member: ts})
        n15 = n1h = n24 = ni1h = ni24 = 1
        pending = False
    else:
        _, n15, n1h, n24 = count_add_read(num.requests, ts)
        _, ni1h, ni24 = distinct_add_read(num.ips, ip_member, ts)
        pending = is_pending(num.pending, ts, req.request_id)

    pkey = pair_key(ip, nkey)
    pairs = stores.pair
    pair, _, p1h, p24 = count_add_read(pairs.get(pkey), ts)
    pairs[pkey] = pair

    rng = stores.range.get(range_key)
    if rng is None:  # a new range: its first request
        rng = RangeState(count_first(ts), {ip_member: ts}, {member(nkey, key): ts})
        r1h = r24 = ri24 = rn24 = 1
    else:
        _, _, r1h, r24 = count_add_read(rng.requests, ts)
        _, _, ri24 = distinct_add_read(rng.ips, ip_member, ts)
        _, _, rn24 = distinct_add_read(rng.numbers, member(nkey, key), ts)
    stores.range[range_key] = rng

    counts = RangeCounts(n15, n1h, n24, p1h, p24, r1h, r24, ni1h, ni24, ri24, rn24, pending)
    return RangeUpdate(counts, nkey, num, pkey)


def is_pending(mark: Pending | None, ts: float, request_id: str) -> bool:
    """Whether a number's outstanding-callback mark (its value's ``pending``) holds at ``ts`` for
    another request than ``request_id``."""
    return mark is not None and mark.until > ts and mark.request_id != request_id


def range_commit(
    stores: RangeStores,
    update: RangeUpdate,
    req: CallbackRequest,
    *,
    allowed: bool,
    pending_ttl: float,
) -> None:
    """Write the number's value; an allowed request marks a callback outstanding for ``pending_ttl``."""
    if allowed:
        update.number_value.pending = Pending(req.ts + pending_ttl, req.request_id)
    stores.number[update.number_key] = update.number_value


def clear_pending(stores: RangeStores, nkey: str, request_id: str | None) -> bool:
    """The dialer finished a callback: clear the outstanding mark (if it is that request's)."""
    value = stores.number.get(nkey)
    if value is None or value.pending is None:
        return False
    if request_id is not None and value.pending.request_id not in ("", request_id):
        return False
    value.pending = None
    stores.number[nkey] = value
    return True


def record_machine(stores: RangeStores, nkey: str, ts: float) -> int:
    """Count an answering-machine outcome for a number; returns machine answers in the last 24 h."""
    value = stores.number.get(nkey)
    if value is None:
        value = NumberState()
    value.machine_answers = w.count_add(value.machine_answers, ts)
    stores.number[nkey] = value
    return w.count_read(value.machine_answers, ts)[2]


LEARNED_MARK_KEEP_S = 86400.0  # a number's last learned deny is remembered this long


def learned_deny_due(stores: RangeStores, nkey: str, ts: float, interval_s: float) -> bool:
    """Whether a learned deny for ``nkey`` at ``ts`` may be issued (none within ``interval_s``);
    if so, remember ``ts`` in the number's value (``learned_deny_at``)."""
    value = stores.number.get(nkey)
    if value is None:
        value = NumberState()
    last = value.learned_deny_at
    if last is not None and abs(ts - last) < interval_s:
        return False
    value.learned_deny_at = ts
    stores.number[nkey] = value
    return True


# --------------------------------------------------------------------------- expiry


def expires_at(value: Any) -> float:
    """The event time from which ``value`` (any table's) can no longer count: safe to delete."""
    if isinstance(value, Window):
        return w.count_expires_at(value)
    if isinstance(value, IpState):
        return max(w.count_expires_at(value.requests), w.distinct_expires_at(value.numbers),
                   w.distinct_expires_at(value.countries), w.distinct_expires_at(value.ranges))
    if isinstance(value, NumberState):
        return max(w.count_expires_at(value.requests), w.distinct_expires_at(value.ips),
                   value.pending.until if value.pending is not None else float("-inf"),
                   w.count_expires_at(value.machine_answers),
                   value.learned_deny_at + LEARNED_MARK_KEEP_S
                   if value.learned_deny_at is not None else float("-inf"))
    if isinstance(value, RangeState):
        return max(w.count_expires_at(value.requests), w.distinct_expires_at(value.ips),
                   w.distinct_expires_at(value.numbers))
    return float("-inf")


def sweep(store: Store, now: float) -> int:
    """Delete keys whose state can no longer count at ``now`` (event time). Returns keys deleted.

    A value with a live count (its ``requests`` window, or a pair's bare window) is alive
    whatever its other parts hold: those keys, most of a table between sweeps, are passed over
    on one comparison of their newest hour bucket; the others are judged by :func:`expires_at`."""
    cut = int(now) // w.HOUR - w.HOUR_BUCKETS_KEPT  # a count whose newest hour is above is live
    dead = []
    for k, v in list(store.items()):
        t = type(v)
        if t is Window:
            hours = v.hours
        elif t is IpState or t is NumberState or t is RangeState:
            hours = v.requests.hours
        else:
            hours = None
        if hours and hours[-1] > cut:
            continue  # alive: its count is not expired (see expires_at and w.count_expires_at)
        if expires_at(v) <= now:
            dead.append(k)
    for k in dead:
        del store[k]
    return len(dead)


class ExpiryIndex:
    """Which keys of one store a sweep has to look at, so that it need not scan them all.

    Every key is *filed* under an hour bucket ``b`` with ``b * HOUR <= expires_at(value)``: a
    lower bound of when it can die. A sweep at ``now`` looks only at the keys filed under buckets
    with ``b * HOUR <= now`` (and the *marked* ones), deletes those with ``expires_at <= now``
    and files the others again under their own expiry; a key filed under a later bucket cannot
    be dead yet. So it deletes exactly the keys :func:`sweep` (a full scan) deletes, as long as
    this holds for every key of the store (the invariant):

    * a key whose requests window counted an event at ``ts`` is filed with :meth:`bucket`
      ``(counted_bucket(ts))``: the window's newest hour is at least ``ts``'s, and a window's
      expiry never moves back (counting only adds hours; trimming drops only old ones), so the
      bound holds for as long as the key lives, whatever else is written to its value;
    * any other write that can move a key's expiry back (a cleared outstanding callback, a
      learned deny's time set back, a value written from outside) is :meth:`mark`-ed: looked at
      by the next sweep;
    * the first sweep looks at every key (the store may have been filled before).

    Keys filed twice or deleted since are harmless (looked at again, or skipped). The buckets
    hold about one entry per key and hour it was counted in, for a day."""

    __slots__ = ("buckets", "marked", "primed")

    def __init__(self) -> None:
        # bucket -> its keys (a dict used as an ordered set: a sweep visits them in about the
        # order they were created, several times faster than a set's order on a big table)
        self.buckets: dict[int, dict[str, None]] = {}
        self.marked: dict[str, None] = {}
        self.primed = False

    def bucket(self, b: int) -> dict[str, None]:
        """The keys filed under bucket ``b`` (file a key with ``bucket(b)[key] = None``; fetch it
        again after a sweep, which takes the due buckets away)."""
        keys = self.buckets.get(b)
        if keys is None:
            keys = self.buckets[b] = {}
        return keys

    def mark(self, key: str) -> None:
        """Look at ``key`` in the next sweep (its value was written otherwise than by counting)."""
        self.marked[key] = None

    def sweep(self, store: Store, now: float) -> int:
        """:func:`sweep` of ``store`` at ``now``, looking only at the keys that can be dead."""
        if not self.primed:
            self.marked.update(dict.fromkeys(store))
            self.primed = True
        keys = self.marked
        self.marked = {}
        for b in sorted(b for b in self.buckets if b * w.HOUR <= now):
            keys.update(self.buckets.pop(b))
        cut = int(now) // w.HOUR - w.HOUR_BUCKETS_KEPT  # as in sweep(): a count newer is live
        kept = w.HOUR_BUCKETS_KEPT
        dead = []
        get, bucket = store.get, self.bucket
        for k in keys:
            v = get(k)
            if v is None:
                continue  # deleted since it was filed
            t = type(v)
            if t is Window:  # a pair: its count is all it holds
                hours = v.hours
                if hours and hours[-1] > cut:
                    bucket(hours[-1] + kept)[k] = None
                else:
                    dead.append(k)  # expires_at(v) = count_expires_at(v) <= now
                continue
            hours = v.requests.hours if t is IpState or t is NumberState or t is RangeState else None
            if hours and hours[-1] > cut:
                b = hours[-1] + kept  # its count's expiry: a lower bound of its own
            elif hours is not None and _rest_expired(v, t, now):
                dead.append(k)  # its count and the rest expired: expires_at(v) <= now
                continue
            else:
                e = expires_at(v)
                if e <= now:
                    dead.append(k)
                    continue
                b = int(e // w.HOUR)
            bucket(b)[k] = None
        for k in dead:
            del store[k]
        return len(dead)


def _rest_expired(v: IpState | NumberState | RangeState, t: type, now: float) -> bool:
    """Whether the parts of ``v`` (of type ``t``) other than its requests window are expired at
    ``now``: :func:`expires_at` of them ``<= now``, the same sums and comparisons in one call (a
    sweep asks this of every key whose count expired, most of the keys it deletes)."""
    day = w.DAY
    if t is IpState:
        n, c, r = v.numbers, v.countries, v.ranges  # type: ignore[union-attr]
        return ((not n or max(n.values()) + day <= now) and (not c or max(c.values()) + day <= now)
                and (not r or max(r.values()) + day <= now))
    if t is RangeState:
        i, n = v.ips, v.numbers  # type: ignore[union-attr]
        return (not i or max(i.values()) + day <= now) and (not n or max(n.values()) + day <= now)
    i, p, ma, learned = v.ips, v.pending, v.machine_answers, v.learned_deny_at  # type: ignore[union-attr]
    return ((not i or max(i.values()) + day <= now) and (p is None or p.until <= now)
            and (ma is None or w.count_expires_at(ma) <= now)
            and (learned is None or learned + LEARNED_MARK_KEEP_S <= now))


def counted_bucket(ts: float) -> int:
    """The :class:`ExpiryIndex` bucket of a key whose requests window counted an event at ``ts``
    (the hour its count expires: ``w.count_expires_at`` of a window whose newest hour is ``ts``'s)."""
    return int(ts) // w.HOUR + w.HOUR_BUCKETS_KEPT


# --------------------------------------------------------------------------- binary form
# One kind byte, then the fields in declaration order (windows and distinct sets as in
# detector.core.windows; optional parts behind a flags byte). Little-endian throughout.

KIND_WINDOW, KIND_IP, KIND_NUMBER, KIND_RANGE = 1, 2, 3, 4
_F64 = struct.Struct("<d")
_PENDING = struct.Struct("<dH")  # until, request id length (then the id, UTF-8)
_HAS_PENDING, _HAS_MACHINE, _HAS_LEARNED = 1, 2, 4


def pack(value: Any) -> bytes:
    """The binary form of a table value (:func:`unpack` is its inverse).

    >>> v = NumberState(pending=Pending(1.5e9, "r-1"))
    >>> w.count_add(v.requests, 1.5e9) and unpack(pack(v)) == v
    True
    """
    out = bytearray()
    if isinstance(value, Window):
        out.append(KIND_WINDOW)
        w.pack_window(value, out)
    elif isinstance(value, IpState):
        out.append(KIND_IP)
        w.pack_window(value.requests, out)
        w.pack_distinct(value.numbers, out)
        w.pack_distinct(value.countries, out)
        w.pack_distinct(value.ranges, out)
    elif isinstance(value, NumberState):
        out.append(KIND_NUMBER)
        w.pack_window(value.requests, out)
        w.pack_distinct(value.ips, out)
        flags = ((_HAS_PENDING if value.pending is not None else 0)
                 | (_HAS_MACHINE if value.machine_answers is not None else 0)
                 | (_HAS_LEARNED if value.learned_deny_at is not None else 0))
        out.append(flags)
        if value.pending is not None:
            rid = value.pending.request_id.encode("utf-8", "surrogatepass")
            out += _PENDING.pack(value.pending.until, len(rid))
            out += rid
        if value.machine_answers is not None:
            w.pack_window(value.machine_answers, out)
        if value.learned_deny_at is not None:
            out += _F64.pack(value.learned_deny_at)
    elif isinstance(value, RangeState):
        out.append(KIND_RANGE)
        w.pack_window(value.requests, out)
        w.pack_distinct(value.ips, out)
        w.pack_distinct(value.numbers, out)
    else:
        raise TypeError(f"not a table value: {type(value).__name__}")
    return bytes(out)


def pending_until(buf: bytes | memoryview, pos: int = 0) -> float | None:
    """The outstanding callback's end in a packed :class:`NumberState` (None: none), read
    without unpacking the rest (a sweep pass counts them for a gauge).

    >>> v = NumberState(pending=Pending(1.5e9, "r-1"))
    >>> pending_until(pack(v)), pending_until(pack(NumberState()))
    (1500000000.0, None)
    """
    if buf[pos] != KIND_NUMBER:
        return None
    nm, nh = buf[pos + 1], buf[pos + 2]
    pos += 3 + 8 * (nm + nh)
    n = buf[pos] | buf[pos + 1] << 8
    pos += 2 + 16 * n
    if not buf[pos] & _HAS_PENDING:
        return None
    return float(_F64.unpack_from(buf, pos + 1)[0])


def unpack(buf: bytes | memoryview, pos: int = 0) -> Any:
    """The table value packed in ``buf`` from ``pos`` on (a new object)."""
    kind = buf[pos]
    pos += 1
    if kind == KIND_WINDOW:
        return w.unpack_window(buf, pos)[0]
    if kind == KIND_IP:
        requests, pos = w.unpack_window(buf, pos)
        numbers, pos = w.unpack_distinct(buf, pos)
        countries, pos = w.unpack_distinct(buf, pos)
        ranges, pos = w.unpack_distinct(buf, pos)
        return IpState(requests, numbers, countries, ranges)
    if kind == KIND_NUMBER:
        requests, pos = w.unpack_window(buf, pos)
        ips, pos = w.unpack_distinct(buf, pos)
        flags = buf[pos]
        pos += 1
        value = NumberState(requests, ips)
        if flags & _HAS_PENDING:
            until, n = _PENDING.unpack_from(buf, pos)
            pos += _PENDING.size
            value.pending = Pending(until, bytes(buf[pos:pos + n]).decode("utf-8", "surrogatepass"))
            pos += n
        if flags & _HAS_MACHINE:
            value.machine_answers, pos = w.unpack_window(buf, pos)
        if flags & _HAS_LEARNED:
            (value.learned_deny_at,) = _F64.unpack_from(buf, pos)
        return value
    if kind == KIND_RANGE:
        requests, pos = w.unpack_window(buf, pos)
        ips, pos = w.unpack_distinct(buf, pos)
        numbers, pos = w.unpack_distinct(buf, pos)
        return RangeState(requests, ips, numbers)
    raise ValueError(f"unknown table value kind {kind}")

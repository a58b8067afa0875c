"""Per-key state of the two processing stages, over any ``MutableMapping`` (dict or Faust table).

The stream is processed in two stages so that every table is fed by a stream keyed by its key:

* **IP stage** (partitioned by IP): table ``ip`` -> ``{"c": counts, "n": distinct numbers,
  "k": distinct number countries}``.
* **Range stage** (partitioned by the number's range key, which also co-partitions the number and
  every IP x number pair on it): tables ``number`` -> ``{"c": counts, "i": distinct IPs,
  "p": pending callback, "m": machine answers}``, ``pair`` -> counts, ``range`` ->
  ``{"c": counts, "i": distinct IPs, "n": distinct numbers}``.

Each update reads a value, changes it and writes it back with ``store[key] = value`` (a Faust table
logs that write to its changelog). The replay path calls both stages in turn on plain dicts.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detector.core import windows as w
from detector.core.pii import hash_id
from detector.core.records import CallbackRequest, Enrichment, IpCounts, PhoneInfo, RangeCounts

if TYPE_CHECKING:
    from detector.core.policy import SharedIpPolicy

Store = MutableMapping[str, Any]


# A distinct-set member of an identifier is its one keyed hash (detector.core.pii.hash_id), and
# so is the decision's ip_hash: the same function (memoized), without a wrapper call.
short_hash = hash_id
pii_hash = hash_id


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


@dataclass
class IpStores:
    ip: Store = field(default_factory=dict)


@dataclass
class RangeStores:
    number: Store = field(default_factory=dict)
    pair: Store = field(default_factory=dict)
    range: Store = field(default_factory=dict)


def ip_stage(
    stores: IpStores, req: CallbackRequest, enr: Enrichment, shared: SharedIpPolicy | None = None,
    *, key: bytes,
) -> IpCounts:
    """Count ``req`` in the IP tables and return the IP-side counts (including ``req``).
    ``key``: the PII hash key (distinct-set members are keyed hashes); ``shared``: the policy's
    shared-IP section (None: never shared)."""
    ts = req.ts
    value = stores.ip.get(req.ip) or {}
    value = dict(value)
    phone = enr.phone
    value["c"], c15, c1h, c24 = w.count_add_read(value.get("c"), ts)
    value["n"], n1h, n24 = w.distinct_add_read(
        value.get("n"), short_hash(phone_key(phone, req.phone_number), key), ts)
    if phone.region:
        value["k"], _, k24 = w.distinct_add_read(value.get("k"), phone.region, ts)
    else:
        _, k24 = w.distinct_read(value.get("k"), ts)
    if phone.range_key:
        value["r"], _, r24 = w.distinct_add_read(value.get("r"), short_hash(phone.range_key, key), ts)
    else:
        _, r24 = w.distinct_read(value.get("r"), ts)
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


@dataclass
class RangeUpdate:
    """Range-stage counts plus the per-number value still to be written by :func:`range_commit`."""

    counts: RangeCounts
    number_key: str
    number_value: dict[str, Any]


def range_stage(
    stores: RangeStores, req: CallbackRequest, enr: Enrichment, range_key: str, *, key: bytes
) -> RangeUpdate:
    """Count ``req`` per number, pair and range; the number's value is written by :func:`range_commit`."""
    ts = req.ts
    nkey = number_key(enr, req.phone_number)
    ip_member = short_hash(req.ip, key)

    num = dict(stores.number.get(nkey) or {})
    num["c"], n15, n1h, n24 = w.count_add_read(num.get("c"), ts)
    num["i"], ni1h, ni24 = w.distinct_add_read(num.get("i"), ip_member, ts)
    pending = is_pending(num.get("p"), ts, req.request_id)

    pkey = pair_key(req.ip, nkey)
    pair, _, p1h, p24 = w.count_add_read(stores.pair.get(pkey), ts)
    stores.pair[pkey] = pair

    rng = dict(stores.range.get(range_key) or {})
    rng["c"], _, r1h, r24 = w.count_add_read(rng.get("c"), ts)
    rng["i"], _, ri24 = w.distinct_add_read(rng.get("i"), ip_member, ts)
    rng["n"], _, rn24 = w.distinct_add_read(rng.get("n"), short_hash(nkey, key), ts)
    stores.range[range_key] = rng

    counts = RangeCounts(n15, n1h, n24, p1h, p24, r1h, r24, ni1h, ni24, ri24, rn24, pending)
    return RangeUpdate(counts, nkey, num)


def is_pending(mark: Any, ts: float, request_id: str) -> bool:
    """Whether a number's outstanding-callback mark (its value's ``p``) holds at ``ts`` for another
    request than ``request_id``."""
    return mark is not None and float(mark["until"]) > ts and mark.get("rid") != request_id


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
        update.number_value["p"] = {"until": req.ts + pending_ttl, "rid": req.request_id}
    stores.number[update.number_key] = update.number_value


def clear_pending(stores: RangeStores, nkey: str, request_id: str | None) -> bool:
    """The dialer finished a callback: clear the outstanding mark (if it is that request's)."""
    value = stores.number.get(nkey)
    if not value or not value.get("p"):
        return False
    if request_id is not None and value["p"].get("rid") not in (None, request_id):
        return False
    value = dict(value)
    value.pop("p", None)
    stores.number[nkey] = value
    return True


def record_machine(stores: RangeStores, nkey: str, ts: float) -> int:
    """Count an answering-machine outcome for a number; returns machine answers in the last 24 h."""
    value = dict(stores.number.get(nkey) or {})
    value["m"] = w.count_add(value.get("m"), ts)
    stores.number[nkey] = value
    return w.count_read(value["m"], ts)[2]


LEARNED_MARK_KEEP_S = 86400.0  # a number's last learned deny is remembered this long


def learned_deny_due(stores: RangeStores, nkey: str, ts: float, interval_s: float) -> bool:
    """Whether a learned deny for ``nkey`` at ``ts`` may be issued (none within ``interval_s``);
    if so, remember ``ts`` in the number's value (``ld``)."""
    value = dict(stores.number.get(nkey) or {})
    last = value.get("ld")
    if isinstance(last, int | float) and abs(ts - float(last)) < interval_s:
        return False
    value["ld"] = ts
    stores.number[nkey] = value
    return True


def sweep(store: Store, now: float) -> int:
    """Delete keys whose state can no longer count at ``now`` (event time). Returns keys deleted.

    A value with a live count (``c``, or a bare pair count) is alive whatever its other parts
    hold: those keys, most of a table between sweeps, are passed over on one comparison of
    their newest hour bucket; the others are judged by :func:`_dead`."""
    cut = int(now) // w.HOUR - w.HOUR_BUCKETS_KEPT  # a count whose newest hour is above is live
    dead = []
    for k, v in list(store.items()):
        if type(v) is dict:
            if "m" in v and "h" in v and isinstance(v["m"], list):  # a bare count (pair table)
                h = v["h"]
            else:
                c = v.get("c")
                h = c.get("h") if type(c) is dict else None
            if h and h[-1][0] > cut:
                continue  # alive: its count is not expired (see _dead and w.count_expired)
        if _dead(v, now):
            dead.append(k)
    for k in dead:
        del store[k]
    return len(dead)


def _dead(value: Any, now: float) -> bool:
    if isinstance(value, dict) and "m" in value and "h" in value and isinstance(value["m"], list):
        return w.count_expired(value, now)  # a bare count value (pair table)
    if not isinstance(value, dict):
        return True
    for part, v in value.items():
        if part == "p":
            if float(v["until"]) > now:
                return False
        elif part == "ld":
            if float(v) + LEARNED_MARK_KEEP_S > now:
                return False
        elif part in ("c", "m"):
            if not w.count_expired(v, now):
                return False
        elif not w.distinct_expired(v, now):
            return False
    return True

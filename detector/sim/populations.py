"""Traffic that shares keys the way real contact-centre traffic does, and attacks that keep every
single key quiet.

Legitimate populations (label ``attack: false``): customers behind a mobile operator's
carrier-grade NAT, staff behind an office NAT, households, retries after a missed callback,
customers returning from another network, a small business's shared line, and marketing surges
(unannounced, and announced with a campaign window: :func:`campaign_windows`).

Attacks (``attack: true``): a botnet flood (one request per IP and per number), pumping spread
evenly over a leased 100,000-number block from fresh residential IPs, slow IP x number
combinations, sequential enumeration of a range, and harassment of one victim from rotating IPs.

Each generator draws from its own seeded :class:`random.Random` (``f"{seed}/{name}"``); the
shapes (numbers per IP, timing, networks) follow published figures where there are any (about 60
subscribers per carrier-grade NAT address, 10-60 staff per office NAT) and ordinary behaviour
otherwise; none is tuned to the detector's rules.

>>> cfg = SimConfig(seed=3, scenarios=("legit_surge_announced",))
>>> [sorted(w) for w in campaign_windows(cfg)]
[['country', 'end', 'factor', 'start']]
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from detector.sim.ipdb import (
    block_of,
    blocks_for,
    cgnat_pools,
    countries_with,
    random_ip,
    random_ip_in,
)
from detector.sim.simulate import (
    BROWSER_UAS,
    COUNTRY_WEIGHT,
    DIURNAL,
    FIXED_LINE,
    MOBILE,
    SCRIPT_UAS,
    UTC_OFFSET_H,
    SimConfig,
    _check,
    _Ctx,
    _home_ip,
    _Number,
    random_number,
)

#: Browsers of phones (iPhone Safari, Android Chrome x2) and of desktops, with their weights.
MOBILE_UAS: tuple[tuple[str, float], ...] = ((BROWSER_UAS[1], 0.5), (BROWSER_UAS[2], 0.35),
                                             (BROWSER_UAS[6], 0.15))  # fmt: skip
DESKTOP_UAS: tuple[tuple[str, float], ...] = ((BROWSER_UAS[0], 0.45), (BROWSER_UAS[3], 0.2),
                                              (BROWSER_UAS[4], 0.15), (BROWSER_UAS[5], 0.2))  # fmt: skip

#: Office hours (local): staff ask between 08:00 and 18:00, less at lunch.
OFFICE_HOURS: tuple[float, ...] = tuple(
    {8: 0.5, 9: 1.0, 10: 1.0, 11: 1.0, 12: 0.6, 13: 0.7, 14: 1.0, 15: 1.0, 16: 0.9, 17: 0.6}.get(h, 0.0)
    for h in range(24)
)
#: When an advert airs (local): daytime and evening slots.
SURGE_HOURS: tuple[float, ...] = tuple(1.0 if 9 <= h < 22 else 0.0 for h in range(24))
#: Multiplier of the normal rate during a marketing surge.
SURGE_FACTOR: tuple[float, float] = (10.0, 50.0)
#: Length of a surge in seconds (about half an hour).
SURGE_LENGTH_S: tuple[float, float] = (25 * 60.0, 35 * 60.0)
#: Subscribers seen per carrier-grade NAT address per day: log-normal around 55, 20..300.
CGNAT_MEDIAN, CGNAT_SIGMA, CGNAT_RANGE = 55.0, 0.55, (20, 300)


def _ua(ctx: _Ctx, table: tuple[tuple[str, float], ...]) -> str:
    return ctx.rng.choices([u for u, _ in table], [w for _, w in table])[0]


def _country(ctx: _Ctx) -> str:
    countries = ctx.cfg.business_countries
    return ctx.rng.choices(countries, [COUNTRY_WEIGHT.get(c, 0.1) for c in countries])[0]


def _user(ctx: _Ctx, p: float = 0.25) -> str | None:
    return f"u{ctx.rng.randrange(10**8):08d}" if ctx.rng.random() < p else None


def _emit_visit(
    ctx: _Ctx, ts: float, number: _Number, ip: str, ua: str, user: str | None,
    *, session: str | None = None, hint: str | None = None,
) -> bool:
    """One customer request at ``ts`` (dropped when after the simulated span); True if kept."""
    if ts >= ctx.cfg.end:
        return False
    ctx.emit(ts, number, ip, ua=ua, session=session, hint=hint, user_id=user,
             authenticated=user is not None, p_national=0.03)  # fmt: skip
    return True


def _mobile_ip(ctx: _Ctx, country: str) -> str:
    """A phone's address on a mobile network of ``country``: mostly behind the operator's CGNAT."""
    rng = ctx.rng
    pools = cgnat_pools(country)
    if pools and rng.random() < 0.7:
        return random_ip_in(rng, rng.choice(pools))
    return random_ip(rng, country, "mobile")


def _other_network(ctx: _Ctx, country: str, ip: str, mobile: bool) -> str:
    """An address on another network of ``country`` than ``ip``: a customer who was at home is
    now on a phone's mobile data (or at work), one who was on mobile data is now at home."""
    rng = ctx.rng
    block = block_of(ip)
    on_mobile = block is not None and block.kind == "mobile"
    for _ in range(20):
        if on_mobile:
            other = random_ip(rng, country, "residential")
        elif rng.random() < 0.2:
            other = random_ip(rng, country, "business")
        elif mobile or rng.random() < 0.5:
            other = _mobile_ip(ctx, country)
        else:
            other = random_ip(rng, country, "residential")  # another home, a friend's wifi
        if other != ip:
            return other
    return random_ip(rng, country, "residential")  # pragma: no cover


# --------------------------------------------------------------------------- legitimate


def _legit_cgnat(ctx: _Ctx, n: int | None) -> None:
    """Mobile subscribers of each business country behind their operator's CGNAT addresses."""
    rng = ctx.rng
    target = n or 0
    seen: set[str] = set()
    in_use: dict[object, list[str]] = {}  # the addresses of each pool that carry today's customers
    produced = 0
    while produced < target:
        country = _country(ctx)
        pools = cgnat_pools(country) or blocks_for(country, "mobile")
        pool = rng.choice(pools)
        ip = ctx.unique_ip(seen, partial(random_ip_in, rng, pool))
        in_use.setdefault(pool, []).append(ip)
        low, high = CGNAT_RANGE
        subscribers = min(high, max(low, round(rng.lognormvariate(math.log(CGNAT_MEDIAN), CGNAT_SIGMA))))
        for _ in range(subscribers):
            if produced >= target:
                break
            number = random_number(rng, country, MOBILE)
            ua, user = _ua(ctx, MOBILE_UAS), _user(ctx)
            hint = country if rng.random() < 0.3 else None
            ts = ctx.local_ts(country)
            session = ctx.session()
            produced += _emit_visit(ctx, ts, number, ip, ua, user, session=session, hint=hint)
            roll = rng.random()
            if roll < 0.04 and produced < target:  # impatient: submits again within minutes
                produced += _emit_visit(ctx, ts + rng.uniform(15.0, 180.0), number, ip, ua, user,
                                        session=session, hint=hint)  # fmt: skip
            elif roll < 0.10 and produced < target:  # missed the call: tries again later,
                # behind whichever address of the operator's pool the NAT gives it then
                again = ip if rng.random() < 0.5 else rng.choice(in_use[pool])
                produced += _emit_visit(ctx, ts + rng.uniform(1200.0, 3600.0), number, again, ua,
                                        user, hint=hint)  # fmt: skip


def _legit_office(ctx: _Ctx, n: int | None) -> None:
    """Offices of 10-60 staff behind one NAT address, asking in office hours."""
    rng = ctx.rng
    target = n or 0
    seen: set[str] = set()
    produced = 0
    while produced < target:
        country = _country(ctx)
        ip = ctx.unique_ip(seen, partial(random_ip, rng, country, "business"))
        staff = rng.randint(10, 60)
        switchboard = random_number(rng, country, FIXED_LINE)  # the office's direct-dial block
        for _ in range(staff):
            if produced >= target:
                break
            if rng.random() < 0.3:
                number = _Number(country, switchboard.cc,
                                 f"{switchboard.nsn[:-3]}{rng.randrange(1000):03d}")  # fmt: skip
                if not _check(number, None):
                    number = random_number(rng, country, MOBILE)
            else:
                number = random_number(rng, country, MOBILE)
            ua = _ua(ctx, DESKTOP_UAS if rng.random() < 0.8 else MOBILE_UAS)
            user = _user(ctx, 0.3)
            ts = ctx.local_ts(country, OFFICE_HOURS)
            produced += _emit_visit(ctx, ts, number, ip, ua, user)
            if rng.random() < 0.08 and produced < target:  # missed it in a meeting
                produced += _emit_visit(ctx, ts + rng.uniform(1200.0, 5400.0), number, ip, ua, user)


def _legit_household(ctx: _Ctx, n: int | None) -> None:
    """A family behind one home broadband address asking on 2-3 numbers over the day."""
    rng = ctx.rng
    target = n or 0
    seen: set[str] = set()
    produced = 0
    while produced < target:
        country = _country(ctx)
        ip = ctx.unique_ip(seen, partial(random_ip, rng, country, "residential"))
        members = rng.choice((2, 2, 2, 3))
        numbers = [random_number(rng, country, MOBILE) for _ in range(members)]
        if rng.random() < 0.3:
            numbers[-1] = random_number(rng, country, FIXED_LINE)  # the home landline
        together = rng.random() < 0.2  # one person asks for two numbers in one sitting
        first = ctx.local_ts(country, span=900.0)
        for number in numbers:
            if produced >= target:
                break
            ts = first + rng.uniform(30.0, 900.0) if together else ctx.local_ts(country)
            ua = _ua(ctx, MOBILE_UAS if rng.random() < 0.6 else DESKTOP_UAS)
            produced += _emit_visit(ctx, ts, number, ip, ua, _user(ctx))


def _customer_at_home(ctx: _Ctx) -> tuple[str, bool, _Number, str]:
    """A customer of a business country: (country, mobile?, their number, their home IP)."""
    country = _country(ctx)
    mobile = ctx.rng.random() < 0.75
    number = random_number(ctx.rng, country, MOBILE if mobile else FIXED_LINE)
    return country, mobile, number, _home_ip(ctx, country, mobile)


def _legit_retry(ctx: _Ctx, n: int | None) -> None:
    """A customer missed the callback and asks again 20-60 minutes later (sometimes twice)."""
    rng = ctx.rng
    target = n or 0
    produced = 0
    while produced < target:
        country, mobile, number, ip = _customer_at_home(ctx)
        ua, user = ctx.browser_ua(), _user(ctx)
        hint = country if rng.random() < 0.3 else None
        ts = ctx.local_ts(country, span=3600.0)
        produced += _emit_visit(ctx, ts, number, ip, ua, user, hint=hint)
        for _ in range(2 if rng.random() < 0.15 else 1):
            if produced >= target:
                break
            ts += rng.uniform(20 * 60.0, 60 * 60.0)
            if rng.random() < 0.2:  # on another network now (left home, or got home)
                ip = _other_network(ctx, country, ip, mobile)
            produced += _emit_visit(ctx, ts, number, ip, ua, user, hint=hint)


def _legit_returning(ctx: _Ctx, n: int | None) -> None:
    """A customer comes back hours later from another network: same number, another IP."""
    rng = ctx.rng
    target = n or 0
    produced = 0
    while produced < target:
        country, mobile, number, ip = _customer_at_home(ctx)
        user = _user(ctx)
        gap = rng.uniform(2 * 3600.0, 10 * 3600.0)
        ts = ctx.local_ts(country, span=gap)
        produced += _emit_visit(ctx, ts, number, ip, ctx.browser_ua(), user)
        if produced < target:
            later = ts + gap
            other = _other_network(ctx, country, ip, mobile)
            produced += _emit_visit(ctx, later, number, other, ctx.browser_ua(), user)


def _legit_shared_line(ctx: _Ctx, n: int | None) -> None:
    """A small business's one fixed line, asked for by 3-8 staff from their own devices."""
    rng = ctx.rng
    target = n or 0
    produced = 0
    while produced < target:
        country = _country(ctx)
        line = random_number(rng, country, FIXED_LINE)
        office = random_ip(rng, country, "business" if rng.random() < 0.5 else "residential")
        for i in range(rng.randint(3, 8)):
            if produced >= target:
                break
            roll = (0.0, 0.5)[i] if i < 2 else rng.random()  # the shop's line, then a phone, ...
            if roll < 0.4:
                ip = office  # from the shop's own connection
            elif roll < 0.8:
                ip = _mobile_ip(ctx, country)  # from a phone
            else:
                ip = random_ip(rng, country, "residential")  # from home
            ua = ctx.browser_ua()
            ts = ctx.local_ts(country, OFFICE_HOURS)
            produced += _emit_visit(ctx, ts, line, ip, ua, _user(ctx, 0.15))
            if rng.random() < 0.2 and produced < target:
                produced += _emit_visit(ctx, ctx.local_ts(country, OFFICE_HOURS), line, ip, ua, None)


@dataclass(frozen=True, slots=True)
class SurgePlan:
    """One marketing surge: where, when, how strong."""

    country: str
    start: float
    length: float
    factor: float
    base_rate: float  # normal legitimate requests per second to ``country`` at that hour


def _surge_plan(ctx: _Ctx) -> SurgePlan:
    """The surge's country, window and factor: the first draws of its generator's RNG."""
    cfg, rng = ctx.cfg, ctx.rng
    country = _country(ctx)
    length = min(rng.uniform(*SURGE_LENGTH_S), cfg.duration_s)
    start = ctx.local_ts(country, SURGE_HOURS, span=length)
    factor = rng.uniform(*SURGE_FACTOR)
    weights = {c: COUNTRY_WEIGHT.get(c, 0.1) for c in cfg.business_countries}
    hour = int(((start + length / 2 + UTC_OFFSET_H.get(country, 0) * 3600) % 86400) // 3600)
    base = (cfg.legit_per_day * weights[country] / sum(weights.values())
            * DIURNAL[hour] / sum(DIURNAL) / 3600.0)  # fmt: skip
    return SurgePlan(country, start, length, factor, base)


def surge_plan(cfg: SimConfig, name: str) -> SurgePlan:
    """The plan of surge ``name`` (``legit_surge`` or ``legit_surge_announced``) for ``cfg``."""
    return _surge_plan(_Ctx(cfg, random.Random(f"{cfg.seed}/{name}"), name, False))


def _surge(ctx: _Ctx, n: int | None) -> None:
    """Ordinary customers of one country at ``factor`` times the normal rate for ~30 min.

    Without an explicit volume the surge adds ``(factor - 1) x normal rate x length`` requests,
    so that the country's total during the window is ``factor`` times its normal rate.
    """
    rng = ctx.rng
    plan = _surge_plan(ctx)
    target = n if n is not None else round(plan.base_rate * plan.length * (plan.factor - 1.0))
    produced = 0
    while produced < target:
        mobile = rng.random() < 0.8
        number = random_number(rng, plan.country, MOBILE if mobile else FIXED_LINE)
        ip = _home_ip(ctx, plan.country, mobile)
        ua = _ua(ctx, MOBILE_UAS) if mobile and rng.random() < 0.7 else ctx.browser_ua()
        ts = plan.start + rng.random() * plan.length
        session, user = ctx.session(), _user(ctx, 0.15)
        produced += _emit_visit(ctx, ts, number, ip, ua, user, session=session)
        if rng.random() < 0.03 and produced < target:  # impatient: submits again
            produced += _emit_visit(ctx, ts + rng.uniform(15.0, 120.0), number, ip, ua, user,
                                    session=session)  # fmt: skip


def campaign_windows(cfg: SimConfig) -> list[dict[str, object]]:
    """Campaigns the business declared for ``cfg``'s day: the announced surge's window.

    Each is ``{"country", "start", "end", "factor"}`` (``start``, ``end``: integer epoch seconds):
    the surge's window widened to whole 5 minutes, 15 minutes before it and 30 after, and its
    factor rounded up to tens, as a marketing team would declare it. Empty when
    ``legit_surge_announced`` is not simulated.
    """
    name = "legit_surge_announced"
    if name not in cfg.scenarios or dict(cfg.volumes).get(name, 1) == 0:
        return []
    plan = surge_plan(cfg, name)
    start = math.floor((plan.start - 900.0) / 300.0) * 300
    end = math.ceil((plan.start + plan.length + 1800.0) / 300.0) * 300
    return [{"country": plan.country, "start": start, "end": end,
             "factor": float(math.ceil(plan.factor / 10.0) * 10)}]  # fmt: skip


# --------------------------------------------------------------------------- attacks


def _botnet_flood(ctx: _Ctx, n: int) -> None:
    """Thousands of requests in 3-10 minutes, one per IP and one per number."""
    rng, cfg = ctx.rng, ctx.cfg
    t0, length = ctx.window(rng.uniform(180.0, 600.0))
    homes = tuple(c for c in countries_with("residential") if c not in cfg.business_countries)
    seen_ip: set[str] = set()
    seen_number: set[str] = set()
    for _ in range(n):
        # bots: infected home computers and phones everywhere, the business countries included
        country = rng.choice(cfg.business_countries) if rng.random() < 0.5 else rng.choice(homes)
        kind = "mobile" if rng.random() < 0.35 and blocks_for(country, "mobile") else "residential"
        ip = ctx.unique_ip(seen_ip, partial(random_ip, rng, country, kind))
        while True:
            dest = rng.choice(cfg.business_countries)
            number = random_number(rng, dest, MOBILE if rng.random() < 0.6 else FIXED_LINE)
            if number.e164 not in seen_number:
                seen_number.add(number.e164)
                break
        ctx.emit(t0 + rng.random() * length, number, ip, ua=ctx.browser_ua())


def _pump_block(ctx: _Ctx, country: str, ntype: int) -> tuple[_Number, int]:
    """A 100,000-number block (a number's first len-5 digits) that is nearly all valid."""
    rng = ctx.rng
    for _ in range(200):
        stem = random_number(rng, country, ntype)
        head = stem.nsn[:-5]
        probes = [_Number(country, stem.cc, f"{head}{rng.randrange(100_000):05d}") for _ in range(30)]
        if sum(_check(p, ntype) for p in probes) >= 28:
            return stem, ntype
    return stem, ntype  # pragma: no cover


def _pump_spread(ctx: _Ctx, n: int) -> None:
    """Pumping spread evenly over one leased 100,000-number block, a fresh residential IP each."""
    rng = ctx.rng
    country = rng.choice(ctx.cfg.business_countries)
    stem, ntype = _pump_block(ctx, country, MOBILE if rng.random() < 0.6 else FIXED_LINE)
    head = stem.nsn[:-5]
    # every 1,000-number range of the block gets its share (a few each), in random order
    ranges = [r for _ in range(n // 100 + 1) for r in rng.sample(range(100), 100)][:n]
    seen_ip: set[str] = set()
    used: set[str] = set()
    # some (10-15%) come from accounts the attacker opened: made up, but authenticated
    accounts = set(rng.sample(range(len(ranges)), k=round(len(ranges) * rng.uniform(0.10, 0.15))))
    for i, r in enumerate(ranges):
        for _ in range(50):
            number = _Number(country, stem.cc, f"{head}{r:02d}{rng.randrange(1000):03d}")
            if number.nsn not in used and _check(number, ntype):
                break
        used.add(number.nsn)
        kind = "residential_proxy" if rng.random() < 0.3 else "residential"
        ip = ctx.unique_ip(seen_ip, partial(random_ip, rng, country, kind))
        user = f"u{rng.randrange(10**8):08d}" if i in accounts else None
        hint = country if rng.random() < 0.5 else None
        ctx.emit(ctx.local_ts(country), number, ip, ua=ctx.browser_ua(), hint=hint, user_id=user,
                 authenticated=user is not None)  # fmt: skip


def _slow_combo(ctx: _Ctx, n: int) -> None:
    """6 IPs x 6 numbers recombined at random over the whole day."""
    rng, cfg = ctx.rng, ctx.cfg
    countries = rng.sample(cfg.business_countries, k=min(2, len(cfg.business_countries)))
    numbers = [random_number(rng, rng.choice(countries), MOBILE) for _ in range(6)]
    seen: set[str] = set()
    ips = [
        ctx.unique_ip(seen, lambda: random_ip(rng, rng.choice(countries),
                                              rng.choice(("residential", "mobile", "residential_proxy"))))
        for _ in range(6)
    ]  # fmt: skip
    uas = {ip: ctx.browser_ua() for ip in ips}
    for _ in range(n):
        ip = rng.choice(ips)
        ctx.emit(ctx.any_ts(), rng.choice(numbers), ip, ua=uas[ip])


def _enumeration(ctx: _Ctx, n: int) -> None:
    """Consecutive numbers (+1 each) of one range, 1-3 requests each, a few a minute."""
    rng, cfg = ctx.rng, ctx.cfg
    country = rng.choice(cfg.business_countries)
    stem = random_number(rng, country, MOBILE)
    value, width = int(stem.nsn), len(stem.nsn)
    ips = [random_ip(rng, None, "hosting"), random_ip(rng, country, "residential_proxy"),
           random_ip(rng, None, "vpn"), random_ip(rng, country, "residential")]  # fmt: skip
    ips += [random_ip(rng, country, "residential_proxy") for _ in range(rng.randint(0, 2))]
    uas = {ip: rng.choice((SCRIPT_UAS[0], SCRIPT_UAS[3], ctx.browser_ua())) for ip in ips}
    gap = rng.uniform(12.0, 30.0)  # mean seconds between requests: 2-5 a minute
    ts, _ = ctx.window(n * gap)
    produced = 0
    while produced < n:
        number = _Number(country, stem.cc, str(value).zfill(width))
        for _ in range(rng.choice((1, 1, 1, 1, 2, 3))):
            if produced >= n:
                break
            ip = rng.choice(ips)
            ctx.emit(ts, number, ip, ua=uas[ip])
            produced += 1
            ts += rng.expovariate(1.0 / gap)
        value += 1


def _harassment(ctx: _Ctx, n: int) -> None:
    """One victim (per ~60 requests) called back again and again, from rotating IPs."""
    rng, cfg = ctx.rng, ctx.cfg
    campaigns = max(1, round(n / 60))
    sizes = [n // campaigns + (1 if i < n % campaigns else 0) for i in range(campaigns)]
    for size in sizes:
        country = rng.choice(cfg.business_countries)
        victim = random_number(rng, country, MOBILE if rng.random() < 0.8 else FIXED_LINE)
        t0, length = ctx.window(rng.uniform(2.0, 5.0) * 3600.0)
        times = sorted(t0 + rng.random() * length for _ in range(size))
        seen: set[str] = set()
        ip, uses = "", 0
        for ts in times:
            if not ip or uses >= rng.choice((1, 1, 2)):
                kind = rng.choice(("residential", "mobile", "residential_proxy", "vpn", "vpn", "tor"))
                where = country if kind in ("residential", "mobile", "residential_proxy") else None
                ip = ctx.unique_ip(seen, partial(random_ip, rng, where, kind))
                uses = 0
            ctx.emit(ts, victim, ip, ua=ctx.browser_ua())
            uses += 1


LEGIT_GENERATORS: dict[str, Callable[[_Ctx, int | None], None]] = {
    "legit_cgnat": _legit_cgnat,
    "legit_office": _legit_office,
    "legit_household": _legit_household,
    "legit_retry": _legit_retry,
    "legit_returning": _legit_returning,
    "legit_shared_line": _legit_shared_line,
    "legit_surge": _surge,
    "legit_surge_announced": _surge,
}
ATTACK_GENERATORS: dict[str, Callable[[_Ctx, int], None]] = {
    "botnet_flood": _botnet_flood,
    "pump_spread": _pump_spread,
    "slow_combo": _slow_combo,
    "enumeration": _enumeration,
    "harassment": _harassment,
}

from hypothesis import given, settings
from hypothesis import strategies as st

from detector.core import windows as w


def brute_counts(times, t):
    """Reference semantics: bucket-aligned windows (see detector.core.windows)."""
    m, h = int(t) // 60, int(t) // 3600
    c15 = sum(1 for x in times if m - 14 <= int(x) // 60 <= m)
    c1h = sum(1 for x in times if m - 59 <= int(x) // 60 <= m)
    c24 = sum(1 for x in times if h - 23 <= int(x) // 3600 <= h)
    return c15, c1h, c24


@settings(max_examples=200)
@given(st.lists(st.floats(min_value=0, max_value=3 * 86400), min_size=1, max_size=120))
def test_counts_match_brute_force_in_order(times):
    times = sorted(times)
    v = None
    for i, t in enumerate(times):
        v = w.count_add(v, t)
        # Events seen so far that are not in the future of t.
        assert w.count_read(v, t) == brute_counts(times[: i + 1], t)


@given(st.lists(st.floats(min_value=0, max_value=7200), min_size=1, max_size=60))
def test_out_of_order_events_are_still_counted_exactly(times):
    v = None
    for t in times:
        v = w.count_add(v, t)
    t_end = max(times)
    assert w.count_read(v, t_end) == brute_counts(times, t_end)


@given(st.lists(st.floats(min_value=0, max_value=30 * 86400), min_size=1, max_size=300))
def test_memory_stays_bounded(times):
    v = None
    for t in sorted(times):
        v = w.count_add(v, t)
    assert len(v.minutes) <= w.MINUTE_BUCKETS_KEPT
    assert len(v.hours) <= w.HOUR_BUCKETS_KEPT


def test_values_survive_a_binary_round_trip():
    v = None
    for t in (10, 70, 4000):
        v = w.count_add(v, t)
    buf = bytearray(b"x")
    w.pack_window(v, buf)
    again, end = w.unpack_window(bytes(buf), 1)
    assert end == len(buf) and again == v
    assert w.count_read(again, 4000) == w.count_read(v, 4000)
    w.count_add(again, 4001)
    assert w.count_read(again, 4001)[2] == 4


@given(st.dictionaries(st.integers(min_value=0, max_value=2**64 - 1),
                       st.floats(min_value=0, max_value=4e9), max_size=40))
def test_distinct_sets_survive_a_binary_round_trip_exactly(d):
    buf = bytearray()
    w.pack_distinct(d, buf)
    again, end = w.unpack_distinct(bytes(buf), 0)
    assert again == d and end == len(buf) == 2 + 16 * len(d)


@given(st.lists(st.tuples(st.sampled_from(range(8)), st.floats(min_value=0, max_value=3 * 86400)),
                min_size=1, max_size=80))
def test_distinct_matches_brute_force(events):
    events = sorted(events, key=lambda e: e[1])
    d = None
    for i, (member, t) in enumerate(events):
        d = w.distinct_add(d, member, t)
        seen = events[: i + 1]
        short = {m for m, x in seen if t - 3600 < x <= t}
        long = {m for m, x in seen if t - 86400 < x <= t}
        assert w.distinct_read(d, t) == (len(short), len(long))


def test_distinct_saturates_at_cap():
    d = None
    for i in range(50):
        d = w.distinct_add(d, i, float(i), cap=10)
    assert len(d) == 10
    assert w.distinct_read(d, 49.0)[1] == 10
    assert 49 in d and 0 not in d


def test_expiry():
    v = w.count_add(None, 0)
    assert not w.count_expired(v, 3600 * 23)
    assert w.count_expired(v, 3600 * 24)
    assert w.distinct_expired(w.distinct_add(None, 1, 0.0), 86400.0)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=3 * 86400), st.integers(0, 20)),
                min_size=1, max_size=80))
def test_add_read_in_one_call_equals_add_then_read(events):
    """count_add_read / distinct_add_read (the stages' one-call form) give the same value and the
    same counts as the two calls they replace, in or out of order."""
    v1 = v2 = d1 = d2 = None
    for t, m in events:
        v1 = w.count_add(v1, t)
        v2, *got = w.count_add_read(v2, t)
        assert v2 == v1 and tuple(got) == w.count_read(v1, t)
        d1 = w.distinct_add(d1, m, t)
        d2, *got = w.distinct_add_read(d2, m, t)
        assert d2 == d1 and tuple(got) == w.distinct_read(d1, t)


@settings(max_examples=100)
@given(st.lists(st.floats(min_value=0, max_value=4 * 86400), min_size=1, max_size=40),
       st.floats(min_value=0, max_value=6 * 86400))
def test_sweep_keeps_exactly_the_keys_expires_at_keeps(times, now):
    """The sweep's shortcut (a live request count keeps a key on one comparison) deletes the same
    keys as judging every value by expires_at."""
    from detector.core import state

    store = {}
    for i, t in enumerate(times):
        store[f"p{i}"] = w.count_add(None, t)
        ip = state.IpState()
        w.count_add(ip.requests, t)
        w.distinct_add(ip.numbers, i, t + 3600.0 * (i % 30))  # members may outlive the count
        store[f"i{i}"] = ip
        num = state.NumberState()
        w.count_add(num.requests, t)
        if i % 3 == 0:
            num.learned_deny_at = t + 40_000.0
        store[f"n{i}"] = num
    want = {k for k, v in store.items() if state.expires_at(v) > now}
    state.sweep(store, now)
    assert set(store) == want


def _reference_bump(buckets: dict[int, int], b: int, keep: int) -> None:
    """What a window must hold, stated plainly: events per bucket, only the buckets newer than
    the newest one minus ``keep`` (a late event older than that is dropped at once)."""
    buckets[b] = buckets.get(b, 0) + 1
    oldest_kept = max(buckets) - keep
    for old in [k for k in buckets if k <= oldest_kept]:
        del buckets[old]


def _listed(buckets: dict[int, int]) -> tuple[list[int], list[int]]:
    ids = sorted(buckets)
    return ids, [buckets[k] for k in ids]


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=4 * 86400), st.integers(0, 300),
                          st.booleans()), min_size=1, max_size=300))
def test_windows_and_sets_hold_what_the_list_based_code_held(events):
    """Mostly in order, sometimes late; sets beyond 64 members (stale members dropped): the
    array-based windows hold the buckets and counts the list-based ones held (so the binary form
    is unchanged), and the one-call reads equal the separate calls."""
    events = sorted(events, key=lambda e: e[0])
    events = [(t - 7200.0 * late * (i % 5 == 0), m, late) for i, (t, m, late) in enumerate(events)]
    v, by_minute, by_hour, d = None, {}, {}, None
    for t, m, _ in events:
        v, *got = w.count_add_read(v, t)
        _reference_bump(by_minute, int(t) // 60, w.MINUTE_BUCKETS_KEPT)
        _reference_bump(by_hour, int(t) // 3600, w.HOUR_BUCKETS_KEPT)
        ref = (*_listed(by_minute), *_listed(by_hour))
        assert (list(v.minutes), list(v.minute_counts), list(v.hours), list(v.hour_counts)) == ref
        assert tuple(got) == w.count_read(v, t)
        before = dict(d or {})
        d, *got = w.distinct_add_read(d, m, t)
        assert d == w.distinct_add(before, m, t) and tuple(got) == w.distinct_read(d, t)
    buf = bytearray()
    w.pack_window(v, buf)
    assert bytes(buf) == w._window_struct(len(ref[0]), len(ref[2])).pack(
        len(ref[0]), len(ref[2]), *ref[0], *ref[1], *ref[2], *ref[3])


@given(st.floats(min_value=0, max_value=4e9), st.lists(st.floats(min_value=-7200, max_value=7200),
                                                        max_size=5))
def test_a_one_event_window_reads_and_packs_as_an_array_window(t0, later):
    """count_first's tuple form: the same reads, equality and bytes as the arrays it becomes
    on the next write (and the arrays' bytes are those of Window(...) built from lists)."""
    first = w.count_first(t0)
    arrays = w.Window([int(t0) // 60], [1], [int(t0) // 3600], [1])
    assert type(first.minutes) is tuple and first == arrays and arrays == first
    for t in (t0, t0 + 60, t0 + 7200, t0 - 60):
        assert w.count_read(first, t) == w.count_read(arrays, t)
    assert w.count_expires_at(first) == w.count_expires_at(arrays)
    a, b = bytearray(), bytearray()
    w.pack_window(first, a)
    w.pack_window(arrays, b)
    assert a == b and w.unpack_window(bytes(a), 0)[0] == first
    for dt in later:
        t = max(0.0, t0 + dt)
        first, *got = w.count_add_read(first, t)
        arrays, *want = w.count_add_read(arrays, t)
        assert got == want and first == arrays
        a, b = bytearray(), bytearray()
        w.pack_window(first, a)
        w.pack_window(arrays, b)
        assert a == b
    assert w.count_add(w.count_first(t0), t0) == w.count_add(w.count_add(None, t0), t0)

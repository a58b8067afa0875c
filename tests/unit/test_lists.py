import pytest

from detector.core.errors import InvalidField
from detector.core.lists import ListIndex, entry_from_dict, make_entry


@pytest.mark.parametrize(
    ("kind", "value", "number", "ip", "asn", "hit"),
    [
        ("number", "+44 7400 123456", "+447400123456", "1.2.3.4", None, True),
        ("number", "+447400123456", "+447400123457", "1.2.3.4", None, False),
        ("prefix", "+252", "+252901234567", "1.2.3.4", None, True),
        ("prefix", "0044740", "+447400123456", "1.2.3.4", None, True),
        ("ip", "198.51.100.7", "+447400123456", "198.51.100.7", None, True),
        ("cidr", "198.51.100.0/24", "+447400123456", "198.51.100.200", None, True),
        ("cidr", "198.51.100.0/24", "+447400123456", "198.51.101.1", None, False),
        ("cidr", "2001:db8::/32", "+447400123456", "2001:db8:1::5", None, True),
        ("asn", "AS64500", "+447400123456", "1.2.3.4", 64500, True),
        ("country", "gb", "+447400123456", "1.2.3.4", None, True),
    ],
)
def test_deny_matching(kind, value, number, ip, asn, hit):
    idx = ListIndex([make_entry("deny", kind, value)])
    denied, allowed = idx.match(number, "GB", ip, "FR", asn, now=0.0)
    assert (kind in denied) is hit
    assert allowed is False


def test_expiry_and_removal():
    e = make_entry("deny", "ip", "192.0.2.1", expires_at=100.0)
    idx = ListIndex([e])
    assert idx.match(None, None, "192.0.2.1", None, None, now=99.0)[0] == ["ip"]
    assert idx.match(None, None, "192.0.2.1", None, None, now=100.0)[0] == []
    idx.remove(e.key)
    assert len(idx) == 0


@pytest.mark.parametrize(
    ("d", "needle"),
    [
        ({"action": "deny", "kind": "ip", "value": "nope"}, "IPv4 or IPv6"),
        ({"action": "deny", "kind": "number", "value": "07400"}, "starting with +"),
        ({"action": "maybe", "kind": "ip", "value": "1.2.3.4"}, "deny or allow"),
        ({"action": "deny", "kind": "planet", "value": "x"}, "one of ip, cidr"),
        ({"action": "deny", "kind": "ip", "value": "1.2.3.4", "expires_at": "soon"}, "epoch seconds"),
        ({"action": "deny", "kind": "ip"}, "'value'"),
    ],
)
def test_bad_entries_are_explained(d, needle):
    with pytest.raises(InvalidField, match=needle):
        entry_from_dict(d)


def test_entry_round_trip():
    e = make_entry("allow", "prefix", "+4420", reason="vip", expires_at=5.0, added_at=1.0)
    assert entry_from_dict(e.to_dict()) == e
    assert e.key == "allow:prefix:+4420"

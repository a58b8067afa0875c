import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.core.errors import InputError, InvalidField, MalformedMessage, MissingField
from detector.core.parse import parse_request

BASE = {"request_id": "r-1", "ts": 1795341600, "phone_number": "+442079460018", "ip": "81.2.69.142"}


def with_(**kw):
    d = dict(BASE)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    ("raw", "exc", "needle"),
    [
        (b"", MalformedMessage, "empty"),
        (b"\xff\xfe{", MalformedMessage, "UTF-8"),
        (b"{not json", MalformedMessage, "not JSON"),
        (b"[1, 2]", MalformedMessage, "JSON list"),
        (json.dumps(with_(request_id=...)).encode(), MissingField, "'request_id' is missing"),
        (json.dumps(with_(request_id="")).encode(), InvalidField, "non-empty string"),
        (json.dumps(with_(ts=...)).encode(), MissingField, "'ts'"),
        (json.dumps(with_(ts=1795341600000)).encode(), InvalidField, "not milliseconds"),
        (json.dumps(with_(ts="yesterday")).encode(), InvalidField, "RFC 3339"),
        (json.dumps(with_(ts="2026-11-22T10:00:00")).encode(), InvalidField, "time zone"),
        (json.dumps(with_(ts=True)).encode(), InvalidField, "'ts'"),
        (json.dumps(with_(phone_number=12345)).encode(), InvalidField, "'phone_number': expected a string"),
        (json.dumps(with_(ip="999.1.1.1")).encode(), InvalidField, "'ip': expected an IPv4 or IPv6 address, got '999.1.1.1'"),
        (json.dumps(with_(ip=...)).encode(), MissingField, "'ip'"),
        (json.dumps(with_(country_hint="GBR")).encode(), InvalidField, "country_hint"),
        (json.dumps(with_(authenticated="yes")).encode(), InvalidField, "true or false"),
    ],
)
def test_malformed_inputs_explain_themselves(raw, exc, needle):
    with pytest.raises(exc) as info:
        parse_request(raw)
    assert needle in str(info.value)
    assert isinstance(info.value, InputError)
    assert info.value.kind in {"malformed_json", "missing_field", "invalid_field"}


def test_valid_request_normalizes_fields():
    r = parse_request(with_(ip="::ffff:81.2.69.142", country_hint="gb", ts="2026-11-22T10:00:00+01:00",
                            authenticated=True, extra_field="ignored"))
    assert r.ip == "81.2.69.142"
    assert r.country_hint == "GB"
    assert r.ts == 1795338000.0
    assert r.authenticated is True


def test_null_optional_fields_are_defaults():
    r = parse_request(with_(user_id=None, authenticated=None, country_hint=None))
    assert (r.user_id, r.authenticated, r.country_hint) == (None, False, None)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_input_error(raw):
    try:
        parse_request(raw)
    except InputError as exc:
        assert str(exc)


@given(
    st.text(min_size=1, max_size=40).filter(lambda s: s.strip()),
    st.floats(min_value=946_684_800, max_value=4_102_444_800),
    st.ip_addresses().map(str),
)
def test_round_trip_of_valid_requests(rid, ts, ip):
    r = parse_request({"request_id": rid, "ts": ts, "phone_number": "+33 1 23 45 67 89", "ip": ip})
    again = parse_request(json.dumps(r.to_dict()))
    assert again == r


_PARTS = st.sampled_from(["0", "00", "1", "09", "010", "99", "100", "199", "200", "249", "250",
                          "255", "256", "300", "1000", "", "2a", "٣"])


@given(st.lists(_PARTS, min_size=3, max_size=5), st.sampled_from(["", " ", "\n"]))
def test_parse_ip_fast_path_is_ipaddress(parts, pad):
    """The canonical-IPv4 shortcut gives exactly what ``ipaddress`` gives, errors included."""
    import ipaddress

    text = pad + ".".join(parts) + pad
    try:
        expected: str | None = str(ipaddress.ip_address(text.strip()))
    except ValueError:
        expected = None
    _assert_parse_ip(text, expected)


_HEXTETS = st.lists(st.sampled_from([0, 0, 0, 1, 0x10, 0xABC, 0xFFFF, 0x2001, 0xDB8]), min_size=8,
                    max_size=8)


@given(_HEXTETS, st.integers(0, 7), st.text(alphabet="0123456789abcdef:", max_size=24))
def test_parse_ip_ipv6_shortcut_is_ipaddress(hextets, variant, noise):
    """The canonical-IPv6 shortcut gives exactly what ``ipaddress`` gives (IPv4-mapped
    addresses unwrapped), for canonical texts, other spellings of them, and noise."""
    import ipaddress

    addr = ipaddress.IPv6Address(int("".join(f"{h:04x}" for h in hextets), 16))
    canonical = str(addr)
    text = [canonical, addr.exploded, canonical.upper(), canonical.replace("::", ":0:", 1),
            "::" + canonical, canonical.replace(":", "::", 1), canonical + "%eth0", noise][variant]
    try:
        found = ipaddress.ip_address(text)
        if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
            found = found.ipv4_mapped
        expected: str | None = str(found)
    except ValueError:
        expected = None
    _assert_parse_ip(text, expected)


def _assert_parse_ip(text: str, expected: str | None) -> None:
    """``parse_ip(text)`` gives ``expected``, or refuses the text when ``expected`` is None."""
    from detector.core.parse import parse_ip

    if expected is None:
        with pytest.raises(InvalidField):
            parse_ip(text)
    else:
        assert parse_ip(text) == expected

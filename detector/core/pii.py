"""The one keyed hash of the detector: every hashed identifier (the decision's ``ip_hash``, the
members of distinct-count sets) goes through :func:`hash_id`.

HMAC-SHA256 (RFC 2104, :mod:`hmac`) truncated to 64 bits, hex. A key longer than SHA-256's
64-byte block is hashed first, as HMAC specifies, so every byte of a long key counts (a keyed
BLAKE2b would have to cut it at 64 bytes). Without the key, the hash of an IPv4 address cannot
be reversed by hashing all 2^32 addresses, which is why the key must be secret and must not be
the development default (see :data:`DEV_DEFAULT_KEY` and ``DETECTOR_PII_HASH_KEY``).

>>> hash_id("203.0.113.9", b"k")
'317fe07e1ac9940e'
>>> hash_id("203.0.113.9", b"k" * 200) != hash_id("203.0.113.9", b"k" * 64)
True
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

DEV_DEFAULT_KEY = "change-me-in-production"  # the development default: known, so never in production
MIN_KEY_BYTES = 16


def hash_id(text: str, key: bytes) -> str:
    """Keyed 16-hex-digit hash of an identifier (HMAC-SHA256, first 8 bytes): :func:`hash_int`'s
    64 bits in hex (one computation and one memo for both forms)."""
    return f"{hash_int(text, key):016x}"


class _Keyed:
    """One key's HMAC-SHA256 state after the key (RFC 2104: SHA-256 of the key XOR the inner and
    outer pads, a key longer than the 64-byte block hashed first, as :mod:`hmac` does) and its
    memo of hashed identifiers: the reference, and the fallback where the C extension
    ``detector.core._keyed`` (the same, with OpenSSL's SHA-256) is not built."""

    __slots__ = ("inner", "outer", "memo")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self.memo: dict[str, int] = {}

    def hash(self, text: str) -> int:
        memo = self.memo
        h = memo.get(text)
        if h is None:
            inner = self.inner.copy()
            inner.update(text.encode("utf-8", "surrogatepass"))
            outer = self.outer.copy()
            outer.update(inner.digest())
            h = int.from_bytes(outer.digest()[:8], "big")
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[text] = h
        return h


try:  # the same in C (core/_keyed.c); the class above is the reference
    from detector.core import _keyed as _native
except ImportError:  # not built (no C compiler or OpenSSL headers at install)
    _native = None  # type: ignore[assignment]
NATIVE = _native is not None

_BLOCK = 64  # SHA-256's block size
_MEMO_MAX = 1 << 17  # identifiers remembered per key; the memo is emptied when full
_keyed: dict[bytes, Callable[[str], int]] = {}  # key -> its memoized hash


def hash_int(text: str, key: bytes) -> int:
    """:func:`hash_id` as an integer (the same 64 bits): the compact form kept in distinct-count
    sets.

    The same IPs and numbers recur, so hashes are memoized per key (a dict emptied when full:
    a hit costs a lookup, where an LRU cache cost more per call than the miss it saved on a day's
    traffic); a miss copies the key's prepared SHA-256 states (2 copies, 2 updates, 2 digests)
    instead of :mod:`hmac`'s Python-level copy of its object, in C where it is built.

    >>> hash_int("203.0.113.9", b"k") == int(hash_id("203.0.113.9", b"k"), 16)
    True
    """
    fn = _keyed.get(key)
    if fn is None:
        if len(_keyed) >= 8:  # keys seen by this process (one in production): bounded
            _keyed.clear()
        fn = _keyed[key] = (_native.Keyed(key, _MEMO_MAX) if NATIVE else _Keyed(key)).hash
    return fn(text)


def _forget() -> None:
    """Empty the memos (benchmarks start each run cold, as with ``functools.lru_cache``)."""
    _keyed.clear()


hash_int.cache_clear = _forget  # type: ignore[attr-defined]


_PROCESS_KEY = os.urandom(32)


def random_key() -> bytes:
    """This process's random key, for contexts built without a configured one: it is secret and
    the same for every such context of the process, but its hashes match no other process's."""
    return _PROCESS_KEY

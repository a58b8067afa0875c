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
import hmac
import os
from functools import lru_cache

DEV_DEFAULT_KEY = "change-me-in-production"  # the development default: known, so never in production
MIN_KEY_BYTES = 16


@lru_cache(maxsize=65536)  # the same IPs and numbers recur; a hit costs 0.1 us, a miss 1.2 us
def hash_id(text: str, key: bytes) -> str:
    """Keyed 16-hex-digit hash of an identifier (HMAC-SHA256, first 8 bytes)."""
    h = _keyed(key).copy()
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()[:8].hex()


@lru_cache(maxsize=65536)
def hash_int(text: str, key: bytes) -> int:
    """:func:`hash_id` as an integer (the same 64 bits): the compact form kept in distinct-count
    sets.

    >>> hash_int("203.0.113.9", b"k") == int(hash_id("203.0.113.9", b"k"), 16)
    True
    """
    h = _keyed(key).copy()
    h.update(text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:8], "big")


@lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    """HMAC state after the key (its inner and outer pads), copied per message."""
    return hmac.new(key, digestmod=hashlib.sha256)


_PROCESS_KEY = os.urandom(32)


def random_key() -> bytes:
    """This process's random key, for contexts built without a configured one: it is secret and
    the same for every such context of the process, but its hashes match no other process's."""
    return _PROCESS_KEY

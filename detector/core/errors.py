"""Every error the detector raises on purpose.

Exception tree::

    DetectorError
    ├── InputError              a message from outside does not follow the contract
    │   ├── MalformedMessage    not UTF-8 / not JSON / not a JSON object
    │   ├── MissingField        a required field is absent or null
    │   ├── InvalidField        a field is present but of the wrong type or form
    │   ├── MessageTooLarge     more bytes than any valid message of its type can have
    │   ├── EventTimeOutOfRange the event time is too far ahead of / behind the clock
    │   └── UntrustedEntry      a list entry that is unsigned, badly signed or not permitted
    ├── ConfigError             settings or environment are wrong (raised at start-up)
    │   └── PolicyError         the TOML policy file is invalid
    └── ModelError              a model artefact is missing, corrupt or incompatible

``InputError.kind`` is a short stable code (``malformed_json``, ``missing_field``, ...) used as
the dead-letter reason and as a bounded metric label; ``str(err)`` is the human explanation.
"""

from __future__ import annotations


class DetectorError(Exception):
    """Base class of every error raised by the detector on purpose."""


class InputError(DetectorError):
    """A message does not follow the contract. ``kind`` is a stable machine-readable code."""

    kind = "invalid_input"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class MalformedMessage(InputError):
    """The bytes are not UTF-8 JSON holding one object."""

    kind = "malformed_json"


class MissingField(InputError):
    """A required field is absent or null."""

    kind = "missing_field"

    def __init__(self, field: str) -> None:
        super().__init__(f"required field {field!r} is missing", field=field)


class InvalidField(InputError):
    """A field has the wrong type or form; the message says what was expected and what arrived."""

    kind = "invalid_field"

    def __init__(self, field: str, expected: str, got: object) -> None:
        shown = _shown(got)
        super().__init__(f"field {field!r}: expected {expected}, got {shown}", field=field)
        self.expected = expected


class MessageTooLarge(InputError):
    """The message is larger than any valid message of its type (checked before parsing)."""

    kind = "message_too_large"


class EventTimeOutOfRange(InputError):
    """The event time is further ahead of or behind the clock than the configured skew allows."""

    kind = "event_time_out_of_range"


class UntrustedEntry(InputError):
    """A ``detector-lists`` entry that is not signed by a trusted key, or that its key may not sign.

    ``reason`` is one of :data:`detector.core.signing.REJECT_REASONS` (a bounded metric label)."""

    kind = "untrusted_entry"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _shown(got: object, limit: int = 80) -> str:
    """A short repr of an untrusted value: bounded work and length whatever arrived (``repr`` of
    a 10**5000 integer raises, of a list nested 100,000 deep recurses, of 1 MB copies 1 MB)."""
    if isinstance(got, str):
        shown = repr(got[:limit])
    elif isinstance(got, bool) or got is None or isinstance(got, float):
        shown = repr(got)
    elif isinstance(got, int):
        shown = repr(got) if -(10**30) < got < 10**30 else f"an integer of {got.bit_length()} bits"
    elif isinstance(got, dict):
        shown = f"an object of {len(got)} key(s)"
    elif isinstance(got, list | tuple):
        shown = f"an array of {len(got)} item(s)"
    else:
        shown = f"a {type(got).__name__}"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class ConfigError(DetectorError):
    """Settings, environment or files given at start-up are wrong."""


class PolicyError(ConfigError):
    """The policy TOML is invalid; the message names the key and the problem."""


class ModelError(DetectorError):
    """A model artefact is missing, corrupt or does not match the feature set."""

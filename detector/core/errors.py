"""Every error the detector raises on purpose.

Exception tree::

    DetectorError
    ├── InputError              a message from outside does not follow the contract
    │   ├── MalformedMessage    not UTF-8 / not JSON / not a JSON object
    │   ├── MissingField        a required field is absent or null
    │   └── InvalidField        a field is present but of the wrong type or form
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
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"field {field!r}: expected {expected}, got {shown}", field=field)
        self.expected = expected


class ConfigError(DetectorError):
    """Settings, environment or files given at start-up are wrong."""


class PolicyError(ConfigError):
    """The policy TOML is invalid; the message names the key and the problem."""


class ModelError(DetectorError):
    """A model artefact is missing, corrupt or does not match the feature set."""

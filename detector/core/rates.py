"""The rate deck: what a callback to a destination costs per minute (longest E.164 prefix wins).

A CSV file (``DETECTOR_RATE_DECK``; the package carries an ILLUSTRATIVE sample, not a real
tariff) with the columns ``prefix,cost_per_min,currency,description``::

    # comments and blank lines are ignored; the header line is optional
    prefix,cost_per_min,currency,description
    +,0.50,EUR,anything else (unknown destinations priced high)
    +44,0.01,EUR,United Kingdom
    +447,0.02,EUR,United Kingdom mobile
    +449,1.50,EUR,United Kingdom premium rate

* ``prefix``: ``+`` and 0 to 15 digits; ``+`` alone matches every number (the catch-all);
* ``cost_per_min``: a decimal number >= 0 (at most :data:`MAX_COST_PER_MIN`);
* ``currency``: an ISO 4217 code, the same on every line (budgets are sums of money);
* ``description``: free text (optional).

Every error names the file and the line (``deck.csv:7: cost_per_min: expected ...``).
A lookup walks the deck's distinct prefix lengths, longest first: a few dict look-ups.

>>> deck = parse_rate_deck("prefix,cost_per_min,currency,description\\n+44,0.01,EUR,UK\\n"
...                        "+447,0.02,EUR,UK mobile\\n", "deck.csv")
>>> deck.lookup("+447700900123").cost_per_min, deck.lookup("+442079460018").prefix
(0.02, '+44')
>>> deck.lookup("+33142685300") is None
True
>>> parse_rate_deck("+44,cheap,EUR,UK\\n", "deck.csv")
Traceback (most recent call last):
...
detector.core.errors.ConfigError: deck.csv:1: cost_per_min: expected a number >= 0, got 'cheap'
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from detector.core.errors import ConfigError

COLUMNS = ("prefix", "cost_per_min", "currency", "description")
MAX_COST_PER_MIN = 10_000.0
MAX_LINES = 1_000_000
PACKAGED_NAME = "rate-deck.sample.csv"  # detector/data/ (examples/ links to it)


@dataclass(frozen=True, slots=True)
class Rate:
    """One line of the deck: numbers starting with ``prefix`` cost ``cost_per_min`` a minute."""

    prefix: str
    cost_per_min: float
    currency: str
    description: str = ""


class RateDeck:
    """Prefix -> :class:`Rate`, longest prefix wins. ``version``: a digest of the file's content."""

    def __init__(self, rates: dict[str, Rate], currency: str, *, source: str = "", version: str = "") -> None:
        self.rates = rates
        self.currency = currency
        self.source = source
        self.version = version
        self._lengths = sorted({len(p) for p in rates}, reverse=True)
        # The last lookup: a decision prices its number, then its spend breakers look it up again.
        self._last: tuple[str | None, Rate | None] = (None, None)

    def __len__(self) -> int:
        return len(self.rates)

    def lookup(self, e164: str | None) -> Rate | None:
        """The rate of the longest prefix of ``e164`` in the deck (None: no line matches)."""
        if not e164:
            return None
        last = self._last
        if last[0] == e164:
            return last[1]
        rates = self.rates
        n = len(e164)
        found = None
        for k in self._lengths:
            if k <= n:
                found = rates.get(e164[:k])
                if found is not None:
                    break
        self._last = (e164, found)
        return found

    def describe(self) -> str:
        return (f"{len(self)} prefixes in {self.currency} from {self.source or 'memory'} "
                f"(version {self.version})")


def _line_error(source: str, lineno: int, message: str) -> ConfigError:
    return ConfigError(f"{source}:{lineno}: {message}")


def parse_rate_deck(text: str, source: str = "<rate deck>") -> RateDeck:
    """Validate a rate deck's text; :class:`ConfigError` naming ``source:line`` on any problem."""
    rates: dict[str, Rate] = {}
    currency: str | None = None
    first_currency_line = 0
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise ConfigError(f"{source}: {len(lines):,} lines; at most {MAX_LINES:,}")
    header_seen = False
    for lineno, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            (row,) = list(csv.reader([stripped]))
        except (csv.Error, ValueError) as exc:
            raise _line_error(source, lineno, f"not a CSV line ({exc})") from None
        cells = [c.strip() for c in row]
        if not header_seen and not rates and cells and cells[0].lower() == "prefix":
            if [c.lower() for c in cells] not in (list(COLUMNS), list(COLUMNS[:3])):
                raise _line_error(source, lineno,
                                  f"header: expected {','.join(COLUMNS)}, got {stripped[:80]!r}")
            header_seen = True
            continue
        if not 3 <= len(cells) <= 4:
            raise _line_error(source, lineno, f"expected {len(COLUMNS)} columns ({','.join(COLUMNS)}; "
                                              f"description optional), got {len(cells)}")
        prefix, cost_text, cur = cells[0], cells[1], cells[2]
        desc = cells[3] if len(cells) > 3 else ""
        digits = prefix[1:]
        if (not prefix.startswith("+") or len(digits) > 15
                or not (digits == "" or (digits.isascii() and digits.isdigit()))):
            raise _line_error(source, lineno,
                              f"prefix: expected '+' and 0 to 15 digits (E.164), got {prefix[:40]!r}")
        try:
            cost = float(cost_text)
        except ValueError:
            cost = math.nan
        if math.isfinite(cost) and cost > MAX_COST_PER_MIN:
            raise _line_error(source, lineno,
                              f"cost_per_min: {cost:g} is over the limit of {MAX_COST_PER_MIN:g} a minute")
        if not math.isfinite(cost) or cost < 0:
            raise _line_error(source, lineno, f"cost_per_min: expected a number >= 0, got {cost_text[:40]!r}")
        if len(cur) != 3 or not cur.isascii() or not cur.isalpha() or not cur.isupper():
            raise _line_error(source, lineno,
                              f"currency: expected an ISO 4217 code such as EUR, got {cur[:20]!r}")
        if currency is None:
            currency, first_currency_line = cur, lineno
        elif cur != currency:
            raise _line_error(source, lineno, f"currency {cur} differs from {currency} (line "
                                              f"{first_currency_line}): one currency per deck")
        if prefix in rates:
            raise _line_error(source, lineno, f"prefix {prefix} appears twice")
        rates[prefix] = Rate(prefix, cost, cur, desc)
    if not rates or currency is None:
        raise ConfigError(f"{source}: no rates (expected lines of {','.join(COLUMNS)})")
    version = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return RateDeck(rates, currency, source=source, version=version)


def load_rate_deck(path: Path | str | None = None) -> RateDeck:
    """Load a rate deck file, or the packaged ILLUSTRATIVE sample when ``path`` is None."""
    if path is None:
        return packaged_rate_deck()
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read rate deck {str(p)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rate deck {str(p)!r} is not UTF-8 (byte {exc.start})") from None
    return parse_rate_deck(text.removeprefix("\ufeff"), str(p))


@lru_cache(maxsize=1)
def packaged_rate_deck() -> RateDeck:
    """The ILLUSTRATIVE sample deck shipped in the package (``detector/data``; not a real tariff)."""
    text = resources.files("detector").joinpath("data", PACKAGED_NAME).read_text("utf-8")
    return parse_rate_deck(text, f"packaged {PACKAGED_NAME}")

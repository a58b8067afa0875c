"""Policy hot reload: a running worker picks up a changed policy file without a restart.

:class:`PolicyWatcher` polls the file's modification time (``DETECTOR_POLICY_RELOAD_S``). A
changed file is loaded and validated like at start-up; a valid one replaces the running policy
(and its static ``[deny]``/``[allow]`` list entries), an invalid one is rejected with its error in
the log and ``detector_policy_reload_failures_total``, and the previous policy keeps deciding.
Every decision names the policy it was made under (``policy_version``).

A change of ``ranges.trailing_digits`` is rejected too: it changes the range stage's partitioning
key, which a running deployment cannot do without a restart of every worker.

The rate deck (``DETECTOR_RATE_DECK``) is watched the same way: a changed deck that validates and
is in the policy's ``spend.currency`` replaces the running one; an invalid one is rejected with its
``file:line`` error and the previous deck keeps pricing. A new policy whose ``spend.currency``
differs from the running deck's is rejected too (budgets and prices must be in one currency).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from detector.core.decide import DecisionContext
from detector.core.errors import ConfigError, PolicyError
from detector.core.lists import ListIndex
from detector.core.policy import Policy, load_policy
from detector.core.rates import load_rate_deck
from detector.core.spend import check_currency

log = logging.getLogger("detector.policy")


def swap_policy(ctx: DecisionContext, new: Policy) -> None:
    """Make ``new`` the policy of ``ctx``: replace the old policy's list entries by the new one's
    (entries from the lists topic, SOC or learned, are kept)."""
    for e in ctx.lists.entries():
        if e.source == "policy":
            ctx.lists.remove(e.key)
    for e in ListIndex.from_policy(dict(new.deny), dict(new.allow)).entries():
        ctx.lists.add(e)
    ctx.policy = new


class PolicyWatcher:
    """Reloads the policy file of ``ctx`` when it changes. Call :meth:`check` periodically."""

    def __init__(self, path: Path | str | None, ctx: DecisionContext,
                 deck_path: Path | str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.deck_path = None if deck_path is None else Path(deck_path)
        self.ctx = ctx
        self._stamp = self._stat(self.path)
        self._deck_stamp = self._stat(self.deck_path)
        self.last_error: str | None = None

    @staticmethod
    def _stat(path: Path | None) -> tuple[int, int] | None:
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def check_deck(self) -> bool:
        """Reload the rate deck when its file changed; True when a new deck now prices decisions."""
        stamp = self._stat(self.deck_path)
        if self.deck_path is None or stamp is None or stamp == self._deck_stamp:
            return False
        self._deck_stamp = stamp
        from detector import metrics

        old = self.ctx.rates
        try:
            deck = load_rate_deck(self.deck_path)
            check_currency(self.ctx.policy.spend, deck)
        except ConfigError as exc:
            self.last_error = str(exc)
            metrics.POLICY_RELOAD_FAILURES.inc()
            log.error("rate deck: new file rejected, keeping %s: %s",
                      old.version if old is not None else "none", exc)
            return False
        self.ctx.rates = deck
        self.last_error = None
        metrics.POLICY_RELOADS.inc()
        metrics.set_rate_deck_info(deck)
        log.info("rate deck: reloaded %s (was %s)", deck.describe(),
                 old.version if old is not None else "none")
        return True

    def check(self) -> Policy | None:
        """Reload the policy (and the rate deck, :meth:`check_deck`) when its file changed; returns
        the new policy, or None (unchanged or rejected)."""
        self.check_deck()
        stamp = self._stat(self.path)
        if self.path is None or stamp is None or stamp == self._stamp:
            return None
        self._stamp = stamp  # a rejected file is not retried until it changes again
        old = self.ctx.policy
        try:
            new = load_policy(self.path)
            if new.range_digits != old.range_digits:
                raise PolicyError(
                    f"ranges.trailing_digits changed from {old.range_digits} to {new.range_digits}: "
                    "it changes the range stage's partitioning and needs a restart of every worker"
                )
            check_currency(new.spend, self.ctx.rates)
        except ConfigError as exc:
            from detector import metrics

            self.last_error = str(exc)
            metrics.POLICY_RELOAD_FAILURES.inc()
            log.error("policy: new file rejected, keeping %s: %s", old.version, exc)
            return None
        swap_policy(self.ctx, new)
        self.last_error = None
        from detector import metrics

        metrics.POLICY_RELOADS.inc()
        metrics.POLICY_INFO.info({"version": new.version, "path": str(self.path)})
        metrics.set_known_reasons(new.reason_codes())
        metrics.set_spend_countries(new)
        log.info("policy: reloaded %s (was %s) from %s", new.version, old.version, self.path)
        return new

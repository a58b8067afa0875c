"""Policy hot reload: a running worker picks up a changed policy file without a restart.

:class:`PolicyWatcher` polls the file's modification time (``DETECTOR_POLICY_RELOAD_S``). A
changed file is loaded and validated like at start-up; a valid one replaces the running policy
(and its static ``[deny]``/``[allow]`` list entries), an invalid one is rejected with its error in
the log and ``detector_policy_reload_failures_total``, and the previous policy keeps deciding.
Every decision names the policy it was made under (``policy_version``).

A change of ``ranges.trailing_digits`` is rejected too: it changes the range stage's partitioning
key, which a running deployment cannot do without a restart of every worker.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from detector.core.decide import DecisionContext
from detector.core.errors import PolicyError
from detector.core.lists import ListIndex
from detector.core.policy import Policy, load_policy

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

    def __init__(self, path: Path | str | None, ctx: DecisionContext) -> None:
        self.path = None if path is None else Path(path)
        self.ctx = ctx
        self._stamp = self._stat()
        self.last_error: str | None = None

    def _stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def check(self) -> Policy | None:
        """Reload when the file changed; returns the new policy, or None (unchanged or rejected)."""
        stamp = self._stat()
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
        except PolicyError as exc:
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
        log.info("policy: reloaded %s (was %s) from %s", new.version, old.version, self.path)
        return new

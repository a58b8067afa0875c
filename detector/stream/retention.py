"""Retention of every topic the detector creates (requests, numbers, IPs and user ids are PII:
nothing is kept forever by default).

One function per topic role turns the ``retention_*`` settings into Kafka topic configs; they
are applied wherever a topic is created: ``detector topics`` and the worker's start-up
(:func:`detector.stream.io.topic_specs`), and Faust's own declarations of the internal topics
and the table changelogs (:mod:`detector.stream.app`).

* delete-only topics get ``retention.ms`` and a ``segment.ms`` of at most a day, so a message is
  deleted at most a day after its retention ends (Kafka deletes whole closed segments only);
* table changelogs are ``compact,delete``: compaction keeps the latest value per key, and a key
  not written for ``retention_changelog`` is deleted (the core's windows span 24 h; a live key
  is rewritten long before);
* the lists topic stays compacted only (an entry lives until removed); removals (tombstones)
  are kept ``retention_list_tombstones`` so a lagging reader still sees them, and
  ``max.compaction.lag.ms`` bounds how long a removed entry's old value stays on disk.
"""

from __future__ import annotations

from detector.config import Settings

# The worker's tables (detector.stream.app.make_app); their changelogs are <app_id>-<table>-changelog.
CHANGELOG_TABLES = ("ip", "number", "pair", "range", "seen")
DAY_MS = 86_400_000


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def delete_config(seconds: float) -> dict[str, str]:
    """Config of a delete-policy topic keeping messages ``seconds``.

    >>> delete_config(7 * 86400)
    {'cleanup.policy': 'delete', 'retention.ms': '604800000', 'segment.ms': '86400000'}
    """
    ms = _ms(seconds)
    return {"cleanup.policy": "delete", "retention.ms": str(ms), "segment.ms": str(min(ms, DAY_MS))}


def inputs_config(s: Settings) -> dict[str, str]:
    """callback-requests, callback-outcomes."""
    return delete_config(s.retention_inputs)


def internal_config(s: Settings) -> dict[str, str]:
    """<app>-by-ip, <app>-by-range (the enrichment chain's repartition topics)."""
    return delete_config(s.retention_internal)


def queue_state_config(s: Settings) -> dict[str, str]:
    """<app>-queue-state (the dialers' queue states; no PII): the internal topics' retention.
    Workers read back 15 minutes at start, so the retention only bounds the disk."""
    return delete_config(s.retention_internal)


def decisions_config(s: Settings) -> dict[str, str]:
    return delete_config(s.retention_decisions)


def dead_letter_config(s: Settings) -> dict[str, str]:
    return delete_config(s.retention_dead_letter)


def changelog_config(s: Settings) -> dict[str, str]:
    """Table changelogs: compacted, and keys idle for ``retention_changelog`` deleted."""
    ms = _ms(s.retention_changelog)
    return {"cleanup.policy": "compact,delete", "retention.ms": str(ms),
            "segment.ms": str(min(ms, DAY_MS))}


def lists_config(s: Settings) -> dict[str, str]:
    """The compacted lists topic: tombstones kept ``retention_list_tombstones``."""
    tomb = _ms(s.retention_list_tombstones)
    return {"cleanup.policy": "compact", "delete.retention.ms": str(tomb),
            "max.compaction.lag.ms": str(max(tomb, DAY_MS)), "segment.ms": str(DAY_MS)}


def changelog_topic(s: Settings, table: str) -> str:
    """Faust's changelog topic name of ``table`` (``Collection._changelog_topic_name``)."""
    return f"{s.app_id}-{table}-changelog"

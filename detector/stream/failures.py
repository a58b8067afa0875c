"""An unexpected exception while processing one request: dead-letter it, count it, go on.

A bug must neither stop the worker nor drop the request silently: the request goes to the
dead-letter topic with error kind ``internal_error`` and ``detector_internal_errors_total{stage}``
counts it. Logs and the record's ``error`` name the exception type and where it was raised
(file:line, function), never its message or a traceback with local values: both may carry the
request's phone number or IP. The original message is in the dead letter for whoever replays it.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from detector import metrics
from detector.stream import codec

log = logging.getLogger("detector.stream")

INTERNAL_ERROR = "internal_error"
_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../detector


def describe(exc: BaseException) -> str:
    """``KeyError at detector/core/state.py:120 in range_stage``: the exception type and the
    innermost frame of the detector package that raised it (the innermost frame if none)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(Path(f.filename).resolve()).startswith(_PACKAGE)]
    if not frames:
        return type(exc).__name__
    frame = (ours or frames)[-1]
    path = Path(frame.filename)
    try:
        path = path.resolve().relative_to(Path(_PACKAGE).parent)
    except ValueError:
        path = Path(path.name)
    return f"{type(exc).__name__} at {path}:{frame.lineno} in {frame.name}"


def is_kafka_error(exc: BaseException) -> bool:
    """A failure to talk to Kafka (not a bug in processing the request): the caller crashes the
    worker instead of dead-lettering a request that is fine (see :func:`guard.crash`)."""
    from aiokafka.errors import KafkaError

    return isinstance(exc, KafkaError)


def internal_error_record(exc: BaseException, *, stage: str, topic: str, partition: int,
                          offset: int, original: bytes | None, key: bytes | None = None,
                          timestamp: float | None = None) -> dict[str, Any]:
    """Log (without input), count, and build the dead-letter record of one failed request."""
    where = describe(exc)
    log.error("%s: internal error processing %s[%d]@%d: %s; the request goes to the dead-letter "
              "topic", stage, topic, partition, offset, where)
    metrics.INTERNAL_ERRORS.labels(stage).inc()
    return codec.dead_letter(kind=INTERNAL_ERROR, error=f"{stage} stage: {where}", topic=topic,
                             partition=partition, offset=offset, original=original, key=key,
                             timestamp=timestamp)


async def dead_letter_internal(rt: Any, exc: BaseException, *, stage: str, topic: str,
                               partition: int, offset: int, original: bytes | None,
                               key: bytes | None = None, timestamp: float | None = None) -> None:
    """:func:`internal_error_record`, sent to the dead-letter topic."""
    record = internal_error_record(exc, stage=stage, topic=topic, partition=partition,
                                   offset=offset, original=original, key=key, timestamp=timestamp)
    await send_dead_letter(rt, record, key)


async def send_dead_letter(rt: Any, record: dict[str, Any], key: bytes | None) -> None:
    await rt.send("dlq", key, codec.dumps(record))
    metrics.DEAD_LETTERS.labels(record["topic"], record["error_kind"]).inc()

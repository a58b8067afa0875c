"""The ip stage: requests counted per client IP.

* **input**: a validated request, from the ingest agent (keyed by IP on the right partition: no
  hop) or from ``<app>-by-ip`` (key = IP; value ``{"r": request, "src": [partition, offset],
  "kts": ...}``, ``src`` locating the request on ``callback-requests``).
* **table**: ``ip`` (:class:`~detector.core.state.IpState` per address; watermark per source of
  ``callback-requests``, see :mod:`detector.stream.ledger`).
* **output**: ``<app>-by-range``, keyed by the number's range: the request, its enrichment
  (phone and IP: the range stage does not parse or look up again) and its IP counts.

Each request is counted and forwarded at once. Its table write stays in the batch, where later
requests from the same address update it; :meth:`IpStage.flush` (every ``DETECTOR_BATCH_MS``,
and before a rebalance) sends one changelog message per address written, then acks the batch's
events, so no offset is committed before the state it counted is on its way to Kafka.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from detector import metrics
from detector.core import state
from detector.core.pipeline import enrich, range_routing_key
from detector.core.records import CallbackRequest
from detector.stream import codec
from detector.stream.ledger import ip_source
from detector.stream.tables import StateTable


class IpStage:
    def __init__(self, rt: Any, table: StateTable) -> None:
        self.rt = rt
        self.table = table
        self.acks: list[Callable[[], Any]] = []
        self.lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.acks)

    async def count(self, req: CallbackRequest, wire: dict[str, Any] | None, *, source: int,
                    offset: int, kts: float | None, partition: int,
                    ack: Callable[[], Any] | None = None) -> None:
        """Count ``req`` (exactly once per source message) and forward it keyed by range;
        ``ack`` runs after the batch's flush."""
        rt = self.rt
        rt.max_ts = max(rt.max_ts, req.ts)
        enr = enrich(req, rt.intel, rt.policy)
        view = self.table.view(partition, source, offset)
        counts = state.ip_stage(state.IpStores(ip=view), req, enr, rt.policy.shared_ip,
                                key=rt.ctx.pii_key)
        if view.redelivered:
            metrics.DUPLICATES.labels("ip").inc()
            # The copy was counted once more than the stored value: undo that in what we forward.
            counts = dataclasses.replace(counts, ip_15m=max(counts.ip_15m - 1, 1),
                                         ip_1h=max(counts.ip_1h - 1, 1),
                                         ip_24h=max(counts.ip_24h - 1, 1),
                                         ip_fresh=1 if counts.ip_24h <= 2 else 0)
        out = {"k": "req", "r": wire if wire is not None else codec.request_to_wire(req),
               "e": codec.enrichment_to_wire(enr), "ipc": codec.ip_counts_to_wire(counts),
               "kts": kts}
        await rt.send("by_range", range_routing_key(req, enr).encode("utf-8"), codec.dumps(out))
        if ack is not None:
            self.acks.append(ack)

    async def handle_hop(self, value: bytes, *, partition: int,
                         ack: Callable[[], Any] | None = None) -> None:
        """A request that took the ``by-ip`` hop: decode it and :meth:`count` it."""
        t0 = time.perf_counter()
        env = codec.loads(value)
        req = codec.request_from_wire(env["r"])
        await self.count(req, env["r"], source=ip_source(int(env["src"][0]), direct=False),
                         offset=int(env["src"][1]), kts=env.get("kts"), partition=partition,
                         ack=ack)
        metrics.child(metrics.STAGE_SECONDS, "ip").observe(time.perf_counter() - t0)

    async def flush(self) -> int:
        """Send the batch's table writes (one per address), then ack its events."""
        async with self.lock:
            if not self.acks and not self.table.dirty:
                return 0
            writes, acks = self.table.take_writes(), self.acks
            self.acks = []
            await self.rt.send_writes(writes)
            for ack in acks:
                ack()
            self.rt.watch.progress("ip")
            return len(writes)

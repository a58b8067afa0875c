"""The SOC's subcommands: ``detector sink``, ``detector explain``, ``detector backtest``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from detector.config import settings_from_args
from detector.core.errors import ConfigError


def _db_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", dest="sink_db",
                   help="decision log: sqlite:///path or postgresql://... (env DETECTOR_SINK_DB)")


def cmd_sink(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from detector.sink.consumer import purge, run_sink
    from detector.sink.store import open_store

    settings = settings_from_args(args)
    if args.purge:
        with open_store(settings.sink_db) as store:
            n = purge(store, settings)
        print(f"purged {n} rows older than {settings.sink_retention_days:g} days", file=sys.stderr)
        return 0

    if args.metrics_port:
        from prometheus_client import start_http_server

        from detector import metrics

        start_http_server(args.metrics_port, addr=args.metrics_addr, registry=metrics.REGISTRY)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stats = await run_sink(settings, stop=stop)
        print(f"sink stopped: {stats}", file=sys.stderr)

    asyncio.run(main())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from detector.explain import explain_row, render
    from detector.runtime import build_policy
    from detector.sink.rows import normalize_number, number_hash
    from detector.sink.store import open_store

    settings = settings_from_args(args)
    if not args.request_id and not args.number:
        raise ConfigError("explain needs a REQUEST_ID or --number")
    policy = build_policy(settings)
    with open_store(settings.sink_db) as store:
        if args.request_id:
            row = store.get(args.request_id)
            rows = [row] if row is not None else []
        else:
            h = number_hash(normalize_number(args.number, args.country_hint), settings.pii_hash_key.encode())
            rows = store.by_number_hash(h or "", limit=args.limit)
    if not rows:
        print("no decision found in the decision log", file=sys.stderr)
        return 1
    explained = [explain_row(r, policy) for r in rows]
    if args.json:
        print(json.dumps(explained[0] if args.request_id else explained, indent=2))
    else:
        print("\n\n".join(render(e) for e in explained))
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    from detector.backtest import backtest_cli

    report = backtest_cli(settings_from_args(args), args)
    print(report.render_text())
    if args.html:
        print(f"\nHTML report: {args.html}  (open it in a browser: file://{Path(args.html).resolve()})")
    return 0


def add_commands(sub: argparse._SubParsersAction, add_core_flags: Callable[[argparse.ArgumentParser], None]
                 ) -> None:
    s = sub.add_parser("sink", help="decisions and outcomes from Kafka into the decision log "
                                    "(SQLite/PostgreSQL)")
    _db_flag(s)
    s.add_argument("--kafka-bootstrap", dest="kafka_bootstrap", help="env DETECTOR_KAFKA_BOOTSTRAP")
    s.add_argument("--metrics-port", dest="metrics_port", type=int, default=0,
                   help="serve /metrics (detector_sink_*) on this port (0: off)")
    s.add_argument("--metrics-addr", dest="metrics_addr", default="127.0.0.1",
                   help="address for --metrics-port (0.0.0.0 in a container)")
    s.add_argument("--purge", action="store_true",
                   help="delete rows older than DETECTOR_SINK_RETENTION_DAYS and exit")
    s.set_defaults(func=cmd_sink)

    e = sub.add_parser("explain", help="why a request was decided as it was, for a support agent")
    e.add_argument("request_id", nargs="?")
    e.add_argument("--number", help="look up the recent decisions for a number (hashed before the look-up)")
    e.add_argument("--country-hint", dest="country_hint", default=None,
                   help="region of a national-format --number")
    e.add_argument("--limit", type=int, default=10)
    e.add_argument("--json", action="store_true")
    _db_flag(e)
    e.add_argument("--policy", type=Path, help="policy whose thresholds are shown (env DETECTOR_POLICY)")
    e.set_defaults(func=cmd_explain)

    b = sub.add_parser("backtest", help="what a candidate policy / model would change on recorded traffic")
    b.add_argument("requests", nargs="?", type=Path, help="requests JSONL (or --from-log START END)")
    b.add_argument("--candidate", type=Path, required=True, help="candidate policy TOML")
    b.add_argument("--candidate-model", dest="candidate_model", default=None, help="candidate model name")
    b.add_argument("--outcomes", type=Path, default=None, help="dialer outcomes JSONL")
    b.add_argument("--labels", type=Path, default=None, help="labels side file (detector simulate)")
    b.add_argument("--from-log", dest="from_log", nargs=2, metavar=("START", "END"), default=None,
                   help="re-decide the decision log's decisions in [START, END) (RFC 3339 or epoch s)")
    b.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                   help="2: replay the candidate in a second process beside the baseline (about half "
                        "the time; the default on Linux with two usable CPUs); 1: one after the other")
    b.add_argument("--html", type=Path, default=None, help="write the HTML report here")
    b.add_argument("--json", dest="json_out", type=Path, default=None, help="write the report as JSON here")
    _db_flag(b)
    add_core_flags(b)
    b.set_defaults(func=cmd_backtest)
